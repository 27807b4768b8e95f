"""Residual MLP backbone for vector data (2D toys, small latents).

A pre-norm residual MLP (He et al. 2016, "Identity mappings") conditioned like ADM's ResBlock
(Dhariwal and Nichol 2021): the time (+ class) embedding is projected and added inside every
block. Class labels use one extra "null" index for classifier-free guidance (Ho and Salimans 2022).
``concat_mlp`` is torchcfm's plain example MLP (the time appended to x), for like-for-like comparisons.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor, nn

from genlab.core.bounds import PositiveFloat, PositiveInt, Range
from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.layers import (SELU, Dropout, LabelEmbedding, TimeEmbeddingKind, TimestepEmbedding, batch_times,
                                  condition_embedding)


class ResidualBlock(nn.Module):
    """``h + Linear(Dropout(SiLU(Linear(LayerNorm(h)) + W emb)))``: ``h, emb: [B, hidden] -> [B, hidden]``."""

    def __init__(self, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.inner = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.out(self.inner(self.norm(h)) + self.emb(emb))


_OLD_KEYS = {"time_mlp.0.": "time_embed.linear_1.", "time_mlp.2.": "time_embed.linear_2.",
             "label_emb.": "label_embed.embedding."}


@register("model", "mlp")
class MLP(nn.Module):
    """Residual MLP ``(x: [B, dim], t: [B] or scalar, class_labels: [B] | None) -> [B, dim]``.

    ``t`` is the model time in whatever range the caller uses (e.g. 0..1000 or a log-sigma around
    -2..2); it is embedded unchanged with ``time_dim`` sinusoids and Linear-SiLU-Linear to ``hidden``
    (:class:`~genlab.models.layers.TimestepEmbedding`), or with ``time_embedding="fourier"`` with
    ``time_dim`` random Fourier features of scale ``fourier_scale`` (for times of order 1). With
    ``num_classes``, labels ``0..num_classes-1`` are classes and ``-1`` (or ``class_labels=None``) is
    the null class (index ``num_classes`` of :class:`~genlab.models.layers.LabelEmbedding`), added to
    the time embedding. ``interval_embedding=True`` makes a two-time model u(x, r, t) (MeanFlow): a second
    embedding of ``interval`` = t_in(t) - t_in(r), zero-initialised, is added too
    (:func:`~genlab.models.layers.condition_embedding`); ``guidance_embedding=True`` likewise embeds the
    guidance weight ``guidance_scale`` of a guidance-distilled student (Meng et al. 2023, Sec. 4.1). Ranges: dim, hidden, depth, num_classes >= 1; time_dim >= 2 (even for
    ``fourier``); dropout in [0, 1); fourier_scale > 0.
    """

    def __init__(
        self,
        dim: PositiveInt = 2,
        hidden: PositiveInt = 256,
        depth: PositiveInt = 4,
        time_dim: Annotated[int, Range(ge=2)] = 128,
        num_classes: PositiveInt | None = None,
        dropout: Dropout = 0.0,
        time_embedding: TimeEmbeddingKind = "sinusoidal",
        fourier_scale: PositiveFloat = 16.0,
        interval_embedding: bool = False,
        guidance_embedding: bool = False,
    ) -> None:
        super().__init__()
        if time_embedding == "fourier" and time_dim % 2:
            raise ValueError(f"MLP: time_dim must be even with time_embedding='fourier' (cos and sin pairs), "
                             f"got {time_dim}")
        self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
        self.time_embed = TimestepEmbedding(hidden, time_dim, kind=time_embedding, fourier_scale=fourier_scale)
        self.label_embed = LabelEmbedding(num_classes, hidden) if num_classes is not None else None
        self.interval_embed = self.time_embed.interval_twin() if interval_embedding else None
        self.takes_interval = interval_embedding  # a two-time network u(x, r, t)
        self.emb_act = nn.SiLU()
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        self.guidance_embed = self.time_embed.interval_twin() if guidance_embedding else None  # last: a seed's weights kept

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None,
                interval: Tensor | float | None = None, guidance_scale: Tensor | float | None = None) -> Tensor:
        """``x: [B, dim]``, ``t: [B]`` or scalar, ``class_labels: [B]`` long (-1 = null), ``interval``: [B] or
        scalar (two-time models only, see ``interval_embedding``), ``guidance_scale``: [B] or scalar
        (``guidance_embedding`` models) -> ``[B, dim]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"MLP: expected x: [B, dim] = [B, {self.dim}], got {list(x.shape)}")
        emb = self.emb_act(condition_embedding(self.time_embed, self.label_embed, x, t, class_labels, "MLP",
                                               self.interval_embed, interval, self.guidance_embed, guidance_scale))
        h = self.inp(x)  # [B, hidden]
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Also load checkpoints written before MLP used the shared layers, which name the time MLP
        ``time_mlp.{0,2}`` and the label table ``label_emb`` (their keys are renamed in place)."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            for old, new in _OLD_KEYS.items():
                if key.startswith(prefix + old):
                    state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)



@register("model", "concat_mlp")
class ConcatMLP(nn.Module):
    """torchcfm's example MLP (``torchcfm.models.MLP(dim, w=width, time_varying=True)``): the time appended
    to x as one more input, ``(x: [B, dim], t: [B] or scalar) -> [B, dim]``:

        Linear(dim + 1, width) -> (SELU -> Linear(width, width)) x (depth - 1) -> SELU -> Linear(width, dim)

    on ``[x, time_scale * t]``. The default depth 3 and ``time_scale`` 1e-3 give torchcfm's network (its
    state dict has the same keys, ``net.0.weight`` ...) with the time in [0, 1] for a process on [0, 1],
    whose model time is 1000 t. No class labels. ``interval_embedding=True`` (a two-time MeanFlow model)
    appends ``time_scale * interval`` as one more input (``interval`` = t_in(t) - t_in(r), 0 when not
    given). Ranges: dim, width, depth >= 1; time_scale > 0. The SELUs are :class:`~genlab.models.layers.SELU`
    (``nn.SELU``'s values; faster on AVX-512 CPUs).
    """

    def __init__(self, dim: PositiveInt = 2, width: PositiveInt = 64, depth: PositiveInt = 3,
                 time_scale: PositiveFloat = 1e-3, interval_embedding: bool = False) -> None:
        super().__init__()
        self.dim, self.time_scale, self.takes_interval = dim, time_scale, interval_embedding
        layers: list[nn.Module] = [nn.Linear(dim + 1 + interval_embedding, width)]
        for _ in range(depth - 1):
            layers += [SELU(), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers, SELU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor | float, interval: Tensor | float | None = None) -> Tensor:
        """``x: [B, dim]``, ``t: [B]`` or scalar (the model time), ``interval``: [B] or scalar (two-time
        models only) -> ``[B, dim]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"ConcatMLP: expected x: [B, dim] = [B, {self.dim}], got {list(x.shape)}")
        if interval is not None and not self.takes_interval:
            raise ValueError("ConcatMLP: interval given, but the model was built with interval_embedding=False; "
                             "build it with interval_embedding=True for a two-time (MeanFlow) model")
        times = [t, 0.0 if interval is None else interval] if self.takes_interval else [t]
        columns = [self.time_scale * batch_times(s, x, "ConcatMLP").to(x.dtype)[:, None] for s in times]
        return self.net(torch.cat([x, *columns], dim=1))
