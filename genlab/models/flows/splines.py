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
    k = (params.shape[-1] + 1) // 3
    wh, d = params.split([2 * k, k - 1], dim=-1)
    log_slope = math.log(slope)
    wh = wh / (1 + (2 * wh / log_slope).abs())
    d = d / (1 + (d / log_slope).abs())
    # the softmaxes of the widths and of the heights written out (torch.softmax over a last dimension of a
    # few bins is ~4x slower on CPU); the soft-clipped values lie within |log(slope)| / 2 of 0, so exp
    # needs no max-shift unless that reaches float32's overflow (exp(88))
    shift = -log_slope / 2 > 80
    e = rearrange(wh - wh.amax(-1, keepdim=True) if shift else wh, "... (two k) -> ... two k", two=2).exp()
    knots = bound * (2 * torch.cumsum(F.pad(e / e.sum(-1, keepdim=True), (1, 0)), -1) - 1)
    xk, yk = knots.unbind(-2)
    return xk, yk, torch.exp(F.pad(d, (1, 1)))


def _bin(knots: Tensor, v: Tensor) -> Tensor:
    """The bin index k in 0..K-1 of v (already in [knots[0], knots[K]]): [..., 1]."""
    return (v[..., None] >= knots[..., 1:-1]).sum(-1, keepdim=True)


def _gather(k: Tensor, *tables: Tensor) -> list[Tensor]:
    """Values at knot k and k + 1 of each table: [lo, hi, lo, hi, ...], each [...]."""
    out = []
    for t in tables:
        t = t.expand(*k.shape[:-1], t.shape[-1])
        out += [t.gather(-1, k)[..., 0], t.gather(-1, k + 1)[..., 0]]
    return out


def rq_spline(x: Tensor, params: Tensor, bound: float, inverse: bool = False,
              slope: float = 1e-3) -> tuple[Tensor, Tensor]:
    """The spline g elementwise (or g^{-1} when ``inverse``) on x [...] with ``params [..., 3K - 1]``:
    (y [...], log|g'| [...] (or log|(g^{-1})'|)); the identity with log-derivative 0 outside (-B, B).
    y has x's dtype, log|g'| at least float32 (it enters a log-determinant)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    # elementwise ops only: autocast leaves them in this dtype (it lowers matmuls and convolutions)
    v, p = x.to(dtype), params.to(dtype)
    xk, yk, dk = rq_knots(p, bound, slope)
    inside = (v > -bound) & (v < bound)
    vc = v.clamp(-bound, bound)  # outside values go through a valid bin too (no NaN in the unused branch)
    k = _bin(yk if inverse else xk, vc)
    x0, x1, y0, y1, d0, d1 = _gather(k, xk, yk, dk)
    w, s = x1 - x0, (y1 - y0) / (x1 - x0)
    if inverse:
        dy = vc - y0
        a = (y1 - y0) * (s - d0) + dy * (d0 + d1 - 2 * s)
        b = (y1 - y0) * d0 - dy * (d0 + d1 - 2 * s)
        c = -s * dy
        xi = (2 * c / (-b - (b.square() - 4 * a * c).clamp_min(0).sqrt())).clamp(0, 1)
        out = x0 + xi * w
    else:
        xi = ((vc - x0) / w).clamp(0, 1)
        out = y0 + (y1 - y0) * (s * xi.square() + d0 * xi * (1 - xi)) / (s + (d0 + d1 - 2 * s) * xi * (1 - xi))
    denom = s + (d0 + d1 - 2 * s) * xi * (1 - xi)
    log_grad = 2 * s.log() + torch.log(d1 * xi.square() + 2 * s * xi * (1 - xi) + d0 * (1 - xi).square()) - 2 * denom.log()
    log_grad = -log_grad if inverse else log_grad
    y = torch.where(inside, out, v)
    return y.to(x.dtype), torch.where(inside, log_grad, torch.zeros_like(log_grad))
