"""Residual MLP backbone for vector data (2D toys, small latents).

A pre-norm residual MLP (He et al. 2016, "Identity mappings") conditioned like ADM's ResBlock
(Dhariwal and Nichol 2021): the time (+ class) embedding is projected and added inside every
block. Class labels use one extra "null" index for classifier-free guidance (Ho and Salimans 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.embeddings import timestep_embedding
from genlab.models.layers import batch_times


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


@register("model", "mlp")
class MLP(nn.Module):
    """Residual MLP ``(x: [B, dim], t: [B] or scalar, class_labels: [B] | None) -> [B, dim]``.

    ``t`` is the model time in whatever range the caller uses (e.g. 0..1000 or a log-sigma around
    -2..2); it is embedded with ``timestep_embedding`` unchanged. With ``num_classes``, labels
    ``0..num_classes-1`` are classes and ``-1`` (or ``class_labels=None``) is the null class.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        time_dim: int = 128,
        num_classes: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.emb_act = nn.SiLU()
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``x: [B, dim]``, ``t: [B]`` or scalar, ``class_labels: [B]`` long (-1 = null) -> ``[B, dim]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"MLP: expected x: [B, dim] = [B, {self.dim}], got {list(x.shape)}")
        emb = self.time_mlp(self._time(t, x).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(self._labels(class_labels, x))
        elif class_labels is not None:
            raise ValueError("MLP: class_labels given, but the model was built with num_classes=None")
        emb = self.emb_act(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)

    def _time(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Time embedding ``[B, time_dim]`` from a scalar or ``[B]`` time."""
        return timestep_embedding(batch_times(t, x, "MLP"), self.time_dim)

    def _labels(self, class_labels: Tensor | None, x: Tensor) -> Tensor:
        """Labels ``[B]`` with -1 and None mapped to the null index ``num_classes``."""
        null = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        if class_labels is None:
            return null
        if class_labels.shape != (x.shape[0],):
            raise ShapeError(f"MLP: expected class_labels: [B] = [{x.shape[0]}], got {list(class_labels.shape)}")
        if class_labels.is_floating_point() or (class_labels >= self.num_classes).any() or (class_labels < -1).any():
            raise ValueError(f"MLP: class_labels must be integers in [-1, {self.num_classes}), got {class_labels}")
        return torch.where(class_labels == -1, null, class_labels.long())
