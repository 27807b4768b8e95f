"""Declared ranges and cross-field checks of every registered component, from a config and from Python,
and the checks of sampling's public entry points. The tables of bad values are in
tests/bad_inputs_components.py; tests/test_bad_inputs.py runs them (configs through the command line)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch

from genlab.core.bounds import PositiveFloat, Range
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.core.registry import build, register
from genlab.diffusion import DDIM, VP, Denoiser, Sampler
from genlab.training import Experiment

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs_components import API_CASES, CONFIG_CASES  # noqa: E402

CONFIGS = Path(__file__).parent.parent / "configs"


def test_the_tables_are_large_and_their_ids_unique() -> None:
    assert len(CONFIG_CASES) >= 80 and len(API_CASES) >= 40
    assert len({c[1] for c in CONFIG_CASES if c[0] == "toy2d"}) == sum(c[0] == "toy2d" for c in CONFIG_CASES)
    assert len({c[0] for c in API_CASES}) == len(API_CASES)


# shipped configs built on a run the README's commands train first: building them without it stops at that run
NEEDS_RUN = {"consistency/cd_digits.yaml": "runs/digits", "consistency/ect_digits.yaml": "runs/digits",
             "controlnet/controlnet_digits.yaml": "runs/digits", "distill/guided_digits.yaml": "runs/digits",
             "distill/guided_progressive_digits.yaml": "runs/guided_digits",
             "distill/progressive_digits.yaml": "runs/digits", "finetune/lora_digits.yaml": "runs/digits_holdout7",
             "finetune/textual_inversion_digits.yaml": "runs/digits_holdout7",
             "latent/ldm_digits.yaml": "runs/vae_digits", "text/text_digits.yaml": "runs/tiny_clip"}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_the_shipped_configs_build_and_their_grids_fit_their_process(path: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every config under configs/ builds (from an empty working directory) and its grid fits its process;
    one built on another run stops, with a ConfigError, at exactly that run."""
    monkeypatch.chdir(tmp_path)
    needed = NEEDS_RUN.get(str(path.relative_to(CONFIGS)))
    if needed is not None:
        with pytest.raises(ConfigError, match=rf"{needed}(: not a run directory| is not a directory)"):
            Experiment.from_config(load_config(path))
        return
    exp = Experiment.from_config(load_config(path))
    times = exp.sampler.timesteps(exp.process)
    assert len(times) == exp.sampler.steps + 1 and bool((times.diff() < 0).all())


def test_check_finite_false_returns_the_non_finite_samples() -> None:
    nan = Denoiser(lambda x, t: torch.full_like(x, math.nan), VP())
    out = DDIM(3).sample(nan, shape=(4, 2), progress=False, check_finite=False)
    assert out.shape == (4, 2) and bool(out.isnan().all())
    ok = DDIM(3).sample(Denoiser(lambda x, t: torch.zeros_like(x), VP()), shape=(4, 2), progress=False, steps=2)
    assert bool(torch.isfinite(ok).all())


class _RangedSampler(Sampler):
    """A user's own sampler: its declared ranges are checked by the registry and on construction. Registered
    in a namespace of its own: in ``sampler`` it would join the tests that run every registered sampler."""

    def __init__(self, steps: Annotated[int, Range(ge=2, le=50)] = 10, grid: object = None,
                 strength: PositiveFloat = 1.0, decay: Annotated[float, Range(ge=0, lt=1)] | None = None) -> None:
        super().__init__(steps)
        self.strength, self.decay = strength, decay


USER_SAMPLERS = "_test_component_ranges_samplers"
register(USER_SAMPLERS, "ranged")(_RangedSampler)


class _Widget:
    """A component of a namespace of the user's own (no base class)."""

    def __init__(self, size: Annotated[int, Range(ge=1)] = 1, ratio: Annotated[float, Range(gt=0, le=1)] = 0.5) -> None:
        self.size, self.ratio = size, ratio


register("_test_component_ranges_widgets", "widget")(_Widget)


@pytest.mark.parametrize("cfg, fragment", [
    ({"steps": 1}, "u.yaml: sampler.steps: expected int >= 2 and <= 50, got int 1"),
    ({"steps": 51}, "u.yaml: sampler.steps: expected int >= 2 and <= 50, got int 51"),
    ({"strength": 0}, "u.yaml: sampler.strength: expected float > 0, got int 0"),
    ({"strength": math.inf}, "u.yaml: sampler.strength: expected float > 0, got float inf"),
    ({"decay": 1.0}, "u.yaml: sampler.decay: expected float >= 0 and < 1 or None, got float 1.0"),
])
def test_a_users_registered_sampler_gets_range_checks_from_a_config(cfg: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        build(USER_SAMPLERS, {"type": "ranged", **cfg}, path="sampler", source="u.yaml")


def test_a_users_registered_classes_get_range_checks_from_python() -> None:
    ok = build(USER_SAMPLERS, {"type": "ranged", "steps": 3, "decay": 0.5})
    assert isinstance(ok, _RangedSampler) and ok.steps == 3 and ok.decay == 0.5
    with pytest.raises(ValueError, match=re.escape("_RangedSampler: steps must be >= 2 and <= 50, got 1")):
        _RangedSampler(steps=1)
    with pytest.raises(ValueError, match=re.escape("_RangedSampler: strength must be > 0, got -2.0")):
        _RangedSampler(5, None, -2.0)
    with pytest.raises(ValueError, match=re.escape("_RangedSampler: decay must be >= 0 and < 1, got nan")):
        _RangedSampler(decay=math.nan)
    assert _RangedSampler(decay=None).decay is None
    assert build("_test_component_ranges_widgets", {"type": "widget", "size": 3}).size == 3
    with pytest.raises(ConfigError, match=re.escape("w.yaml: widget.ratio: expected float > 0 and <= 1, got int 2")):
        build("_test_component_ranges_widgets", {"type": "widget", "ratio": 2}, path="widget", source="w.yaml")
    with pytest.raises(ValueError, match=re.escape("_Widget: size must be >= 1, got 0")):
        _Widget(size=0)
