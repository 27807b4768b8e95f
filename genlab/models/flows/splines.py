"""Monotonic rational-quadratic splines with linear tails (Durkan et al. 2019, Neural Spline Flows).

On [-B, B] the spline has K bins with knots (x^k, y^k) and positive derivatives d^k at the knots;
outside it is the identity (linear tails, d = 1 at +-B). In bin k, with xi = (x - x^k) / w^k and
s^k = (y^{k+1} - y^k) / w^k (Sec. 3.1 and App. A):

    g(x) = y^k + (y^{k+1} - y^k) [s xi^2 + d^k xi (1 - xi)] / [s + (d^{k+1} + d^k - 2 s) xi (1 - xi)]
    g'(x) = s^2 [d^{k+1} xi^2 + 2 s xi (1 - xi) + d^k (1 - xi)^2] / [s + (d^{k+1} + d^k - 2 s) xi (1 - xi)]^2

and the inverse is the root xi = 2c / (-b - sqrt(b^2 - 4ac)) of a quadratic (App. A).

Parameterisation: zuko's (``zuko.transforms.MonotonicRQSTransform``), so that the same unconstrained
(widths [.., K], heights [.., K], derivatives [.., K - 1]) give the same spline: each is soft-clipped,
v / (1 + |2 v / log(slope)|) (derivatives: v / (1 + |v / log(slope)|)), widths and heights go through a
softmax and cumulate to knots on [-B, B], inner derivatives are exp(v) (in (slope, 1 / slope)) and the
end derivatives are 1. The arithmetic is done in at least float32 (under autocast too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def spline_params_count(bins: int) -> int:
    """Unconstrained parameters per transformed value: K widths, K heights, K - 1 inner derivatives."""
    return 3 * bins - 1


def rq_knots(params: Tensor, bound: float, slope: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """``params [..., 3K - 1]`` (widths, heights, derivatives) -> knots x^k, y^k and derivatives d^k, each
    ``[..., K + 1]``, with x^0 = y^0 = -B, x^K = y^K = B and d^0 = d^K = 1."""
    xk, yk, dk = _knot_table(params, bound, slope).unbind(-2)
    return xk, yk, dk


def _knot_table(params: Tensor, bound: float, slope: float) -> Tensor:
    """:func:`rq_knots` stacked: ``[..., 3, K + 1]`` (x^k, y^k, d^k)."""
    k = (params.shape[-1] + 1) // 3
    log_slope = math.log(slope)
    # both soft clips in one pass: v / (1 + |v / c|), c = log(slope) / 2 (widths, heights), log(slope) (derivatives)
    c = params.new_full((3 * k - 1,), log_slope / 2)
    c[2 * k:] = log_slope
    wh, d = (params / (1 + (params / c).abs())).split([2 * k, k - 1], dim=-1)
    # the softmaxes of the widths and of the heights written out (torch.softmax over a last dimension of a
    # few bins is ~4x slower on CPU); the soft-clipped values lie within |log(slope)| / 2 of 0, so exp
    # needs no max-shift unless that reaches float32's overflow (exp(88))
    shift = -log_slope / 2 > 80
    e = rearrange(wh - wh.amax(-1, keepdim=True) if shift else wh, "... (two k) -> ... two k", two=2).exp()
    knots = bound * (2 * torch.cumsum(F.pad(e / e.sum(-1, keepdim=True), (1, 0)), -1) - 1)  # zuko's arithmetic
    return torch.cat([knots, F.pad(d, (1, 1)).exp()[..., None, :]], -2)


def _bin(knots: Tensor, v: Tensor) -> Tensor:
    """The bin index k in 0..K-1 of v (already in [knots[0], knots[K]]): [..., 1]."""
    return (v[..., None] >= knots[..., 1:-1]).sum(-1, keepdim=True)


def _at_bin(table: Tensor, k: Tensor) -> Tensor:
    """``table [..., T, K + 1]`` (T knot tables, broadcast to k's batch) at knots k and k + 1 of
    ``k [..., 1]``: [..., T, 2], one gather for all tables."""
    index = torch.cat([k, k + 1], -1)[..., None, :]
    shape = (*index.shape[:-2], table.shape[-2])
    return table.expand(*shape, table.shape[-1]).gather(-1, index.expand(*shape, 2))


def rq_spline(x: Tensor, params: Tensor, bound: float, inverse: bool = False,
              slope: float = 1e-3) -> tuple[Tensor, Tensor]:
    """The spline g elementwise (or g^{-1} when ``inverse``) on x [...] with ``params [..., 3K - 1]``:
    (y [...], log|g'| [...] (or log|(g^{-1})'|)); the identity with log-derivative 0 outside (-B, B).
    y has x's dtype, log|g'| at least float32 (it enters a log-determinant)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    # elementwise ops only: autocast leaves them in this dtype (it lowers matmuls and convolutions); on a
    # few bins each op's cost is mostly its dispatch, so the formulas are written with as few ops as they need
    v, p = x.to(dtype), params.to(dtype)
    table = _knot_table(p, bound, slope)
    inside = (v > -bound) & (v < bound)
    vc = v.clamp(-bound, bound)  # outside values go through a valid bin too (no NaN in the unused branch)
    k = _bin(table[..., 1 if inverse else 0, :], vc)
    x0, x1, y0, y1, d0, d1 = _at_bin(table, k).flatten(-2).unbind(-1)
    w, h = x1 - x0, y1 - y0
    s = h / w
    c2 = d0 + d1 - 2 * s  # the denominator's xi (1 - xi) coefficient
    if inverse:
        dy = vc - y0
        a = torch.addcmul(h * (s - d0), dy, c2)
        b = torch.addcmul(h * d0, dy, c2, value=-1)
        c = -s * dy
        xi = (2 * c / (-b - (b.square() - 4 * a * c).clamp_min(0).sqrt())).clamp(0, 1)
        out = torch.addcmul(x0, xi, w)
    else:
        xi = ((vc - x0) / w).clamp(0, 1)
    sq, one_minus = xi.square(), 1 - xi
    xi1 = xi * one_minus
    denom = torch.addcmul(s, c2, xi1)
    if not inverse:
        out = torch.addcmul(y0, h, torch.addcmul(d0 * xi1, s, sq) / denom)
    # log g' = log(s^2 [d1 xi^2 + 2 s xi (1 - xi) + d0 (1 - xi)^2] / denom^2), one log
    num = torch.addcmul(torch.addcmul(d1 * sq, d0, one_minus.square()), s, xi1, value=2)
    log_grad = torch.log(num * (s / denom).square())
    log_grad = -log_grad if inverse else log_grad
    y = torch.where(inside, out, v)
    return y.to(x.dtype), log_grad.masked_fill(~inside, 0.0)
