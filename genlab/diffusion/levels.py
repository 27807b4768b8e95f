"""Noise levels and the arithmetic of step coefficients.

A :class:`Level` holds a process's time t, alpha(t), sigma(t) and their t-derivatives, in float64.
Samplers read coefficients from levels and touch the data only through :func:`combine`, so the
data keeps its own dtype and device whatever the coefficients are:

- a level **shared by the batch** (fields of shape [], e.g. one step of a grid [N + 1]) gives its
  coefficients as Python floats, on every device: float64 precision, no tensor operation per
  coefficient, no host synchronisation (grids are computed on the CPU);
- a level **per sample** (fields [B]) gives float64 tensors [B] on the data's device, which
  :func:`combine` casts to the data's dtype as the last operation.

Facts about a step that decide control flow ("this step lands on the data") are Python booleans
computed once per grid (:meth:`Level.facts`), never a ``bool(tensor)`` per step.

Notation: lambda = log(alpha / sigma) (:attr:`Level.lam`, the half log-SNR of DPM-Solver, UniPC and
DEIS); log-SNR = log(alpha^2 / sigma^2) = 2 lambda (:attr:`Level.log_snr`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from ..core.dtypes import wide_dtype

Scalar = float | Tensor  # a coefficient: a float (level shared by the batch) or a float64 tensor [B]


def level_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64, the dtype of levels; float32 on devices without float64 (Apple's MPS)."""
    return wide_dtype(device)


class Level:
    """A noise level of a process: time ``t``, ``alpha``, ``sigma`` and their t-derivatives.

    Fields have one shape: [] (shared by the batch), [B] (per sample), or [N + 1, ...] for a whole
    time grid, which ``level[i]`` and :meth:`steps` index. Derived quantities (lambda, conversion
    coefficients, model time) go through :meth:`memo`: computed once for a whole grid, vectorised,
    and indexed per step; :meth:`values` and :meth:`coef` return them as floats on a shared level.
    """

    __slots__ = ("t", "alpha", "sigma", "d_alpha", "d_sigma", "_parent", "_memo", "_floats")
    FIELDS = ("t", "alpha", "sigma", "d_alpha", "d_sigma")

    def __init__(self, t: Tensor, alpha: Tensor, sigma: Tensor, d_alpha: Tensor, d_sigma: Tensor,
                 parent: tuple[Level, Any] | None = None) -> None:
        self.t, self.alpha, self.sigma, self.d_alpha, self.d_sigma = t, alpha, sigma, d_alpha, d_sigma
        self._parent, self._memo, self._floats = parent, {}, None

    @property
    def shared(self) -> bool:
        """Whether the level is one for the whole batch (fields of shape [])."""
        return self.t.ndim == 0

    @property
    def requires_grad(self) -> bool:
        return any(getattr(self, f).requires_grad for f in self.FIELDS)

    def memo(self, key: Hashable, fn: Callable[[Level], Any]) -> Any:
        """``fn(self)`` (a tensor or a tuple of tensors), cached; on a step of a grid it is computed
        for the whole grid at once and indexed."""
        if key not in self._memo:
            if self._parent is None:
                self._memo[key] = fn(self)
            else:
                parent, index = self._parent
                value = parent.memo(key, fn)
                self._memo[key] = tuple(v[index] for v in value) if isinstance(value, tuple) else value[index]
        return self._memo[key]

    def values(self, key: Hashable, fn: Callable[[Level], Any]) -> Any:
        """:meth:`memo` as Python floats on a shared level that needs no gradient (a grid's values
        are turned into lists once), else as tensors."""
        if self._floats is None:
            self._floats = self.shared and not self.requires_grad
        if not self._floats:
            return self.memo(key, fn)
        if self._parent is None:
            return _tolist(self.memo(key, fn))
        parent, index = self._parent
        lists = parent.memo(("floats", key), lambda lv: _tolist(lv.memo(key, fn)))
        return tuple(v[index] for v in lists) if isinstance(lists, tuple) else lists[index]

    def coef(self, *names: str) -> tuple[Scalar, ...]:
        """Fields or properties (``lam``, ``log_snr``, ``sigma_edm``, ...) by name, through :meth:`values`."""
        return tuple(self.values(name, lambda lv, n=name: getattr(lv, n)) for name in names)

    def facts(self, key: Hashable, predicate: Callable[[Level], Tensor]) -> tuple[bool, bool]:
        """(any, all) of the boolean ``predicate(level)`` over the batch, as Python booleans. On a step
        of a grid it is evaluated for the whole grid and read to the host once."""
        if self._parent is None:
            value = predicate(self)
            return bool(value.any()), bool(value.all())
        parent, index = self._parent
        table = parent.memo(("facts", key), lambda lv: _reduce_rows(predicate(lv)))
        return table[0][index], table[1][index]

    @property
    def at_data(self) -> bool:
        """Every sample of this level is the data itself (sigma = 0)."""
        return self.facts("at_data", lambda lv: lv.sigma == 0)[1]

    @property
    def touches_data(self) -> bool:
        """Some sample of this level is the data itself (sigma = 0)."""
        return self.facts("at_data", lambda lv: lv.sigma == 0)[0]

    @property
    def lam(self) -> Tensor:
        """lambda = log(alpha / sigma) (Lu et al. 2022, DPM-Solver, Sec. 3.1): half the log-SNR."""
        return self.memo("lam", lambda lv: torch.log(lv.alpha) - torch.log(lv.sigma))

    @property
    def log_snr(self) -> Tensor:
        """log(alpha^2 / sigma^2) = 2 lambda (Kingma et al. 2021, VDM, Eq. 2 uses its negative, gamma)."""
        return self.memo("log_snr", lambda lv: 2 * lv.lam)

    @property
    def sigma_edm(self) -> Tensor:
        """Karras et al.'s sigma = sigma / alpha: the noise level of the scaled sample x / alpha."""
        return self.memo("sigma_edm", lambda lv: lv.sigma / lv.alpha)

    @property
    def sde(self) -> tuple[Tensor, Tensor]:
        """(f, g^2) of the forward SDE dx = f x dt + g dW with these marginals: f = d log alpha / dt,
        g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, App. A.1; Song et al. 2021's VP,
        sub-VP and VE SDEs, Eqs. 9, 11, 17)."""

        def coefficients(lv: Level) -> tuple[Tensor, Tensor]:
            f = lv.d_alpha / lv.alpha
            return f, 2 * lv.sigma * (lv.d_sigma - f * lv.sigma)

        return self.memo("sde", coefficients)

    def __getitem__(self, index: int | slice | Tensor) -> Level:
        return Level(*(getattr(self, f)[index] for f in self.FIELDS), parent=(self, index))

    def __len__(self) -> int:
        return len(self.t)

    def steps(self) -> list[Level]:
        """The levels of a grid [N + 1, ...] as a list, sharing this grid's memo."""
        rows = zip(*(getattr(self, f).unbind(0) for f in self.FIELDS))
        return [Level(*row, parent=(self, i)) for i, row in enumerate(rows)]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Level:
        """A copy with fields cast or moved; this level itself if nothing changes."""
        same_device = device is None or self.alpha.device == torch.device(device)
        if (dtype is None or self.alpha.dtype == dtype) and same_device:
            return self
        return Level(*(getattr(self, f).to(device=device, dtype=dtype) for f in self.FIELDS))

    def __repr__(self) -> str:
        return "Level(" + ", ".join(f"{f}={getattr(self, f)}" for f in self.FIELDS) + ")"


def _tolist(value: Tensor | tuple[Tensor, ...]) -> Any:
    return tuple(v.tolist() for v in value) if isinstance(value, tuple) else value.tolist()


def _reduce_rows(value: Tensor) -> tuple[list[bool], list[bool]]:
    """Per row of a grid's boolean [N + 1, ...]: (any, all) over the rest, as lists."""
    flat = value.reshape(value.shape[0], -1)
    return flat.any(1).tolist(), flat.all(1).tolist()


# ----- coefficient arithmetic: floats and float64 tensors alike ---------------------------------
def broadcast(value: Tensor, x: Tensor) -> Tensor:
    """Append singleton dims so a per-sample value [B] (or a scalar) broadcasts against x [B, ...]."""
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim)) if value.ndim else value


def combine(*terms: tuple[Scalar, Tensor]) -> Tensor:
    """sum_j w_j v_j [B, ...] for weights that are floats or per-sample [B] tensors, in the dtype of
    the v_j: one multiply and one fused multiply-add per further term; tensor weights are cast to
    that dtype (and broadcast) first, so float64 coefficients never promote float32 data."""
    (w, v), *rest = terms
    out = torch.mul(v, w) if isinstance(w, float) else torch.mul(v, _weight(w, v))
    for w, v in rest:
        out = out.add_(v, alpha=w) if isinstance(w, float) else out.addcmul_(v, _weight(w, v))
    return out


def _weight(w: Tensor, v: Tensor) -> Tensor:
    return broadcast(w, v).to(dtype=v.dtype, device=v.device)


def where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.where`` with a per-sample mask [B] broadcast against a [B, ...]."""
    return torch.where(broadcast(mask, a), a, b)


def sqrt(v: Scalar) -> Scalar:
    """sqrt(max(v, 0)) of a float or a tensor (clamped: rounding can make a difference of squares negative)."""
    return math.sqrt(max(v, 0.0)) if isinstance(v, float) else v.clamp_min(0).sqrt()


def minimum(a: Scalar, b: Scalar) -> Scalar:
    """The elementwise smaller of two floats or tensors."""
    if isinstance(a, float) and isinstance(b, float):
        return min(a, b)
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def expm1(v: Scalar) -> Scalar:
    """exp(v) - 1 of a float or a tensor, accurate for small v."""
    return math.expm1(v) if isinstance(v, float) else torch.expm1(v)


def log(v: Scalar) -> Scalar:
    return math.log(v) if isinstance(v, float) else torch.log(v)
