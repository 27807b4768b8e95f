"""Reading the type hints of a component's parameters for the config checker of :mod:`genlab.core.registry`.

``hints(fn)`` resolves the annotations of ``fn``'s parameters (of ``__init__`` for a class) once per
callable; ``vet(fn, who)`` also makes sure the checker understands every hint, so that a component
whose annotations it cannot read fails when it is registered instead of going unchecked:

- checked: classes, ``None``, ``Literal[...]``, unions, ``list``, ``tuple``, ``Sequence``, ``dict``,
  ``Mapping`` of checked hints, and dataclasses (built from mappings; their fields are vetted too);
- accepted unchecked: ``Any``, ``Callable[...]``, ``type[...]`` and type variables;
- ``Annotated[X, Range(...)]`` (:mod:`.bounds`): ``X`` as above, and the value's range.

Anything else (a generic such as ``Iterable[int]``, a ``NewType``, a Protocol that is not runtime-checkable,
a name that does not resolve) is a TypeError naming the component, the parameter and the annotation.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
from collections.abc import Callable, Iterator, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .bounds import describe, unannotated

SEQUENCES = (list, tuple, Sequence, MutableSequence)  # a YAML list is accepted for any of these
MAPPINGS = (dict, Mapping, MutableMapping)
UNIONS = (Union, types.UnionType)
_UNCHECKED = (type, collections.abc.Callable)  # origins of generics that are accepted without a check
_KNOWN = ("it checks classes, None, Literal, unions, dataclasses, and list, tuple, Sequence, dict, Mapping of "
          "these; Any, Callable and type[...] go unchecked")

_HINTS: dict[Any, dict[str, Any]] = {}  # callable -> its resolved parameter hints


def origin(hint: Any) -> Any:
    """``get_origin(hint)``, except that a bare ``list``, ``tuple``, ``dict``, ``Sequence``... is its own origin."""
    return get_origin(hint) or (hint if hint in SEQUENCES + MAPPINGS else None)


def is_dataclass_type(hint: Any) -> bool:
    """Whether ``hint`` is a dataclass (the class, not an instance)."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def hints(fn: Callable, who: str | None = None) -> dict[str, Any]:
    """Resolved annotations of the parameters of ``fn`` (of ``__init__`` for a class), cached per callable.

    TypeError naming ``who`` (default: ``fn``'s name), the parameter and the annotation if one cannot be resolved.
    """
    if fn not in _HINTS:
        _HINTS[fn] = _resolve(fn, who or getattr(fn, "__qualname__", repr(fn)))
    return _HINTS[fn]


def _target(fn: Callable) -> Any:
    return fn.__init__ if isinstance(fn, type) else fn


def _annotations(fn: Callable) -> dict[str, Any]:
    """The raw parameter annotations of ``fn`` (strings under ``from __future__ import annotations``)."""
    return {k: v for k, v in getattr(_target(fn), "__annotations__", {}).items() if k != "return"}


def _text(annotation: Any) -> str:
    """The annotation as written (a string one without its quotes)."""
    if not isinstance(annotation, str):
        return inspect.formatannotation(annotation)
    quoted = len(annotation) > 1 and annotation[0] == annotation[-1] and annotation[0] in "'\""
    return annotation[1:-1] if quoted else annotation


def _resolve(fn: Callable, who: str) -> dict[str, Any]:
    """One annotation at a time, so that the error names the one that does not resolve."""
    env = getattr(inspect.unwrap(_target(fn)), "__globals__", {})
    # a class's own name is bound only after its decorators ran: let its annotations name it anyway
    local = {fn.__name__: fn} if isinstance(fn, type) and fn.__name__ not in env else None
    resolved = {}
    for name, annotation in _annotations(fn).items():
        holder = types.SimpleNamespace(__annotations__={name: annotation}, __globals__=env)
        try:
            resolved[name] = get_type_hints(holder, localns=local, include_extras=True)[name]
        except Exception as e:  # NameError, SyntaxError, TypeError...: whatever evaluating the text raised
            raise TypeError(f"{who}: parameter '{name}': cannot resolve annotation '{_text(annotation)}' "
                            f"({type(e).__name__}: {e})") from None
    return resolved


def vet(fn: Callable, who: str, seen: frozenset = frozenset()) -> None:
    """Resolve the hints of ``fn`` and make sure the checker understands each, with the fields of dataclasses
    among them; TypeError naming ``who``, the parameter and the annotation otherwise."""
    seen = seen | {fn}
    annotations = _annotations(fn)
    for name, hint in hints(fn, who).items():
        where = f"{who}: parameter '{name}'"
        for leaf in _leaves(hint):
            if not _checkable(leaf):
                raise TypeError(f"{where}: annotation '{_text(annotations[name])}': the config checker cannot "
                                f"check {_text(leaf)} ({_KNOWN})")
            if is_dataclass_type(leaf) and leaf not in seen:
                try:
                    vet(leaf, leaf.__qualname__, seen)
                except TypeError as e:
                    raise TypeError(f"{where}: {e}") from None


def _checkable(leaf: Any) -> bool:
    """Whether ``isinstance`` works with ``leaf``: a plain class (not a generic such as ``Iterable[int]``, a
    ``NewType`` or a Protocol that is not runtime-checkable)."""
    if get_origin(leaf) is not None or not isinstance(leaf, type):
        return False
    try:
        isinstance(None, leaf)
    except TypeError:
        return False
    return True


def _leaves(hint: Any) -> Iterator[Any]:
    """The parts of ``hint`` below its unions and collections, less those accepted as they are
    (``Literal``, ``None``, ``Any``, ``Callable[...]``, ``type[...]``, type variables)."""
    org = origin(hint)
    if org is Annotated:
        yield from _leaves(unannotated(hint))
    elif org in UNIONS or org in SEQUENCES + MAPPINGS:
        for arg in get_args(hint):
            if arg is not Ellipsis:
                yield from _leaves(arg)
    elif not (org is Literal or org in _UNCHECKED or hint is Any or hint is None or isinstance(hint, TypeVar)):
        yield hint


def type_name(hint: Any) -> str:
    """Readable type: ``int``, ``list of int``, ``one of 'a', 'b'``, ``int or None``."""
    org, args = origin(hint), get_args(hint)
    if org is Annotated:
        return describe(hint, type_name(unannotated(hint)))
    if hint is None or hint is type(None):
        return "None"
    if org in UNIONS:
        return " or ".join(type_name(a) for a in args)
    if org is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if org in MAPPINGS:
        return "mapping"
    if org is tuple and args and args[-1] is not Ellipsis:
        return "list [" + ", ".join(type_name(a) for a in args) + "]"
    if org in SEQUENCES:
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint))
