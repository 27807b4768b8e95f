"""GLIGEN (Li et al. 2023, "GLIGEN: Open-Set Grounded Text-to-Image Generation") for genlab's UNet and DiT.

Grounding entities, each a box ``l = [x_min, y_min, x_max, y_max]`` (in [0, 1]) with a phrase embedding
``e`` (or a class label, embedded), become grounding tokens (the paper's grounding input)::

    h^e = MLP([e, Fourier(l)])

with ``Fourier`` the sin/cos features of NeRF (Mildenhall et al. 2020) at frequencies ``100^(k/F)``,
``k = 0 ... F-1``. Padding entities (mask 0) use learnt null features instead of ``e`` and
``Fourier(l)``. A gated self-attention layer, new in every transformer block right after its
self-attention, lets the visual tokens ``v`` attend to themselves and to the grounding tokens (Eq. 8,
with the gated feed-forward of the authors' code)::

    v <- v + beta tanh(gamma_attn) TS(SelfAttn(LN([v, Linear(h^e)])))
    v <- v + beta tanh(gamma_dense) FF(LN(v))

``TS`` keeps the visual tokens. ``gamma`` starts at 0, so an attached GLIGEN changes nothing until it
is trained; ``beta`` (``scale``) is the paper's scheduled sampling (1 for the first steps, then 0).
The backbone is not forked: its transformer blocks (the UNet's ``TransformerBlock``, the DiT's
``DiTBlock``) have an empty ``fuser`` slot, which ``attach`` fills and ``detach`` empties::

    gligen = GLIGEN(unet, embedding_dim=768).attach()
    with gligen.grounding(boxes, masks, embeddings):        # boxes [B, N, 4], masks [B, N], e [B, N, 768]
        out = unet(x, t, context=context)
    gligen.detach()

The tokens are computed once when the ``with`` block starts and read by every gated layer; with
gradient checkpointing the backward pass recomputes the blocks, so call ``backward`` inside the
``with`` block. Layout and names follow diffusers (``GLIGENTextBoundingboxProjection`` with
``feature_type="text-only"`` as ``position_net``, ``GatedSelfAttentionDense`` as ``fuser``):
``genlab.interop.gligen_weights`` converts a UNet with an attached GLIGEN from and to a diffusers
``UNet2DConditionModel`` of ``attention_type="gated"``. diffusers' "text-image" grounding (image
embeddings as entities) is not reproduced. An attached GLIGEN's parameters are also the backbone's
(``backbone.parameters()``): freeze the backbone before attaching if only GLIGEN is to be trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt, checked
from genlab.core.errors import ShapeError
from genlab.models.attention import MultiHeadAttention
from genlab.models.dit import DiT, DiTBlock
from genlab.models.unet import UNetEncoder
from genlab.models.unet_blocks import FeedForward, LayerNorm32, TransformerBlock


def box_fourier_features(boxes: Tensor, freqs: int) -> Tensor:
    """``Fourier(l)``: ``boxes: [B, N, 4] -> [B, N, 8 freqs]``, ``sin(w_k l_c)`` and ``cos(w_k l_c)`` for
    ``w_k = 100^(k / freqs)``, ordered (frequency, sin/cos, coordinate) as diffusers'
    ``get_fourier_embeds_from_boundingbox``."""
    w = 100 ** (torch.arange(freqs, device=boxes.device) / freqs)
    angles = boxes.unsqueeze(-1) * w.to(boxes.dtype)  # [B, N, 4, F]
    return rearrange(torch.stack((angles.sin(), angles.cos()), dim=-1), "b n c f s -> b n (f s c)")


@checked
class PositionNet(nn.Module):
    """Grounding tokens ``h^e = MLP([e, Fourier(l)])``: ``(boxes: [B, N, 4], masks: [B, N] (1: an
    entity, 0: padding), embeddings: [B, N, embedding_dim] or labels: [B, N] long) -> [B, N, token_dim]``.
    The MLP is Linear, SiLU, Linear, SiLU, Linear with ``hidden`` units; padding entities take the learnt
    ``null_positive_feature`` and ``null_position_feature``. With ``num_classes``, entities are classes,
    embedded to ``embedding_dim`` by ``class_embed`` (the paper's box + class grounding)."""

    def __init__(self, embedding_dim: PositiveInt, token_dim: PositiveInt, fourier_freqs: PositiveInt = 8,
                 hidden: PositiveInt = 512, num_classes: PositiveInt | None = None) -> None:
        super().__init__()
        self.embedding_dim, self.fourier_freqs, self.num_classes = embedding_dim, fourier_freqs, num_classes
        position_dim = 8 * fourier_freqs  # sin and cos of 4 coordinates
        self.class_embed = nn.Embedding(num_classes, embedding_dim) if num_classes else None
        self.linears = nn.Sequential(nn.Linear(embedding_dim + position_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, token_dim))
        self.null_positive_feature = nn.Parameter(torch.zeros(embedding_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, boxes: Tensor, masks: Tensor, embeddings: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        if (embeddings is None) == (labels is None) or (labels is not None) != (self.class_embed is not None):
            need = "labels (built with num_classes)" if self.class_embed is not None else "embeddings"
            raise ValueError(f"PositionNet: give {need}, not "
                             f"{'both' if embeddings is not None and labels is not None else 'the other'}")
        if boxes.ndim != 3 or boxes.shape[2] != 4 or masks.shape != boxes.shape[:2]:
            raise ShapeError(f"PositionNet: expected boxes: [B, N, 4] and masks: [B, N], got {list(boxes.shape)} "
                             f"and {list(masks.shape)}")
        e = self.class_embed(labels) if self.class_embed is not None else embeddings
        if e.shape != (*boxes.shape[:2], self.embedding_dim):
            raise ShapeError(f"PositionNet: expected embeddings: [B, N, {self.embedding_dim}] = "
                             f"{[*boxes.shape[:2], self.embedding_dim]}, got {list(e.shape)}")
        m = masks.unsqueeze(-1).to(e.dtype)
        position = box_fourier_features(boxes, self.fourier_freqs)
        position = position * m + (1 - m) * self.null_position_feature
        e = e * m + (1 - m) * self.null_positive_feature
        return self.linears(torch.cat([e, position], dim=-1))


@dataclass
class Grounding:
    """What the gated layers of one GLIGEN read during a call: the tokens ``[B, M, token_dim]`` (None:
    no grounding, the layers are the identity) and ``beta``."""

    tokens: Tensor | None = None
    scale: float = 1.0


class GatedSelfAttention(nn.Module):
    """Gated self-attention over visual and grounding tokens (Eq. 8, see the module docstring):
    ``x: [B, N, dim], tokens: [B, M, token_dim] -> [B, N, dim]``; ``heads`` heads, GEGLU feed-forward.
    Called as ``fuser(x)`` by a block, it reads ``tokens`` and ``scale`` from ``grounding`` (set by its
    GLIGEN); without tokens it is the identity."""

    def __init__(self, dim: int, token_dim: int, heads: int) -> None:
        super().__init__()
        self.linear = nn.Linear(token_dim, dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.norm_1, self.norm_2 = LayerNorm32(dim), LayerNorm32(dim)
        self.alpha_attn = nn.Parameter(torch.zeros(()))  # gamma of Eq. 8
        self.alpha_dense = nn.Parameter(torch.zeros(()))
        self.grounding: Grounding | None = None

    def forward(self, x: Tensor, tokens: Tensor | None = None, scale: float = 1.0) -> Tensor:
        if tokens is None and self.grounding is not None:
            tokens, scale = self.grounding.tokens, self.grounding.scale
        if tokens is None:
            return x
        if tokens.ndim != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != self.linear.in_features:
            raise ShapeError(f"GLIGEN: expected grounding tokens [B, M, {self.linear.in_features}] with B = "
                             f"{x.shape[0]} (the backbone's batch), got {list(tokens.shape)}")
        n = x.shape[1]
        h = self.attn(self.norm_1(torch.cat([x, self.linear(tokens)], dim=1)))[:, :n]
        x = x + scale * self.alpha_attn.tanh() * h
        return x + scale * self.alpha_dense.tanh() * self.ff(self.norm_2(x))


@checked
class GLIGEN(nn.Module):
    """GLIGEN for ``backbone`` (a genlab UNet with cross-attention transformer blocks, or a DiT): a
    ``position_net`` (``PositionNet(embedding_dim, token_dim, fourier_freqs, hidden, num_classes)``) and
    one ``GatedSelfAttention`` per transformer block (``fusers``, in the backbone's module order), on the
    backbone's device and dtype. ``token_dim`` defaults to the backbone's ``cross_attention_dim`` (the
    UNet's; diffusers' choice), else the DiT's width. ``attach`` puts the gated layers into the blocks'
    ``fuser`` slots, ``detach`` takes them out; ``grounding(...)`` sets the tokens for the calls inside
    it. Ranges: embedding_dim, token_dim, fourier_freqs, hidden, num_classes >= 1."""

    def __init__(self, backbone: UNetEncoder | DiT, embedding_dim: PositiveInt, token_dim: PositiveInt | None = None,
                 fourier_freqs: PositiveInt = 8, hidden: PositiveInt = 512,
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, (UNetEncoder, DiT)):
            raise TypeError(f"GLIGEN: expected a genlab UNet or DiT, got {type(backbone).__name__}")
        blocks = [m for m in backbone.modules() if isinstance(m, (TransformerBlock, DiTBlock))]
        if not blocks:
            raise ValueError("GLIGEN: the UNet has no transformer blocks; build it with cross_attention_dim and "
                             "attention_levels (GLIGEN's gated self-attention sits in the cross-attention blocks)")
        if token_dim is None:  # a UNet with transformer blocks cross-attends
            token_dim = backbone.cross_attention_dim or getattr(backbone, "hidden", None)
        self._blocks = blocks  # a plain list: the backbone's modules are not registered here
        self.position_net = PositionNet(embedding_dim, token_dim, fourier_freqs, hidden, num_classes)
        self.state = Grounding()
        self.fusers = nn.ModuleList()
        for block in blocks:
            attn = block.attn_1 if isinstance(block, TransformerBlock) else block.attn
            fuser = GatedSelfAttention(attn.to_q.in_features, token_dim, attn.heads)
            fuser.attn.backend, fuser.grounding = attn.backend, self.state
            self.fusers.append(fuser)
        param = next(backbone.parameters())
        self.to(device=param.device, dtype=param.dtype)

    @property
    def attached(self) -> bool:
        """Whether the gated layers are in the backbone's blocks."""
        return all(block.fuser is fuser for block, fuser in zip(self._blocks, self.fusers))

    def attach(self) -> GLIGEN:
        """Put the gated layers into the backbone's ``fuser`` slots (ValueError if one is taken)."""
        taken = [i for i, block in enumerate(self._blocks) if block.fuser is not None and block.fuser is not
                 self.fusers[i]]
        if taken:
            raise ValueError(f"GLIGEN: transformer blocks {taken} already hold another fuser; detach it first")
        for block, fuser in zip(self._blocks, self.fusers):
            block.fuser = fuser
        return self

    def detach(self) -> GLIGEN:
        """Empty the backbone's ``fuser`` slots this GLIGEN filled: the backbone is as it was."""
        for block, fuser in zip(self._blocks, self.fusers):
            if block.fuser is fuser:
                block.fuser = None
        return self

    def tokens(self, boxes: Tensor, masks: Tensor, embeddings: Tensor | None = None,
               labels: Tensor | None = None) -> Tensor:
        """The grounding tokens ``[B, N, token_dim]`` (``PositionNet``)."""
        return self.position_net(boxes, masks, embeddings, labels)

    @contextmanager
    def grounding(self, boxes: Tensor, masks: Tensor, embeddings: Tensor | None = None,
                  labels: Tensor | None = None, scale: float = 1.0) -> Iterator[Tensor]:
        """Within the block, the attached backbone attends to the grounding tokens of these entities
        (see ``PositionNet``), with ``beta = scale``; yields the tokens. The previous state is restored
        on exit."""
        previous = (self.state.tokens, self.state.scale)
        tokens = self.tokens(boxes, masks, embeddings, labels)
        self.state.tokens, self.state.scale = tokens, scale
        try:
            yield tokens
        finally:
            self.state.tokens, self.state.scale = previous
