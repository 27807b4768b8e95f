"""One likelihood interface for every model, and bits per dimension with uniform dequantisation.

Normalizing flows give ``log_prob`` exactly; diffusion and flow-matching models give it through the
probability-flow ODE (``genlab.diffusion.likelihood``). Both are a :class:`Likelihood` and report
bits/dim through :func:`bits_per_dim` and :func:`bits_per_dim_of`.

Discrete data (images with ``bins`` levels per value) have a probability, not a density. With
``bins`` equal bins of width ``w = (hi - lo) / bins`` over the data range and y = x + u, u uniform
on the bin (Theis et al. 2016, Sec. 3.1; Ho et al. 2019, Flow++, Sec. 3.1; Song et al. 2021, App. D.2),

    log P(x) = log int_bin p(y) dy >= E_u[log p(x + u)] + D log w = E_u[log p(x + u)] - D log(bins / (hi - lo)),

by Jensen's inequality; bits/dim is minus that over D log 2 (an upper bound on the discrete model's).
genlab's images are ``k / 127.5 - 1`` for k = 0..255, i.e. range (-1, 1) with 256 levels; value k
is dequantised to ``lo + (k + u) w``, so data in [-1, 1] and in [0, 1] give the same bits/dim.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from genlab.core.errors import ShapeError


@runtime_checkable
class Likelihood(Protocol):
    """A model with a log-density: ``log_prob(x [B, ...]) -> [B]`` in nats."""

    def log_prob(self, x: Tensor) -> Tensor: ...


def normal_log_prob(x: Tensor, std: float | Tensor = 1.0) -> Tensor:
    """log N(x; 0, std^2 I) summed over all but the batch dim: x [B, ...] -> [B]."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    d = x[0].numel()
    return -0.5 * (x.flatten(1).square().sum(1) / std**2) - d * (torch.log(std) + 0.5 * math.log(2 * math.pi))


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """-log_prob / (dims log 2): nats of a density over ``dims`` values to bits per value."""
    if dims < 1:
        raise ValueError(f"dims must be a positive number of values per sample, got {dims}")
    return -log_prob / (dims * math.log(2))


def _levels(x: Tensor, bins: int, data_range: tuple[float, float]) -> Tensor:
    """The level index k in 0..bins-1 of each value of x on ``bins`` evenly spaced levels from lo to
    hi; raises if x is outside the range or off the levels (e.g. resized or dequantised already)."""
    lo, hi = data_range
    if bins < 2 or not hi > lo:
        raise ValueError(f"need bins >= 2 and data_range (lo, hi) with hi > lo, got bins={bins}, {data_range}")
    pos = (x.double() - lo) / (hi - lo) * (bins - 1)
    k = pos.round()
    if bool((k < 0).any() or (k > bins - 1).any()):
        raise ValueError(f"x has values in [{float(x.min()):g}, {float(x.max()):g}], outside data_range {data_range}; "
                         "genlab images are in (-1, 1): data_range=(0, 1) is for data in [0, 1]")
    off = float((pos - k).abs().max()) if x.numel() else 0.0
    if off > 1e-3:
        raise ValueError(f"x is not on the {bins} levels of data_range {data_range} (a value is {off:.3g} of a "
                         f"level away): dequantise discrete data only; snap with quantize(x, {bins}, {data_range})")
    return k


def quantize(x: Tensor, bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """x rounded to the nearest of ``bins`` evenly spaced levels in ``data_range`` (clamped into it)."""
    lo, hi = data_range
    step = (hi - lo) / (bins - 1)
    return (((x.clamp(lo, hi) - lo) / step).round() * step + lo).to(x.dtype)


def dequantize(x: Tensor, bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0),
               generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation: level k of x [B, ...] becomes lo + (k + u) (hi - lo) / bins with
    u ~ U[0, 1), so y fills [lo, hi). x must be on the ``bins`` levels of ``data_range``."""
    k = _levels(x, bins, data_range)
    lo, hi = data_range
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return (lo + (k + u) * ((hi - lo) / bins)).to(x.dtype)


def bits_per_dim_of(model: Likelihood, x: Tensor, bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0),
                    samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Bits/dim of discrete data x [B, ...] under a density ``model``: [B], the upper bound
    -(E_u log p(x + u) - D log(bins / (hi - lo))) / (D log 2) with ``samples`` draws of u."""
    if x.ndim < 2:
        raise ShapeError(f"x: expected [B, ...] with a batch dimension, got {list(x.shape)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    dims = x[0].numel()
    log_p = torch.stack([model.log_prob(dequantize(x, bins, data_range, generator)) for _ in range(samples)]).mean(0)
    return bits_per_dim(log_p - dims * math.log(bins / (data_range[1] - data_range[0])), dims)
