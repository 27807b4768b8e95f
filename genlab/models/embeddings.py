"""Sinusoidal time embeddings (Vaswani et al. 2017, Sec. 3.5; as used by DDPM and ADM)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from genlab.core.errors import ShapeError


def timestep_embedding(t: Tensor | float, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0,
                       flip_sin_to_cos: bool = True) -> Tensor:
    """Embed times ``t: [B]`` (or a scalar, treated as ``[1]``) as ``[B, dim]`` float32.

    ``emb = [cos(t f_i), sin(t f_i)]`` (``[sin, cos]`` unless ``flip_sin_to_cos``, as in the DDPM
    code) with ``f_i = max_period^(-i / (dim // 2 - freq_shift))``, i < dim // 2; an odd ``dim``
    gets a zero last column. Bit-identical to diffusers'
    ``get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift=freq_shift)``
    (ADM's ``timestep_embedding`` for shift 0; diffusers' DiT uses shift 1). ``t`` may be
    fractional and of any range.
    """
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ShapeError(f"timestep_embedding: expected t: [B] or a scalar, got {list(t.shape)}")
    if dim < 2:
        raise ValueError(f"timestep_embedding: dim must be >= 2, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = rearrange(t.float(), "b -> b 1") * rearrange(exponent.exp(), "h -> 1 h")  # [B, half]
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))
