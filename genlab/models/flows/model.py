"""A normalizing flow: a base distribution and a chain of invertible transforms (Rezende and Mohamed
2015; Dinh et al. 2017, Sec. 3.1). With z = f(x),

    log p_X(x | c) = log p_Z(f(x) | c) + log|det df/dx|,

and sampling draws z ~ p_Z(. | c) and returns f^{-1}(z). p_Z is N(0, I); with ``num_classes`` it is
N(mu_c, diag(sigma_c^2)) with a learned (mu_c, log sigma_c) per class, zero-initialised (as Glow's
class-conditional prior, Kingma and Dhariwal 2018). ``temperature`` T scales the base's std
(Glow's reduced-temperature samples: p_Z with std T sigma).

The same ``cond`` goes to every transform: those built with ``num_classes`` condition their networks on
the labels too (a conditional flow, :mod:`.context`), and they need the flow's ``num_classes``; those
built with ``context`` F take a context tensor [B, F, ...] as cond (then the base is N(0, I)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeFloat, PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.metrics.likelihood import bits_per_dim, normal_log_prob
from genlab.models.flows.base import FlowChain, FlowTransform
from genlab.models.flows.context import Context


@register("model", "flow")
class Flow(nn.Module):
    """``forward(x [B, *shape], cond) -> (z, logdet [B])``, ``inverse(z, cond) -> (x, logdet)``,
    ``log_prob(x, cond) -> [B]`` nats, ``sample(n, cond, generator, temperature) -> [n, *shape]`` and
    ``bits_per_dim(x, cond) -> [B]``. ``shape``: one item's [D] or [C, H, W]; ``transforms``: the chain
    from data to noise; ``num_classes``: a class-conditional base (``cond``: class labels [B] long).
    Ranges: shape's sizes and num_classes >= 1."""

    def __init__(self, shape: list[PositiveInt], transforms: list[FlowTransform],
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__()
        if not shape:
            raise ValueError("Flow: shape must be one item's shape, [D] or [C, H, W], got []")
        self.shape, self.num_classes = tuple(shape), num_classes
        self.chain = FlowChain(transforms)
        contexts = [m for m in self.chain.modules() if isinstance(m, Context) and m.features]
        wrong = [m.who for m in contexts if m.num_classes is not None and m.num_classes != num_classes]
        if wrong:
            raise ValueError(f"Flow: {wrong[0]} is conditioned on {contexts[0].num_classes} classes, the flow on "
                             f"num_classes={num_classes}; set the flow's num_classes to the transforms'")
        self.takes_context = any(m.num_classes is None for m in contexts)  # a context tensor as cond
        dims = self.dims
        self.prior = nn.Embedding(num_classes, 2 * dims) if num_classes is not None else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)

    @property
    def dims(self) -> int:
        """D: the number of values of one item."""
        return int(torch.Size(self.shape).numel())

    def _base(self, cond: Tensor | None, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma) of p_Z, each [n, *shape] (zeros without classes)."""
        if self.prior is None:
            if cond is not None and not self.takes_context:
                raise ValueError("Flow: cond (class labels) given, but the flow has num_classes=None and no "
                                 "transform takes a context")
            zero = torch.zeros((n, *self.shape), dtype=like.dtype, device=like.device)
            return zero, zero
        if cond is None or cond.shape != (n,) or cond.dtype != torch.long:
            got = None if cond is None else f"{cond.dtype} {list(cond.shape)}"
            raise ValueError(f"Flow: cond must be class labels, a long tensor [{n}] in 0..{self.num_classes - 1}, got {got}")
        mu, log_sigma = self.prior(cond.to(self.prior.weight.device)).to(like.dtype).chunk(2, dim=1)
        return mu.reshape(n, *self.shape), log_sigma.reshape(n, *self.shape)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ShapeError(f"Flow: expected x: [B, {', '.join(map(str, self.shape))}], got {list(x.shape)}")

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        return self.chain(x, cond)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z)
        return self.chain.inverse(z, cond)

    def base_log_prob(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """log p_Z(z | cond) = log N(z; mu_c, diag(sigma_c^2)): [B] nats."""
        mu, log_sigma = self._base(cond, z.shape[0], z)
        return normal_log_prob((z - mu) * (-log_sigma).exp()) - log_sigma.flatten(1).sum(1)

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """log p_X(x | cond) = log p_Z(f(x)) + log|det df/dx| (change of variables): [B] nats."""
        z, logdet = self(x, cond)
        return self.base_log_prob(z, cond) + logdet

    def bits_per_dim(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """-log p(x) / (D log 2) of continuous x [B, *shape]: [B] (discrete data: dequantise first, or use
        :func:`genlab.metrics.likelihood.bits_per_dim_of`)."""
        return bits_per_dim(self.log_prob(x, cond), self.dims)

    @torch.no_grad()
    def sample(self, n: int, cond: Tensor | None = None, generator: torch.Generator | None = None,
               temperature: NonNegativeFloat = 1.0) -> Tensor:
        """``n`` draws x = f^{-1}(mu_c + T sigma_c eps), eps ~ N(0, I) from ``generator`` (on its device;
        dtype the model's), ``cond``: class labels [n] with ``num_classes``: ``[n, *shape]``."""
        if n < 1 or temperature < 0:
            raise ValueError(f"Flow.sample: need n >= 1 and temperature >= 0, got n={n}, temperature={temperature}")
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        device = generator.device if generator is not None else (param.device if param is not None else None)
        eps = torch.randn((n, *self.shape), generator=generator, dtype=dtype, device=device)
        mu, log_sigma = self._base(cond, n, eps)
        return self.chain.inverse_only(mu + temperature * log_sigma.exp() * eps, cond)
