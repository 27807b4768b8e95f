"""Registry building with checked keyword arguments, and YAML configs with base files and overrides."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from genlab.core import ConfigError, build, construct, describe, load_config, lookup, register, save_config
from genlab.core import name_of, register_namespace, registered
from genlab.core.config import check_keys
from genlab.core.typecheck import hints
from genlab.diffusion.samplers.restart import RestartInterval


class _TestGrid:
    """Base class of the test-only grid namespace."""


register_namespace("_test_grid", base=_TestGrid, doc="test grids")


@register("_test_grid")
class KarrasGrid(_TestGrid):
    """Karras rho grid."""

    def __init__(self, rho: float = 7.0) -> None:
        self.rho = rho


@register("_test_model", name="mlp")
@dataclass
class _Mlp:
    """A test MLP.

    More text.
    """

    dim: int
    channels: int = 8
    act: Literal["relu", "gelu"] = "relu"
    mult: tuple[int, ...] = (1,)
    scale: float = 1.0
    bias: bool = True
    width: int | None = None
    pair: tuple[int, str] = (1, "a")


@register("_test_model", name="unet")
def make_unet(grid: _TestGrid | str = "karras_grid", grids: Sequence[_TestGrid] = (), extra: Any = None) -> dict:
    return {"grid": grid, "grids": grids, "extra": extra}


@register("_test_model", name="free")
def make_free(**kwargs: Any) -> dict:
    return kwargs


@dataclass
class _Train:
    lr: float
    steps: int = 10


def _message(fn, *args: Any, **kwargs: Any) -> str:
    """The message of the ConfigError raised by ``fn(*args, **kwargs)``."""
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def _model_error(cfg: dict, source: str = "config.yaml") -> str:
    return _message(build, "_test_model", cfg, path="model", source=source)


def test_register_default_name_and_duplicates() -> None:
    assert lookup("_test_grid", "karras_grid") is KarrasGrid
    assert register("_test_grid")(KarrasGrid) is KarrasGrid  # same object again is fine
    with pytest.raises(ValueError):
        register("_test_grid", name="karras_grid")(type("KarrasGrid", (_TestGrid,), {}))
    alias = register("_test_alias", name="first")(type("Aliased", (), {}))
    register("_test_alias", name="an_alias")(alias)  # a second name: the first stays its name
    assert name_of("_test_alias", alias) == "first" and lookup("_test_alias", "an_alias") is alias
    assert name_of("_test_alias", KarrasGrid) is None


def test_registered_and_describe() -> None:
    assert registered("_test_model") == {"_test_model": ["free", "mlp", "unet"]}
    assert "_test_grid" in registered()
    assert describe("_test_model")[:3] == [("free", ""), ("mlp", "A test MLP."), ("unet", "")]


def test_build_from_str_mapping_and_built_object() -> None:
    m = build("_test_model", {"type": "mlp", "dim": 3, "mult": [1, 2]})
    assert isinstance(m, _Mlp) and m.dim == 3 and m.mult == (1, 2)
    assert isinstance(build("_test_grid", "karras_grid"), KarrasGrid)
    assert build("_test_model", m) is m


def test_unknown_key_type_and_missing_keys() -> None:
    assert _model_error({"type": "mlp", "dim": 1, "chanels": 4}) == (
        "config.yaml: model.chanels: unknown key; did you mean 'channels'?"
    )
    assert _model_error({"type": "unet2"}) == (
        "config.yaml: model.type: unknown _test_model 'unet2'; did you mean 'unet'?"
        " (registered: free, mlp, unet)"
    )
    assert _model_error({"dim": 1}) == (
        "config.yaml: model: missing 'type' (registered _test_models: free, mlp, unet)"
    )
    assert _model_error({"type": "mlp"}) == "config.yaml: model: missing required key 'dim'"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("scale", "abc", "model.scale: expected float, got str 'abc'"),
        ("dim", True, "model.dim: expected int, got bool True"),
        ("dim", 1.5, "model.dim: expected int, got float 1.5"),
        ("act", "tanh", "model.act: expected one of 'relu', 'gelu', got str 'tanh'"),
        ("width", "x", "model.width: expected int or None, got str 'x'"),
        ("bias", 1, "model.bias: expected bool, got int 1"),
        ("pair", [1], "model.pair: expected list [int, str], got list [1]"),
        ("mult", [1, "a"], "model.mult[1]: expected int, got str 'a'"),
    ],
)
def test_bad_type_messages(key: str, value: object, expected: str) -> None:
    assert _model_error({"type": "mlp", "dim": 1, key: value}) == f"config.yaml: {expected}"


def test_accepted_values() -> None:
    m = build("_test_model", {"type": "mlp", "dim": 1, "scale": 2, "width": None})  # int for float
    assert m.scale == 2 and m.width is None
    assert build("_test_model", {"type": "free", "anything": [1], "x": "y"}) == {"anything": [1], "x": "y"}


def test_nested_build_through_declared_base() -> None:
    out = build("_test_model", {"type": "unet", "grid": {"type": "karras_grid", "rho": 5}})
    assert isinstance(out["grid"], KarrasGrid) and out["grid"].rho == 5
    assert isinstance(build("_test_model", {"type": "unet", "grid": "karras_grid"})["grid"], KarrasGrid)
    grids = build("_test_model", {"type": "unet", "grids": ["karras_grid", {"type": "karras_grid", "rho": 2}]})["grids"]
    assert [g.rho for g in grids] == [7.0, 2]
    assert _model_error({"type": "unet", "grid": {"type": "karras_grid", "rh": 5}}, "c.yaml") == (
        "c.yaml: model.grid.rh: unknown key; did you mean 'rho'?"
    )
    assert _model_error({"type": "unet", "grids": [{"type": "karas"}]}, "c.yaml") == (
        "c.yaml: model.grids[0].type: unknown _test_grid 'karas'; did you mean 'karras_grid'? (registered: karras_grid)"
    )


def test_extra_kwargs_from_program() -> None:
    assert build("_test_model", "mlp", dim=4).dim == 4
    assert _message(build, "_test_model", {"type": "mlp", "dim": 1}, path="model", source="c.yaml", dim=4) == (
        "c.yaml: model.dim: set by the program; remove it from the config"
    )


def test_construct_and_check_keys() -> None:
    assert construct(_Train, {"lr": 1}, path="train", source="c.yaml") == _Train(lr=1)
    assert _message(construct, _Train, {"lr": 1e-4, "step": 3}, path="train", source="c.yaml") == (
        "c.yaml: train.step: unknown key; did you mean 'steps'?"
    )
    assert _message(check_keys, {"modle": {}}, ["model", "train"], path="", source="config.yaml") == (
        "config.yaml: modle: unknown key; did you mean 'model'?"
    )


# dataclass parameters: built from mappings with the checks of any component

register_namespace("_test_nested", doc="test components with dataclass parameters")


@dataclass(frozen=True)
class _Interval:
    sigma_min: float
    sigma_max: float
    steps: int = 2

    def __post_init__(self) -> None:
        if not self.sigma_min < self.sigma_max:
            raise ConfigError(f"need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")


@register("_test_nested", name="sampler")
def make_sampler(single: _Interval, many: list[_Interval] | None = None, optional: _Interval | None = None,
                 named: dict[str, _Interval] | None = None, fixed: tuple[_Interval, ...] = ()) -> dict:
    return {"single": single, "many": many, "optional": optional, "named": named, "fixed": fixed}


@register("_test_nested", name="restart")
def make_restart(restarts: list[RestartInterval] | dict[str, list[float]] | None = None) -> Any:
    return restarts


@register("_test_nested", name="node")
class _Node:
    """Its ``__init__`` names the class itself, which is bound only after ``register`` ran."""

    def __init__(self, parent: _Node | None = None) -> None:
        self.parent = parent


@register("_test_nested", name="unchecked")
def make_unchecked(fn: Callable[[int], int] | None = None, cls: type[_TestGrid] = _TestGrid, x: Any = None) -> tuple:
    """Callable[...], type[...] and Any are accepted at registration and not checked."""
    return fn, cls


def _nested_error(cfg: dict) -> str:
    return _message(build, "_test_nested", cfg, path="sampler", source="c.yaml")


def test_dataclass_parameters_from_mappings() -> None:
    one = {"sigma_min": 0.1, "sigma_max": 1}
    out = build("_test_nested", {"type": "sampler", "single": one, "many": [one, {**one, "steps": 3}],
                                 "named": {"a": one}, "fixed": [one]})
    assert out == {"single": _Interval(0.1, 1), "many": [_Interval(0.1, 1), _Interval(0.1, 1, 3)], "optional": None,
                   "named": {"a": _Interval(0.1, 1)}, "fixed": (_Interval(0.1, 1),)}
    assert build("_test_nested", {"type": "sampler", "single": one, "optional": one})["optional"] == _Interval(0.1, 1)
    given = _Interval(0.2, 2.0)
    assert build("_test_nested", {"type": "sampler", "single": given, "many": [given, one]})["single"] is given
    assert build("_test_nested", {"type": "node", "parent": None}).parent is None
    assert hints(_Node)["parent"] == _Node | None


def test_dataclass_parameter_errors() -> None:
    one = {"sigma_min": 0.1, "sigma_max": 1}
    assert _nested_error({"type": "sampler", "single": one, "many": [{"sigma_mni": 0.1}]}) == (
        "c.yaml: sampler.many[0].sigma_mni: unknown key; did you mean 'sigma_min'?"
    )
    assert _nested_error({"type": "sampler", "single": {**one, "steps": "two"}}) == (
        "c.yaml: sampler.single.steps: expected int, got str 'two'"
    )
    assert _nested_error({"type": "sampler", "single": {"sigma_min": 0.1}}) == (
        "c.yaml: sampler.single: missing required key 'sigma_max'"
    )
    assert _nested_error({"type": "sampler", "single": one, "named": {"b": {**one, "sigma_min": "x"}}}) == (
        "c.yaml: sampler.named.b.sigma_min: expected float, got str 'x'"
    )
    assert _nested_error({"type": "sampler", "single": one, "optional": {"sigma_min": 2, "sigma_max": 1}}) == (
        "c.yaml: sampler.optional: need sigma_min < sigma_max, got 2, 1"  # from __post_init__, with the path
    )
    assert _nested_error({"type": "sampler", "single": one, "many": [3]}) == (
        "c.yaml: sampler.many: expected list of _Interval or None, got list [3]"
    )


def test_restart_intervals_from_mappings() -> None:
    """The Restart sampler's intervals as a list of mappings, or in the reference code's dict form."""
    cfg = {"type": "restart", "restarts": [{"sigma_min": 0.06, "sigma_max": 0.3, "repeats": 2}, {"sigma_min": 1,
                                                                                                "sigma_max": 2}]}
    assert build("_test_nested", cfg) == [RestartInterval(0.06, 0.3, 2, 2), RestartInterval(1.0, 2.0)]
    assert build("_test_nested", {"type": "restart", "restarts": {"0": [3, 2, 0.06, 0.3]}}) == {"0": [3, 2, 0.06, 0.3]}
    assert build("_test_nested", {"type": "restart", "restarts": None}) is None
    assert _nested_error({"type": "restart", "restarts": [{"sigma_mni": 0.06, "sigma_max": 0.3}]}) == (
        "c.yaml: sampler.restarts[0].sigma_mni: unknown key; did you mean 'sigma_min'?"
    )
    assert _nested_error({"type": "restart", "restarts": [{"sigma_min": 1, "sigma_max": 2},
                                                          {"sigma_min": 1, "sigma_max": 2, "steps": "two"}]}) == (
        "c.yaml: sampler.restarts[1].steps: expected int >= 1, got str 'two'"
    )
    assert _nested_error({"type": "restart", "restarts": [{"sigma_min": 0.3, "sigma_max": 0.06}]}) == (
        "c.yaml: sampler.restarts[0]: restart interval: need 0 < sigma_min < sigma_max, got 0.3, 0.06"
    )


@dataclass
class _BadField:
    sigma: flot  # noqa: F821


def test_unreadable_annotations_fail_at_registration() -> None:
    def unresolved(a: NotDefinedAnywhere = None, b: int = 0) -> None:  # noqa: F821
        pass

    def inner(x: _BadField | None = None) -> None:
        pass

    def generic(xs: Iterable[int] = ()) -> None:
        pass

    with pytest.raises(TypeError) as e:
        register("_test_nested", name="unresolved")(unresolved)
    assert str(e.value) == ("_test_nested 'unresolved': parameter 'a': cannot resolve annotation 'NotDefinedAnywhere'"
                            " (NameError: name 'NotDefinedAnywhere' is not defined)")
    with pytest.raises(TypeError) as e:
        register("_test_nested", name="inner")(inner)
    assert str(e.value) == ("_test_nested 'inner': parameter 'x': _BadField: parameter 'sigma': cannot resolve "
                            "annotation 'flot' (NameError: name 'flot' is not defined)")
    with pytest.raises(TypeError) as e:
        register("_test_nested", name="generic")(generic)
    assert str(e.value).startswith("_test_nested 'generic': parameter 'xs': annotation 'Iterable[int]': the config "
                                   "checker cannot check collections.abc.Iterable[int] (it checks classes, ")
    assert registered("_test_nested") == {"_test_nested": ["node", "restart", "sampler", "unchecked"]}
    assert hints(make_unchecked) is hints(make_unchecked) and hints(make_unchecked)["x"] is Any  # resolved once
    assert build("_test_nested", {"type": "unchecked", "fn": "anything", "cls": 3}) == ("anything", 3)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_file_and_invalid_yaml(tmp_path: Path) -> None:
    assert _message(load_config, tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such config file"
    bad = _write(tmp_path, "bad.yaml", "a: 1\nb: [1, 2\n")
    assert _message(load_config, bad) == (
        f"{bad}: invalid YAML at line 3: expected ',' or ']', but got '<stream end>'"
    )
    listed = _write(tmp_path, "list.yaml", "- 1\n")
    assert _message(load_config, listed) == f"{listed}: top level must be a mapping, got list"


def test_floats_in_files(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "c.yaml", "lr: 1e-4\nb: 2.0e4\nc: 3\nd: '1e-4'\ne: 1.5\n"))
    assert cfg == {"lr": 1e-4, "b": 2e4, "c": 3, "d": "1e-4", "e": 1.5}
    assert cfg.source == "c.yaml"


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    _write(tmp_path, "base/train.yaml", "train: {lr: 0.1, steps: 5}\nsampler: {type: ddim, eta: 0.5}\n")
    _write(tmp_path, "base/model.yaml", "model: {type: unet, ch: 4}\n")
    _write(tmp_path, "base/extra.yaml", "base: [train.yaml, model.yaml]\ntrain: {steps: 7}\ntags: [a, b]\n")
    child = _write(tmp_path, "c.yaml", "base: base/extra.yaml\nsampler: {type: heun}\nmodel: {ch: 8}\ntags: [c]\n")
    assert load_config(child) == {
        "train": {"lr": 0.1, "steps": 7},
        "sampler": {"type": "heun"},  # a new type does not inherit eta
        "model": {"type": "unet", "ch": 8},
        "tags": ["c"],
    }


def test_base_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "base: b.yaml\nx: 1\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    msg = _message(load_config, tmp_path / "a.yaml")
    assert msg == f"{tmp_path / 'a.yaml'}: base cycle: a.yaml -> b.yaml -> a.yaml"


def test_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "train: {lr: 0.1}\nsampler: {type: ddim, eta: 0.5, steps: 4}\n")
    overrides = ["train.lr=1e-4", "train.steps=10", "train.dims=[1,2]", "train.ema=false"]
    cfg = load_config(path, [*overrides, "new.deep.key=x", "sampler.steps=8", "sampler.type=heun"])
    assert cfg["train"] == {"lr": 1e-4, "steps": 10, "dims": [1, 2], "ema": False}
    assert isinstance(cfg["train"]["lr"], float)
    assert cfg["new"] == {"deep": {"key": "x"}}
    assert cfg["sampler"] == {"type": "heun", "steps": 8}  # eta came from the file and is dropped
    assert load_config(path, ["sampler.type=ddim"])["sampler"]["eta"] == 0.5  # same type keeps keys


@pytest.mark.parametrize("item", ["foo", "=3", "a..b=1"])
def test_bad_overrides(tmp_path: Path, item: str) -> None:
    path = _write(tmp_path, "c.yaml", "train: {lr: 0.1}\n")
    assert _message(load_config, path, [item]) == f"override '{item}': expected KEY=VALUE, e.g. train.lr=1e-4"


def test_override_through_a_scalar(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "train: {lr: 0.1}\n")
    assert _message(load_config, path, ["train.lr.x=1"]) == (
        "override 'train.lr.x=1': train.lr is float 0.1, not a mapping"
    )


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "c.yaml", "b: {lr: 1e-4, mult: [1, 2]}\na: 1\n"))
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert (tmp_path / "out.yaml").read_text().startswith("b:")  # order kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out.yaml"]  # no temp file left


def test_a_components_own_value_check_becomes_a_config_error_with_its_path() -> None:
    """A ValueError from a constructor (here: Euler's s_tmin > s_tmax, a check between two fields) reaches
    the command line as a ConfigError that names where the value came from, so the CLI prints one line
    instead of a traceback. (steps < 1 is a declared range, refused before the constructor runs.)"""
    with pytest.raises(ConfigError, match=r"^c\.yaml: sampler: Euler: s_tmin \(2\) must be <= s_tmax \(1\)"):
        build("sampler", {"type": "euler", "s_tmin": 2, "s_tmax": 1}, path="sampler", source="c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: sampler\.predictor: Euler: s_tmin \(2\) must be"):
        build("sampler", {"type": "pc", "predictor": {"type": "euler", "s_tmin": 2, "s_tmax": 1}}, path="sampler",
              source="c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: sampler\.steps: expected int >= 1, got int 0$"):
        build("sampler", {"type": "ddim", "steps": 0}, path="sampler", source="c.yaml")
