"""Dequantization: a density model of continuous y for discrete data x (Theis et al. 2016, Sec. 3.1;
Ho et al. 2019, Flow++, Sec. 3.1).

Data with ``bins`` evenly spaced levels in ``data_range`` (lo, hi) (8-bit images: 256 levels in [-1, 1];
sklearn's digits at 8x8: 17 levels 0..16, ``x / 8 - 1``) have a probability P(x), not a density.
Level k of a value is spread over its bin of width w = (hi - lo) / bins, y = lo + (k + u) w with
u in [0, 1)^D drawn from a dequantizer q(u | x), and for any density p of y (Flow++, Eq. 11)

    log P(x) = log int_[0,1)^D p(y(u)) w^D du >= E_q[log p(y) - log q(u | x)] + D log w,

the bin-count term D log w = -D log(bins / (hi - lo)) (openai/glow's ``-log(n_bins) * D`` for data in
[0, 1); glow-pytorch issue 17) making the bound one on the *discrete* data, in bits/dim
-(bound) / (D log 2). Uniform dequantization takes q = U[0, 1)^D (log q = 0); it is exact when p is
constant on every bin. Variational dequantization (Flow++, Sec. 3.1) learns q(u | x): u = sigmoid(v),
v = g^{-1}(eps; x), eps ~ N(0, I), with g a flow whose conditioners see x (conditional couplings), trained
jointly with p on the same bound; with S draws the importance-weighted bound
log (1/S) sum_s p(y_s) w^D / q(u_s | x) (Burda et al. 2016) is tighter and still a lower bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.errors import ShapeError
from genlab.metrics.likelihood import _levels, normal_log_prob
from genlab.models.flows.base import FlowChain, FlowTransform, sum_except_batch
from genlab.models.flows.couplings import AffineCoupling
from genlab.models.flows.normalization import ActNorm


class UniformDequantization(nn.Module):
    """``forward(x, generator) -> (y, log q(u | x) [B])`` with u ~ U[0, 1)^D (log q = 0): x [B, ...] on the
    ``bins`` levels of ``data_range``, y [B, ...] in [lo, hi). ``log_bin_width`` = log w."""

    def __init__(self, bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        lo, hi = data_range
        if bins < 2 or not hi > lo:
            raise ValueError(f"dequantization: need bins >= 2 levels and data_range (lo, hi) with hi > lo, got "
                             f"bins={bins}, data_range={data_range}")
        self.bins, self.data_range = bins, (float(lo), float(hi))

    @property
    def log_bin_width(self) -> float:
        """log w, w = (hi - lo) / bins: the width of one level's bin."""
        return math.log((self.data_range[1] - self.data_range[0]) / self.bins)

    def noise(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """u [B, ...] in [0, 1)^D and log q(u | x) [B]."""
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return u, x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        k = _levels(x, self.bins, self.data_range).to(x.dtype)
        u, log_q = self.noise(x, generator)
        lo = self.data_range[0]
        return lo + (k + u) * math.exp(self.log_bin_width), log_q


class VariationalDequantization(UniformDequantization):
    """Flow++'s variational dequantization: u = sigmoid(g^{-1}(eps; x)), eps ~ N(0, I), g = ``transforms``
    (a chain on items of x's shape whose conditioners take x as their context: ``context`` = x's channels
    or features); log q(u | x) = log N(eps) - log|det dv/deps| - sum log sigmoid'(v). Without
    ``transforms``, :meth:`default` builds one for items of ``shape``."""

    def __init__(self, transforms: list[FlowTransform], bins: int = 256,
                 data_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__(bins, data_range)
        if not transforms:
            raise ValueError("VariationalDequantization: needs at least one transform (a flow for q(u | x))")
        self.flow = FlowChain(transforms)

    @classmethod
    def default(cls, shape: tuple[int, ...], steps: int = 4, hidden: int = 32, bins: int = 256,
                data_range: tuple[float, float] = (-1.0, 1.0)) -> VariationalDequantization:
        """``steps`` checkerboard affine couplings (alternating parity) conditioned on x, each after an
        actnorm, on items of ``shape`` ([D] or [C, H, W])."""
        if steps < 1 or hidden < 1:
            raise ValueError(f"VariationalDequantization: steps and hidden must be >= 1, got {steps}, {hidden}")
        shape = list(shape)
        transforms: list[FlowTransform] = []
        for i in range(steps):
            transforms += [ActNorm(shape[0]), AffineCoupling(shape, "checkerboard", i % 2, hidden, context=shape[0])]
        return cls(transforms, bins, data_range)

    def noise(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if x.ndim < 2:
            raise ShapeError(f"VariationalDequantization: expected x: [B, ...], got {list(x.shape)}")
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        v, logdet = self.flow.inverse(eps, x)  # log|det dv/deps|
        log_q_v = normal_log_prob(eps) - logdet
        log_sigmoid_grad = F.logsigmoid(v) + F.logsigmoid(-v)  # log du/dv of u = sigmoid(v)
        return torch.sigmoid(v), log_q_v - sum_except_batch(log_sigmoid_grad)


def dequantized_log_likelihood(log_prob, dequantizer: UniformDequantization, x: Tensor,
                               generator: torch.Generator | None = None, samples: int = 1) -> Tensor:
    """A lower bound on log P(x) [B] nats of discrete x [B, ...]: with ``samples`` S draws of u ~ q(u | x),
    log (1/S) sum_s exp(log p(y_s) - log q(u_s | x)) + D log w; S = 1 is the variational bound (the
    training loss), S > 1 the importance-weighted one. ``log_prob``: y [B, ...] -> log p(y) [B]."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    terms = []
    for _ in range(samples):
        y, log_q = dequantizer(x, generator)
        terms.append(log_prob(y) - log_q)
    log_w = torch.stack(terms).logsumexp(0) - math.log(samples)
    return log_w + x[0].numel() * dequantizer.log_bin_width
