"""The quantizer interface: ``quantized, indices, losses = q(z)`` and ``q.codes(indices)``.

Layout. ``z`` is channel-first like an autoencoder's latent, ``[B, D, ...]`` (``[B, D, H, W]``,
``[B, D, T]``, or ``[B, D]``); ``channel_last=True`` takes ``[B, ..., D]`` (a sequence ``[B, N, D]``).
``quantized`` has the layout of ``z`` and its memory format (contiguous for a contiguous ``z``: the vectors
are moved back, not left as a channels-last view, so the layers after it run the kernels they would run on
``z``); ``indices`` is ``[B, ...]`` (the positions of ``z`` without D), followed by ``index_shape`` for
composite quantizers (``[B, ..., Q]`` for Q residual stages, ``[B, ..., G]`` for G groups). ``losses`` is a
dict of weighted scalar terms (``commitment``, ``codebook``, ``entropy``): the quantizer's contribution to
the training loss is ``sum(losses.values())``.

Inside, every quantizer works on vectors ``h: [B, N, d]`` in its code space: ``project_in`` maps
``D -> d`` (a linear map when ``codebook_dim`` differs from ``dim``, as in ViT-VQGAN, Yu et al. 2022), then
``vectors(h)`` = ``prepare`` (a normalisation or bound the encoder's gradient passes through), ``quantize``
(the nearest code, its index and the losses) and the gradient estimator (straight-through by default), and
``project_out`` maps back ``d -> D``. When the vectors need no gradient (``torch.no_grad()``, or neither ``z``
nor a projection requires one), ``quantized`` is exactly the codes: ``q(z).quantized == q.codes(q(z).indices)``
(in training mode a codebook may change during the call: ``quantized`` holds the codes from before).
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
from einops import pack, rearrange, unpack
from torch import Tensor, nn

from genlab.core.errors import ShapeError
from genlab.core.registry import register_namespace
from genlab.models.quantizers.estimators import straight_through


class Quantized(NamedTuple):
    """What a quantizer returns: ``quantized`` (the layout of ``z``), ``indices`` (long) and ``losses``."""

    quantized: Tensor
    indices: Tensor
    losses: dict[str, Tensor]


class Quantizer(nn.Module):
    """Base class: ``dim`` channels in, codes of ``codebook_dim`` (default ``dim``) inside; see the module
    docstring for the layout. Subclasses implement :meth:`quantize` and :meth:`lookup`, and may override
    :meth:`prepare`, :meth:`estimate`, :meth:`vectors` and :attr:`index_shape`."""

    def __init__(self, dim: int, codebook_dim: int | None = None, channel_last: bool = False) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("codebook_dim", codebook_dim)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{type(self).__name__}: {name} must be an int, got {value!r}")
        self.dim, self.codebook_dim, self.channel_last = dim, codebook_dim or dim, channel_last
        projected = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if projected else nn.Identity()

    @property
    def index_shape(self) -> tuple[int, ...]:
        """The trailing dimensions of ``indices`` after the positions: ``()`` for one code per vector."""
        return ()

    @property
    def projected(self) -> bool:
        return not isinstance(self.project_in, nn.Identity)

    def prepare(self, h: Tensor) -> Tensor:
        """The vectors that are quantized and from which the gradient is estimated (identity here)."""
        return h

    def quantize(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``h: [B, N, d]`` (prepared) -> codes ``[B, N, d]`` (no estimator), indices ``[B, N, *index_shape]``,
        losses. In training mode this is also where a codebook's statistics are updated."""
        raise NotImplementedError

    def lookup(self, indices: Tensor) -> Tensor:
        """``indices: [B, N, *index_shape] -> [B, N, d]``: the codes, in code space."""
        raise NotImplementedError

    def estimate(self, h: Tensor, q: Tensor) -> Tensor:
        """The value ``q`` with a gradient for ``h``: straight-through (van den Oord et al. 2017, Sec. 3.1)."""
        return straight_through(h, q)

    def vectors(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``h: [B, N, d]`` in code space -> (quantized ``[B, N, d]``, indices, losses). The quantization runs
        in the precision of ``h``, not autocast's: nearest codes and statistics from bf16 matmuls would drift."""
        with no_autocast(h):
            h = self.prepare(h)
            q, indices, losses = self.quantize(h)
        if torch.is_grad_enabled() and h.requires_grad:
            q = self.estimate(h, q)
        return q, indices, losses

    def forward(self, z: Tensor) -> Quantized:
        if z.ndim < 2 or z.shape[-1 if self.channel_last else 1] != self.dim:
            where = "[B, ..., D]" if self.channel_last else "[B, D, ...]"
            raise ShapeError(f"{type(self).__name__}: expected z: {where} with D = {self.dim}, got {list(z.shape)}"
                             f"{'' if self.channel_last else '; pass channel_last=True for [B, N, D]'}")
        x, ps = pack([z if self.channel_last else rearrange(z, "b d ... -> b ... d")], "b * d")
        q, indices, losses = self.vectors(self.project_in(x))
        [indices] = unpack(indices, ps, "b * " + " ".join(f"i{k}" for k in range(len(self.index_shape))))
        quantized = self._layout(self.project_out(q), ps)
        return Quantized(quantized if not z.is_contiguous() else quantized.contiguous(), indices, losses)

    def codes(self, indices: Tensor) -> Tensor:
        """``indices: [B, ..., *index_shape]`` -> quantized vectors in the layout of ``z`` (``[B, D, ...]``)."""
        k = len(self.index_shape)
        if indices.ndim < 1 + k or tuple(indices.shape[indices.ndim - k:]) != self.index_shape:
            raise ShapeError(f"{type(self).__name__}.codes: expected indices: [B, ...{', ' if k else ''}"
                             f"{', '.join(map(str, self.index_shape))}], got {list(indices.shape)}")
        flat, ps = pack([indices.long()], "b * " + " ".join(f"i{i}" for i in range(k)))
        return self._layout(self.project_out(self.lookup(flat)), ps).contiguous()

    def _layout(self, x: Tensor, ps: list) -> Tensor:
        [x] = unpack(x, ps, "b * d")
        return x if self.channel_last else rearrange(x, "b ... d -> b d ...")

    def reset_parameters(self) -> None:
        """Draw fresh parameters (the projections here): what a replicated stage or group starts from."""
        for layer in (self.project_in, self.project_out):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


def no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """A context without autocast on ``x``'s device (where autocast exists there)."""
    if x.device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def add_losses(into: dict[str, Tensor], losses: dict[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """``into[k] += scale * losses[k]`` for every key (a missing key counts as 0); returns ``into``."""
    for k, v in losses.items():
        into[k] = into[k] + scale * v if k in into else scale * v
    return into


def replicate(quantizer: Quantizer | list[Quantizer], n: int | None, owner: str) -> list[Quantizer]:
    """The stages (or groups) of a composite quantizer: a list as given, or ``n`` copies of one quantizer,
    each with fresh parameters. They must work in their own code space: no projections of their own."""
    if isinstance(quantizer, Quantizer):
        quantizer = [quantizer] + [copy.deepcopy(quantizer) for _ in range((n or 1) - 1)]
        for q in quantizer[1:]:
            q.reset_parameters()
    elif n is not None and n != len(quantizer):
        raise ValueError(f"{owner}: {len(quantizer)} quantizers given but n = {n}; give one quantizer and n, or a list")
    if not quantizer or not all(isinstance(q, Quantizer) for q in quantizer):
        raise TypeError(f"{owner}: expected a Quantizer or a non-empty list of them, got {quantizer!r}")
    for i, q in enumerate(quantizer):
        if q.projected:
            raise ValueError(f"{owner}: quantizer {i} projects {q.dim} -> {q.codebook_dim} itself; build it with "
                             f"dim = {q.codebook_dim} and no codebook_dim, and give the projection to {owner} "
                             "(dim=...)")
    return list(quantizer)


register_namespace("quantizer", Quantizer, "quantizers: z -> (quantized, indices, losses), codes(indices)")
