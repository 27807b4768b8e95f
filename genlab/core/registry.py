"""Registry of named components, and building them from config with checked keyword arguments.

``build`` turns ``"name"`` or ``{type: name, **kwargs}`` into an object; ``construct`` checks keys and
types against the signature and builds nested components annotated with a namespace's ``base`` class,
and dataclasses given as mappings. ``register`` resolves and vets the annotations (:mod:`.typecheck`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar, get_args

from genlab.core.bounds import Range, as_float, checked, ranges, unannotated
from genlab.core.config import check_keys, join_path, show_value
from genlab.core.errors import ConfigError, did_you_mean
from genlab.core.typecheck import MAPPINGS, SEQUENCES, UNIONS, hints, is_dataclass_type, origin, type_name, vet

T = TypeVar("T")


@dataclass
class _Namespace:
    base: type | None = None
    doc: str = ""
    entries: dict[str, Any] = field(default_factory=dict)
    names: dict[Any, str] = field(default_factory=dict)  # object -> the name it was first registered under


_NAMESPACES: dict[str, _Namespace] = {}


def _snake_case(name: str) -> str:
    """``DPMSolverPP -> dpm_solver_pp``, ``EulerAncestral -> euler_ancestral``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _check_base(namespace: str, base: type | None, name: str, obj: object) -> None:
    if base is not None and isinstance(obj, type) and not issubclass(obj, base):
        raise TypeError(f"{namespace} '{name}': {obj.__qualname__} is not a subclass of {base.__qualname__}")


def register_namespace(namespace: str, base: type | None = None, doc: str = "") -> None:
    """Declare ``namespace``; values for parameters annotated with ``base`` are built from it."""
    ns = _NAMESPACES.setdefault(namespace, _Namespace())
    if ns.base not in (None, base):
        raise ValueError(f"namespace '{namespace}' already has base {ns.base.__qualname__}")
    if _base_namespace(base) not in (None, namespace):
        raise ValueError(f"{base.__qualname__} is already the base of namespace '{_base_namespace(base)}'")
    for name, obj in ns.entries.items():
        _check_base(namespace, base, name, obj)
    ns.base, ns.doc = base or ns.base, doc or ns.doc


def register(namespace: str, name: str | None = None) -> Callable[[T], T]:
    """Decorator registering a class or factory as ``namespace/name`` (default: snake_case of its name).

    TypeError if an annotation of its parameters does not resolve or is not one the config checker reads.
    A class's ``__init__`` is wrapped by :func:`genlab.core.bounds.checked`, so that the ranges its
    annotations declare hold for direct construction too.
    """

    def deco(obj: T) -> T:
        key = name or _snake_case(obj.__name__)
        ns = _NAMESPACES.setdefault(namespace, _Namespace())
        if ns.entries.get(key, obj) is not obj:
            raise ValueError(f"{namespace} '{key}' is already registered to {ns.entries[key]!r}")
        _check_base(namespace, ns.base, key, obj)
        vet(obj, f"{namespace} '{key}'")
        if isinstance(obj, type):
            checked(obj)
        ns.entries[key] = obj
        ns.names.setdefault(obj, key)
        return obj

    return deco


def _namespace(namespace: str, path: str, source: str) -> _Namespace:
    if namespace not in _NAMESPACES:
        hint = did_you_mean(namespace, _NAMESPACES)
        raise ConfigError(f"{source}: {path}: unknown namespace '{namespace}'{hint}")
    return _NAMESPACES[namespace]


def lookup(namespace: str, name: str, *, path: str | None = None, source: str = "config") -> Any:
    """Return the component registered as ``namespace/name``; ``path`` locates ``name`` in messages."""
    path = path or namespace
    entries = _namespace(namespace, path, source).entries
    if name not in entries:
        hint, names = did_you_mean(name, entries), ", ".join(sorted(entries))
        raise ConfigError(f"{source}: {path}: unknown {namespace} '{name}'{hint} (registered: {names})")
    return entries[name]


def registered(namespace: str | None = None) -> dict[str, list[str]]:
    """Sorted registered names per namespace (all namespaces, or just ``namespace``)."""
    names = sorted(_NAMESPACES) if namespace is None else [namespace]
    return {n: sorted(_namespace(n, n, "genlab").entries) for n in names}


def name_of(namespace: str, obj: Any) -> str | None:
    """The name ``obj`` was first registered under in ``namespace`` (later ones are aliases), or None."""
    return _namespace(namespace, namespace, "genlab").names.get(obj)


def describe(namespace: str) -> list[tuple[str, str]]:
    """``(name, start of the docstring's first paragraph)`` for each component of ``namespace``, sorted by name."""
    entries = _namespace(namespace, namespace, "genlab").entries
    return [(n, _summary(entries[n])) for n in sorted(entries)]


def _summary(obj: object) -> str:
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__  # a class's own, not inherited
    if not doc:
        return ""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())
    return paragraph if len(paragraph) <= 100 else paragraph[:100].rsplit(" ", 1)[0] + " ..."


def build(namespace: str, cfg: Any, *, path: str | None = None, source: str = "config", **extra: Any) -> Any:
    """Build from ``"name"`` or ``{type: name, **kwargs}``; other values are returned unchanged.

    ``extra`` are keyword arguments from the program; a config may not set them too.
    """
    if not isinstance(cfg, (str, Mapping)):
        return cfg
    path = path or namespace
    entries = _namespace(namespace, path, source).entries
    if isinstance(cfg, str):
        return _construct(lookup(namespace, cfg, path=path, source=source), {}, extra, path, source)
    if "type" not in cfg:
        names = ", ".join(sorted(entries))
        raise ConfigError(f"{source}: {path}: missing 'type' (registered {namespace}s: {names})")
    if not isinstance(cfg["type"], str):
        raise ConfigError(f"{source}: {path}.type: expected str, got {show_value(cfg['type'])}")
    fn = lookup(namespace, cfg["type"], path=f"{path}.type", source=source)
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    clash = sorted(kwargs.keys() & extra.keys())
    if clash:
        raise ConfigError(f"{source}: {path}.{clash[0]}: set by the program; remove it from the config")
    return _construct(fn, kwargs, extra, path, source)


def construct(fn: Callable[..., T], kwargs: Mapping[str, Any], *, path: str, source: str) -> T:
    """Call ``fn(**kwargs)`` after checking the keys and value types against its signature."""
    return _construct(fn, kwargs, {}, path, source)


def _construct(fn: Callable[..., T], kwargs: Mapping, extra: Mapping, path: str, source: str) -> T:
    """Check ``kwargs`` (from the config) and call ``fn``; ``extra`` (from the program) is not checked."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): nothing to check
        return fn(**kwargs, **extra)
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        check_keys(kwargs, named, path=path, source=source)
    missing = [n for n, p in named.items() if p.default is p.empty and n not in kwargs and n not in extra]
    if missing:
        raise ConfigError(f"{source}: {path}: missing required key '{missing[0]}'")
    resolved = hints(fn)
    checked = {k: _checked(resolved.get(k, Any), v, join_path(path, k), source) for k, v in kwargs.items()}
    try:
        return fn(**checked, **extra)
    except ValueError as e:  # the component's own check of a value (``__init__``, ``__post_init__``)
        if isinstance(e, ConfigError) and path in str(e):
            raise  # a nested component's error names its place already
        raise ConfigError(f"{source}: {path}: {e}") from e


class _Mismatch(Exception):
    """``(path, hint, value)``: a value does not match a type hint; ``_checked`` makes it a ConfigError."""


def _checked(hint: Any, value: Any, path: str, source: str) -> Any:
    """Return ``value`` checked against ``hint``, nested components built, lists for tuples converted."""
    try:
        return _check(hint, value, path, source)
    except _Mismatch as m:
        where, wanted, got = m.args
        raise ConfigError(f"{source}: {where}: expected {type_name(wanted)}, got {show_value(got)}") from None


def _base_namespace(hint: Any) -> str | None:
    """The namespace whose declared base class is ``hint``, if any."""
    return next((n for n, ns in _NAMESPACES.items() if ns.base is not None and ns.base is hint), None)


_FINITE = Annotated[float, Range()]  # what a plain ``float`` hint accepts: "finite float"


def _check(hint: Any, value: Any, path: str, source: str) -> Any:
    """A namespace's base or a dataclass (also as a union member) is built from a mapping; its errors are final.
    ``Annotated[X, Range(...)]``: ``X``'s check, then the ranges; a plain ``float`` must be finite."""
    org, args = origin(hint), get_args(hint)
    if org is Annotated:
        inner = unannotated(hint)
        if inner is float:  # finiteness is the ranges' to decide (``finite=False``)
            if not _matches(inner, None, (), value):
                raise _Mismatch(path, hint, value)
        else:
            try:
                value = _check(inner, value, path, source)
            except _Mismatch as m:
                if m.args[0] != path:
                    raise  # an item inside the value: its own message
                raise _Mismatch(path, hint, value) from None
        if not all(r.holds(value) for r in ranges(hint)):
            raise _Mismatch(path, hint, value)
        return value
    if hint is float and _matches(hint, org, args, value) and not math.isfinite(as_float(value)):
        raise _Mismatch(path, _FINITE, value)
    members = args if org in UNIONS else (hint,)
    nested = next(filter(None, map(_base_namespace, members)), None)
    if nested is not None and isinstance(value, (str, Mapping)):
        return build(nested, value, path=path, source=source)
    record = next(filter(is_dataclass_type, members), None)
    if record is not None and isinstance(value, Mapping):
        return _construct(record, value, {}, path, source)
    if len(members) > 1:
        for member in members:
            with contextlib.suppress(_Mismatch):
                return _check(member, value, path, source)
    elif org in SEQUENCES + MAPPINGS:
        return _check_collection(hint, org, args, value, path, source)
    elif _matches(hint, org, args, value):
        return value
    raise _Mismatch(path, hint, value)


def _matches(hint: Any, org: Any, args: tuple, value: Any) -> bool:
    if org is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if org is not None:
        return True  # Callable[...], type[X]: not checked (register refuses other generics)
    if hint is None or hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return hint is Any or not isinstance(hint, type) or isinstance(value, hint)  # a TypeVar: not checked


def _check_collection(hint: Any, org: Any, args: tuple, value: Any, path: str, source: str) -> Any:
    """Mappings, and sequences (YAML lists, also for tuples), checked item by item."""
    if org in MAPPINGS:
        if not isinstance(value, Mapping):
            raise _Mismatch(path, hint, value)
        v_hint = args[1] if len(args) == 2 else Any  # keys are not checked: YAML keys are str
        return {k: _check(v_hint, v, join_path(path, k), source) for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(path, hint, value)
    fixed = org is tuple and args and args[-1] is not Ellipsis
    if fixed and len(value) != len(args):
        raise _Mismatch(path, hint, value)
    item_hints = args if fixed else [args[0] if args else Any] * len(value)
    items = [_check(h, v, f"{path}[{i}]", source) for i, (h, v) in enumerate(zip(item_hints, value))]
    return tuple(items) if org is tuple else items

