"""Value ranges declared once, on a parameter's annotation, and checked wherever the value arrives.

``steps: Annotated[int, Range(ge=1)]`` (or the alias ``PositiveInt``) on a registered component's
``__init__`` (or a config dataclass's field) means:

- from a config, the registry refuses ``steps: 0`` with ``path.steps: expected int >= 1, got int 0``
  before anything is built (:mod:`genlab.core.registry`);
- from Python, ``Component(steps=0)`` raises ``ValueError`` naming the class, the parameter and the
  range: :func:`checked` wraps ``__init__`` of every registered class, and of a dataclass that asks
  for it, so a user's own registered component gets the same checks from its declaration.

A ``float`` is finite unless its range says ``finite=False`` (NaN is never accepted).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from numbers import Real
from typing import Annotated, Any, TypeVar, get_args, get_origin

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``ge`` / ``gt`` (lower, inclusive / exclusive), ``le`` / ``lt`` (upper);
    ``finite=False`` lets ``±inf`` through (NaN never passes)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (a real number; anything else is not this check's business) is in range."""
        if not isinstance(value, Real) or isinstance(value, bool):
            return True
        v = as_float(value)
        if math.isnan(v) or (self.finite and math.isinf(v)):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        parts = [f"{op} {_num(b)}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts) if parts else ("finite" if self.finite else "not NaN")


def as_float(value: Real) -> float:
    """``float(value)``, with ints too large for a float as ``±inf`` instead of an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.copysign(math.inf, value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
UnitInterval = Annotated[float, Range(ge=0, le=1)]


def ranges(hint: Any) -> tuple[Range, ...]:
    """The ``Range`` metadata of an ``Annotated`` hint (empty for any other hint)."""
    if get_origin(hint) is not Annotated:
        return ()
    return tuple(m for m in hint.__metadata__ if isinstance(m, Range))


def unannotated(hint: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``; any other hint unchanged."""
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def describe(hint: Any, base: str) -> str:
    """``base`` (the type's name) with the hint's ranges: ``int >= 1``, ``float > 0 and < 1``, ``finite float``."""
    rs = ranges(hint)
    words = [str(r) for r in rs if r != Range() and r != Range(finite=False)]
    if not words and Range() in rs:
        return f"finite {base}"
    return " ".join([base, *words])


def top_ranges(hint: Any) -> tuple[Range, ...] | None:
    """The ranges a value of parameter ``hint`` must satisfy from Python: those of ``Annotated[...]``,
    or of ``Annotated[...] | None`` (None passes). None when the hint declares no range."""
    args = get_args(hint) if get_origin(hint) not in (None, Annotated) else (hint,)
    found = tuple(r for a in args for r in ranges(a))
    return found or None


def checked(cls: type[T]) -> type[T]:
    """Wrap ``cls.__init__`` so that every argument whose annotation declares a :class:`Range` is
    checked (ValueError naming the class, parameter, range and value). Idempotent; the registry applies
    it to every class it registers. Values that are not real numbers (tensors, ...) are not checked."""
    from .typecheck import hints  # resolves string annotations, with their Annotated metadata

    init = cls.__dict__.get("__init__", cls.__init__)
    if getattr(init, "__genlab_checked__", False):
        return cls
    bounded = {name: r for name, hint in hints(cls).items() if (r := top_ranges(hint)) is not None}
    if not bounded:
        return cls
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return init(self, *args, **kwargs)  # let the real call raise its own error
        for name, rs in bounded.items():
            value = bound.arguments.get(name)
            for r in rs:
                if value is not None and not r.holds(value):
                    raise ValueError(f"{cls.__name__}: {name} must be {r}, got {value!r}")
        init(self, *args, **kwargs)

    __init__.__genlab_checked__ = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    return cls
