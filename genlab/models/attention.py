"""One attention function for every model, with interchangeable backends.

``attention(q, k, v)`` computes softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1) with

- ``"flash"``: the ``flash_attn`` package (Dao 2023), when installed, on CUDA, in fp16/bf16;
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available);
- ``"math"``: the reference formula, softmax in at least float32;
- ``"auto"`` (default): flash where it can run, else sdpa; math inside ``torch.func`` transforms
  (``torch.func.jvp``, as MeanFlow's loss runs the network), whose forward-mode derivatives the fused
  kernels do not implement.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from genlab.core.errors import ShapeError

Backend = Literal["auto", "flash", "sdpa", "math"]
BACKENDS: tuple[str, ...] = ("auto", "flash", "sdpa", "math")


def flash_available(q: Tensor | None = None) -> bool:
    """Whether the flash backend can run (for ``q``, if given: CUDA, fp16/bf16, head dim <= 256)."""
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        return False
    return q is None or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)


def available_backends() -> list[str]:
    """The explicit backends that can run on this machine."""
    return ["sdpa", "math"] + (["flash"] if flash_available() else [])


def attention(q: Tensor, k: Tensor, v: Tensor, backend: Backend = "auto", mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention: q [B, H, N, D], k and v [B, H, M, D] -> [B, H, N, D].

    ``mask`` (bool, True = attend, broadcastable to [B, H, N, M]) is supported by sdpa and math.
    """
    if q.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"attention: expected q [B, H, N, D] and k, v [B, H, M, D], got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    if backend == "auto":
        if torch._C._functorch.is_functorch_wrapped_tensor(q):
            backend = "math"
        else:
            backend = "flash" if mask is None and flash_available(q) else "sdpa"
    if backend == "flash":
        if not flash_available(q):
            raise RuntimeError("attention backend 'flash' needs the flash_attn package, a CUDA tensor in fp16/bf16 "
                               f"and head dim <= 256 (got {q.device}, {q.dtype}, dim {q.shape[-1]}); use 'sdpa'")
        if mask is not None:
            raise ValueError("attention backend 'flash' does not take a mask; use 'sdpa'")
        from flash_attn import flash_attn_func

        out = flash_attn_func(*(rearrange(t, "b h n d -> b n h d") for t in (q, k, v)))
        return rearrange(out, "b n h d -> b h n d")
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        dt = torch.promote_types(q.dtype, torch.float32)  # at least float32 for the softmax
        scores = torch.einsum("bhnd,bhmd->bhnm", q.to(dt), k.to(dt)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v.to(dt)).to(q.dtype)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) through :func:`attention`:
    ``x: [B, N, dim]``, ``context: [B, M, context_dim] | None`` (None: self-attention) -> ``[B, N, dim]``.
    Projections ``to_q, to_k, to_v, to_out`` (diffusers' names); ``backend`` may be changed at any time."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False,
                 backend: Backend = "auto") -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        q, k, v = (rearrange(f(s), "b n (h d) -> b h n d", h=self.heads)
                   for f, s in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx)))
        return self.to_out(rearrange(attention(q, k, v, self.backend), "b h n d -> b n (h d)"))
