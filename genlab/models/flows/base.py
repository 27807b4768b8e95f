"""The flow transform interface and the chain of transforms (Dinh et al. 2015; Rezende and Mohamed 2015).

A transform maps data to noise, ``forward(x, cond) -> (z, log|det dz/dx|)``, and back,
``inverse(z, cond) -> (x, log|det dx/dz|)``, both log-determinants per sample, ``[B]``. A chain
f = f_K o ... o f_1 gives, by the chain rule, log|det J_f(x)| = sum_k log|det J_{f_k}(x_{k-1})|,
and its inverse runs the steps in reverse order. ``cond`` is passed to every step (most ignore it).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from genlab.core.bounds import Range
from genlab.core.errors import ShapeError
from genlab.core.registry import register, register_namespace


Parity = Annotated[int, Range(ge=0, le=1)]  # which of two complementary parts a coupling keeps


class FlowTransform(nn.Module):
    """Base of invertible transforms: ``forward(x [B, ...], cond) -> (z [B, ...], logdet [B])`` and
    ``inverse(z, cond) -> (x, logdet [B])`` with inverse logdet = -(forward logdet at x)."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_only(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """x = f^{-1}(z) [B, ...] without its log-determinant (what sampling needs): :meth:`inverse`'s first
        output here; a transform whose log-determinant costs extra work (a CNF's divergence integral)
        skips that work."""
        return self.inverse(z, cond)[0]


def logdet_dtype(x: Tensor) -> torch.dtype:
    """The dtype of log-determinants of x: x's, at least float32 (under float16 / bfloat16 autocast a
    sum over thousands of log-scales in half precision would lose the likelihood's digits)."""
    return torch.promote_types(x.dtype, torch.float32)


def sum_except_batch(x: Tensor) -> Tensor:
    """``x [B, ...] -> [B]``: the sum over every dimension but the first (a log-determinant), in at
    least float32."""
    return x.flatten(1).to(logdet_dtype(x)).sum(1)


def batch_logdet(value: Tensor, x: Tensor) -> Tensor:
    """A log-determinant that does not depend on the sample (``value``: a scalar) as ``[B]`` on x's device,
    in at least float32."""
    return value.to(logdet_dtype(x)).expand(x.shape[0])


def zero_logdet(x: Tensor) -> Tensor:
    """log|det| = 0 of a volume-preserving step as ``[B]`` (in at least float32)."""
    return torch.zeros(x.shape[0], dtype=logdet_dtype(x), device=x.device)


def check_channels(x: Tensor, features: int, who: str) -> None:
    """ShapeError unless ``x`` is [B, features] (vectors) or [B, features, H, W] (images)."""
    if x.ndim not in (2, 4) or x.shape[1] != features:
        raise ShapeError(f"{who}: expected x: [B, {features}] or [B, {features}, H, W], got {list(x.shape)}")


@register("flow_transform", "chain")
class FlowChain(FlowTransform):
    """f = f_K o ... o f_1: ``forward`` runs ``transforms`` in order and sums their logdets; ``inverse``
    runs the inverses in reverse order (their logdets summed too)."""

    def __init__(self, transforms: list[FlowTransform]) -> None:
        super().__init__()
        if not all(isinstance(t, FlowTransform) for t in transforms):
            bad = next(type(t).__name__ for t in transforms if not isinstance(t, FlowTransform))
            raise TypeError(f"FlowChain: every transform must be a FlowTransform, got {bad}")
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zero_logdet(x)
        for t in self.transforms:
            x, logdet = t(x, cond)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zero_logdet(z)
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z, cond)
            total = total + logdet
        return z, total

    def inverse_only(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        for t in reversed(self.transforms):
            z = t.inverse_only(z, cond)
        return z


register_namespace("flow_transform", FlowTransform, "invertible transforms of normalizing flows")
