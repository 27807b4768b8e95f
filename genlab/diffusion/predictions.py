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
from collections.abc import Callable
from typing import Literal

from torch import Tensor

from .levels import Level, combine

PredictionType = Literal["eps", "x0", "v", "score", "velocity"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "score", "velocity")


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


def target_coefficients(prediction: str, level: Level) -> tuple[Tensor, Tensor]:
    """(c_x0, c_eps) with out = c_x0 x0 + c_eps eps: what a network of type ``prediction`` should
    output for the truth (x0, eps) (the definitions in the module docstring)."""
    a, s = level.alpha, level.sigma
    zero, one = a * 0, a * 0 + 1
    if prediction == "eps":
        return zero, one
    if prediction == "x0":
        return one, zero
    if prediction == "v":
        return -s, a
    if prediction == "score":
        return zero, -1 / s
    if prediction == "velocity":
        return level.d_alpha, level.d_sigma
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {', '.join(PREDICTIONS)}")


@functools.cache
def target_coefficients_of(prediction: str) -> Callable[[Level], tuple[Tensor, Tensor]]:
    """``level -> target_coefficients(prediction, level)``, one function object per type (a memo key)."""
    return lambda level: target_coefficients(prediction, level)


def from_x0_eps(prediction: str, x0: Tensor, eps: Tensor, level: Level) -> Tensor:
    """The output of type ``prediction`` that corresponds to (x0, eps) [B, ...]: the training target."""
    if prediction in ("eps", "x0"):
        return eps if prediction == "eps" else x0
    c_x0, c_eps = level.values(("target", prediction), target_coefficients_of(prediction))
    return combine((c_x0, x0), (c_eps, eps))


def convert(out: Tensor, source: str, target: str, x: Tensor, level: Level) -> Tensor:
    """Re-express a prediction of type ``source`` as type ``target`` at (x, level)."""
    return from_x0_eps(target, *to_x0_eps(source, out, x, level), level)


