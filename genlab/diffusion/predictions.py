"""What a network predicts, and the conversions between all parameterisations.

With x = alpha x0 + sigma eps, every prediction type is linear in (x, output):
x0 = a_x0 x + b_x0 out and eps = a_eps x + b_eps out. The types:

- ``eps``: the noise (Ho et al. 2020);  ``x0``: the data;
- ``v``: alpha eps - sigma x0 (Salimans & Ho 2022, Eq. 9; general alpha, sigma);
- ``score``: grad log p_t(x) = -eps / sigma (Song et al. 2021);
- ``velocity``: dx/dt = alpha' x0 + sigma' eps (flow matching, Lipman et al. 2023, Eq. 20).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .processes import Level

PredictionType = Literal["eps", "x0", "v", "score", "velocity"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "score", "velocity")


def broadcast(value: Tensor, x: Tensor) -> Tensor:
    """Append singleton dims so a per-sample value [B] (or a scalar) broadcasts against x [B, ...]."""
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim)) if value.ndim else value


def expm1(v: Tensor | float) -> Tensor | float:
    """exp(v) - 1 for a float or a tensor."""
    return math.expm1(v) if isinstance(v, float) else torch.expm1(v)


def combine(*terms: tuple[Tensor | float, Tensor]) -> Tensor:
    """sum_j w_j v_j for weights that are floats, scalars or per-sample [B] tensors, in one
    multiply and one fused multiply-add per further term."""
    (w, v), *rest = terms
    out = torch.mul(v, w if isinstance(w, float) else broadcast(w, v))
    for w, v in rest:
        out = out.add_(v, alpha=w) if isinstance(w, float) else out.addcmul_(v, broadcast(w, v))
    return out


def coefficients(prediction: str, level: Level) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a_x0, b_x0, a_eps, b_eps) with x0 = a_x0 x + b_x0 out and eps = a_eps x + b_eps out."""
    a, s = level.alpha, level.sigma
    zero, one = a * 0, a * 0 + 1
    if prediction == "eps":
        return 1 / a, -s / a, zero, one
    if prediction == "x0":
        return zero, one, 1 / s, -a / s
    if prediction == "v":
        n = a**2 + s**2
        return a / n, -s / n, s / n, a / n
    if prediction == "score":
        return 1 / a, s**2 / a, zero, -s
    if prediction == "velocity":
        det = a * level.d_sigma - s * level.d_alpha
        return level.d_sigma / det, -s / det, -level.d_alpha / det, a / det
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {', '.join(PREDICTIONS)}")


def to_x0_eps(prediction: str, out: Tensor, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output ``out`` [B, ...] of type ``prediction`` at x [B, ...].

    Each is computed from ``out`` directly, so x0 stays finite at alpha = 0 for ``v`` and
    ``velocity``, and eps stays finite at sigma = 0 for ``eps``.
    """
    a_x0, b_x0, a_eps, b_eps = level.values(("coefficients", prediction), coefficients_of(prediction))
    x0 = out if prediction == "x0" else combine((a_x0, x), (b_x0, out))
    eps = out if prediction == "eps" else combine((a_eps, x), (b_eps, out))
    return x0, eps


@functools.cache
def coefficients_of(prediction: str) -> Callable[[Level], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``level -> coefficients(prediction, level)``, one function object per type (a memo key)."""
    return lambda level: coefficients(prediction, level)


def from_x0_eps(prediction: str, x0: Tensor, eps: Tensor, level: Level) -> Tensor:
    """The output of type ``prediction`` that corresponds to (x0, eps): the training target."""
    a, s = broadcast(level.alpha, x0), broadcast(level.sigma, x0)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    if prediction == "velocity":
        return broadcast(level.d_alpha, x0) * x0 + broadcast(level.d_sigma, x0) * eps
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {', '.join(PREDICTIONS)}")


def convert(out: Tensor, source: str, target: str, x: Tensor, level: Level) -> Tensor:
    """Re-express a prediction of type ``source`` as type ``target`` at (x, level)."""
    return from_x0_eps(target, *to_x0_eps(source, out, x, level), level)


