"""YAML configs: loading with ``base:`` inheritance, command-line overrides, key checks, saving.

Numbers: PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) and ``2.0e4`` (no exponent sign) as
strings. ``_Loader`` adds a resolver so that any decimal number with an exponent is a float, in files
and in overrides alike. Words such as ``inf`` stay strings (write ``.inf``).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from genlab.core.errors import ConfigError, did_you_mean
from genlab.core.io import atomic_write

_OVERRIDE_HELP = "expected KEY=VALUE, e.g. train.lr=1e-4"
_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent numbers without a dot or sign (``1e-4``, ``2.0e4``) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigDict(dict):
    """A loaded config; ``source`` is the file's basename, used as the prefix of error messages."""

    def __init__(self, *args: Any, source: str = "config", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source


def join_path(path: str, key: object) -> str:
    """``join_path('model', 'dim') == 'model.dim'``; an empty path means the top level."""
    return f"{path}.{key}" if path else str(key)


def show_value(value: object, limit: int = 60) -> str:
    """Short form of a value for messages: ``str 'abc'``, ``list [1, 2]``, ``None``."""
    if value is None:
        return "None"
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def check_keys(cfg: Mapping, allowed: Iterable[str], *, path: str, source: str) -> None:
    """Raise ConfigError (with the closest valid key) for the first key of ``cfg`` not in ``allowed``."""
    allowed = list(allowed)
    for key in cfg:
        if key not in allowed:
            where = join_path(path, key)
            raise ConfigError(f"{source}: {where}: unknown key{did_you_mean(str(key), allowed)}")


def get_path(cfg: Mapping, dotted: str) -> Any:
    """``get_path(cfg, 'a.b')`` is ``cfg['a']['b']``; KeyError if a key is missing."""
    value: Any = cfg
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``cfg['a']['b'] = value`` for ``'a.b'``, creating missing dicts; ConfigError if one is not a dict."""
    parts = dotted.split(".")
    node = cfg
    for i, key in enumerate(parts[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{where} is {show_value(node)}, not a mapping")
    node[parts[-1]] = value


def merge(base: Any, child: Any) -> Any:
    """Deep merge: dicts key by key, anything else replaced; a dict with a different ``type`` replaces."""
    if not (isinstance(base, Mapping) and isinstance(child, Mapping)) or _type_changed(base, child):
        return copy.deepcopy(child)
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
    return out


def _type_changed(base: Mapping, child: Mapping) -> bool:
    return "type" in base and "type" in child and base["type"] != child["type"]


MAX_BYTES = 1 << 20  # a config is a page of text; anything this large is not one
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_VALUES = 100_000  # values after aliases are expanded (a YAML "billion laughs" expands to 10^9)


def _parse_yaml(text: str, name: str) -> Any:
    """Parse YAML safely: tags are refused by the safe loader; absurd nesting, sizes and alias
    expansions are refused before they cost time or memory."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{name}: {len(text):,} characters; a config is at most {MAX_BYTES:,}")
    try:
        _check_depth(text, name)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{name}: invalid YAML{where}: {problem}") from None
    _check_size(data, name)
    return data


def _check_depth(text: str, name: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream (the composer would recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(f"{name}: nested deeper than {MAX_DEPTH} levels at line {line}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_size(data: Any, name: str) -> None:
    """Refuse data that expands (through aliases, or an alias of itself) to more than MAX_VALUES values."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{name}: expands to more than {MAX_VALUES:,} values through YAML aliases "
                              "(&anchor / *alias); refused")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _read(path: Path, shown: str, chain: tuple[Path, ...]) -> dict:
    """Load one file and the files its ``base:`` names; ``chain`` holds the files being loaded."""
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path) :], path))
        raise ConfigError(f"{shown}: base cycle: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        named_by = f" (base of {chain[-1].name})" if chain else ""
        raise ConfigError(f"{shown}: no such config file{named_by}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read config file: {exc.strerror}") from None
    data = _parse_yaml(text, shown)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: top level must be a mapping, got {type(data).__name__}")
    result: dict = {}
    for name in _base_names(data.pop("base", None), shown):
        base_path = (path.parent / name).resolve()
        result = merge(result, _read(base_path, str(path.parent / name), (*chain, path)))
    return merge(result, data)


def _base_names(base: Any, shown: str) -> list[str]:
    if base is None:
        return []
    names = [base] if isinstance(base, str) else base
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{shown}: base: expected a file name or list of file names, got {show_value(base)}")
    return names


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load a YAML config, resolve ``base:`` files, then apply ``KEY=VALUE`` overrides in order."""
    path = Path(path)
    cfg = ConfigDict(_read(path.resolve(), str(path), ()), source=path.name)
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: dict, overrides: Sequence[str]) -> None:
    """Apply ``a.b.c=value`` overrides in place; setting ``x.type`` to a new type drops x's file keys."""
    from_overrides: list[str] = []
    for item in overrides:
        key, value = _parse_override(item)
        try:
            if key.endswith(".type"):
                _reset_on_type_change(cfg, key[: -len(".type")], value, from_overrides)
            set_path(cfg, key, value)
        except ConfigError as exc:
            raise ConfigError(f"override '{item}': {exc}") from None
        from_overrides = [k for k in from_overrides if not k.startswith(key + ".")] + [key]


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ConfigError(f"override '{item}': {_OVERRIDE_HELP}")
    return key, _parse_yaml(text, f"override '{item}'")


def _reset_on_type_change(cfg: dict, prefix: str, new_type: Any, from_overrides: list[str]) -> None:
    """If ``prefix.type`` changes, keep only the keys under ``prefix`` set by earlier overrides."""
    try:
        node = get_path(cfg, prefix)
    except KeyError:
        return
    if not isinstance(node, dict) or "type" not in node or node["type"] == new_type:
        return
    if any(prefix == key or prefix.startswith(key + ".") for key in from_overrides):
        return  # the whole node was written by an override
    kept: dict = {}
    for key in from_overrides:
        if key.startswith(prefix + "."):
            rel = key[len(prefix) + 1 :]
            try:
                set_path(kept, rel, copy.deepcopy(get_path(node, rel)))
            except (KeyError, ConfigError):
                continue
    node.clear()
    node.update({"type": new_type}, **kept)


def _plain(value: Any) -> Any:
    """Mappings to dicts and tuples to lists, so that ``yaml.safe_dump`` can write them."""
    if isinstance(value, Mapping):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically (:func:`genlab.core.io.atomic_write`), keys in their order."""
    atomic_write(path, yaml.safe_dump(_plain(cfg), sort_keys=False))
