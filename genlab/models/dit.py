"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

``x [B, C, H, W]`` is cut into ``p x p`` patches (a conv with stride ``p``), giving ``N = (H/p)(W/p)``
tokens plus a fixed 2D sin-cos position embedding. The conditioning ``c = t_emb + y_emb`` drives
adaLN-Zero in every block (Sec. 3.2):

    (b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))                   # zero-initialised
    x <- x + g1 * Attn(LN(x) (1 + s1) + b1)
    x <- x + CrossAttn(LN'(x), context)                          # only with cross_attention_dim
    x <- x + g2 * MLP(LN(x) (1 + s2) + b2)

so every block starts as the identity. The final layer is adaLN (shift, scale) and a zero-initialised
linear to ``p * p * out_channels`` per token, rearranged back to ``[B, out_channels, H, W]``.

With ``per_block_embedding`` (the layout of diffusers' ``DiTTransformer2DModel``, whose blocks each
keep a time/label embedder, ``transformer_blocks.i.norm1.emb``) block ``i >= 1`` computes its own
``c_i`` with its own embedders; block 0 and the final layer use the model's ``c``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from genlab.core.bounds import PositiveFloat, PositiveInt, UnitInterval
from genlab.core.errors import ShapeError, did_you_mean
from genlab.core.registry import register
from genlab.models.attention import Backend, MultiHeadAttention
from genlab.models.layers import (FreqShift, LabelEmbedding, TimeEmbeddingKind, TimestepEmbedding, condition_embedding,
                                  drop_labels, modulate)

Preset = Literal["S/2", "S/4", "S/8", "B/2", "B/4", "B/8", "L/2", "L/4", "L/8", "XL/2", "XL/4", "XL/8"]
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # Table 1
PRESETS: dict[str, dict[str, int]] = {
    f"{size}/{p}": {"depth": d, "hidden": h, "num_heads": n, "patch_size": p}
    for size, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}


def _keep_attention_and_expansion(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing policy: keep attention outputs and the MLP's expanding matmul (the
    costly ops to redo), recompute norms, activations and the rest."""
    if "scaled_dot_product" in str(op):
        return CheckpointPolicy.MUST_SAVE
    if op is torch.ops.aten.addmm.default and args[2].shape[-1] > args[1].shape[-1]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_keep_attention_and_expansion)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos position embedding of a ``grid x grid`` token map (MAE; DiT): ``[grid^2, dim]``.

    Tokens in row-major order; for the token at row y, column x, with ``w_i = 10000^(-i / (dim/4))``:
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` (computed in float64, returned in float32).
    """
    if dim % 4:
        raise ValueError(f"DiT: the 2D sin-cos position embedding needs hidden divisible by 4, got {dim}")
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / 10000**omega
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = [torch.outer(pos.reshape(-1), omega) for pos in (x, y)]
    return torch.cat([f(a) for a in parts for f in (torch.sin, torch.cos)], dim=1).float()


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block ``x [B, N, D], c [B, D], context [B, L, D_ctx] | None -> [B, N, D]``
    (equations in the module docstring). ``time_embed`` / ``label_embed``: the block's own embedders
    (``per_block_embedding``; the DiT computes ``c`` with them), else None. ``fuser``: an adapter's
    injection point, None (no parameters, no change) or a module ``[B, N, D] -> [B, N, D]`` applied to
    the tokens after self-attention (GLIGEN's gated self-attention)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, cross_attention_dim: int | None,
                 qkv_bias: bool, mlp_norm_eps: float, backend: Backend, time_embed: TimestepEmbedding | None = None,
                 label_embed: LabelEmbedding | None = None) -> None:
        super().__init__()
        self.time_embed, self.label_embed = time_embed, label_embed
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(hidden, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm_cross = nn.LayerNorm(hidden, eps=1e-6) if cross_attention_dim else None
        self.cross_attn = (MultiHeadAttention(hidden, num_heads, cross_attention_dim, qkv_bias, backend)
                           if cross_attention_dim else None)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=mlp_norm_eps)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.fuser: nn.Module | None = None

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = rearrange(self.modulation(c), "b (k d) -> k b 1 d", k=6)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x if self.fuser is None else self.fuser(x)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


@register("model", "dit")
class DiT(nn.Module):
    """Diffusion Transformer ``(x [B, C, H, W], t [B] or scalar, class_labels [B] | None, context
    [B, L, D_ctx] | None, residuals {"block.i": [B, N, hidden]} | None) -> [B, out_channels, H, W]``.

    ``preset`` ("S/2" ... "XL/8", Table 1) fills ``depth, hidden, num_heads, patch_size``; explicit
    arguments override it; without either, DiT-S/2's values. ``t`` is the model time in any range.
    With ``num_classes``, labels ``0..num_classes-1`` are classes and -1 (or None) is the null class,
    used with probability ``class_dropout`` in training (0.1 in the paper). ``learn_sigma`` doubles the
    output channels (prediction, then the variance interpolation ``v`` of Nichol & Dhariwal 2021).
    ``cross_attention_dim`` adds a LayerNorm + cross-attention sub-block to every block (output
    projection zero-initialised; skipped when ``context`` is None). ``time_freq_shift`` and
    ``mlp_norm_eps`` exist to reproduce diffusers' ``DiTTransformer2DModel`` (1 and 1e-5 there; 0 and
    1e-6 in the paper's code), and so does ``per_block_embedding``: blocks 1 ... depth-1 then each have
    their own time (and label) embedder (``blocks.i.time_embed``, ``blocks.i.label_embed``), as a DiT
    trained with diffusers has; block 0 and the final layer use the model's. Labels are dropped
    (``class_dropout``) once per sample for all embedders; an interval embedding is added to every
    block's conditioning, and so is the guidance weight's with ``guidance_embedding`` (``guidance_scale`` w,
    a guidance-distilled student: Meng et al. 2023, Sec. 4.1; zero-initialised). ``time_embedding="fourier"`` embeds ``t`` with 256 random Fourier features
    of scale ``fourier_scale`` instead of sinusoids (for times of order 1). ``config`` holds the resolved
    arguments: ``DiT(**model.config)``.

    Ranges: sizes, channels, depth, heads, classes >= 1; mlp_ratio, fourier_scale, mlp_norm_eps > 0;
    class_dropout (a probability) in [0, 1]; time_freq_shift in [0, 1]. patch_size must divide
    input_size, num_heads must divide hidden, and hidden must be a multiple of 4 (the 2D sin-cos
    position embedding).
    """

    def __init__(
        self,
        preset: Preset | None = None,
        input_size: PositiveInt = 32,
        in_channels: PositiveInt = 4,
        out_channels: PositiveInt | None = None,
        learn_sigma: bool = False,
        patch_size: PositiveInt | None = None,
        hidden: PositiveInt | None = None,
        depth: PositiveInt | None = None,
        num_heads: PositiveInt | None = None,
        mlp_ratio: PositiveFloat = 4.0,
        num_classes: PositiveInt | None = None,
        class_dropout: UnitInterval = 0.1,
        cross_attention_dim: PositiveInt | None = None,
        qkv_bias: bool = True,
        time_freq_shift: FreqShift = 0.0,
        time_embedding: TimeEmbeddingKind = "sinusoidal",
        fourier_scale: PositiveFloat = 16.0,
        mlp_norm_eps: PositiveFloat = 1e-6,
        attention_backend: Backend = "auto",
        gradient_checkpointing: bool | Literal["selective"] = False,
        interval_embedding: bool = False,
        per_block_embedding: bool = False,
        guidance_embedding: bool = False,
    ) -> None:
        super().__init__()
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"DiT: unknown preset {preset!r}{did_you_mean(preset, PRESETS)}")
        given = {"patch_size": patch_size, "hidden": hidden, "depth": depth, "num_heads": num_heads}
        arch = PRESETS[preset or "S/2"] | {k: v for k, v in given.items() if v is not None}
        p, hidden, depth, num_heads = arch["patch_size"], arch["hidden"], arch["depth"], arch["num_heads"]
        self._validate(input_size, p, hidden, num_heads, mlp_ratio)
        pred_channels = out_channels or in_channels
        self.config: dict[str, Any] = dict(
            input_size=input_size, in_channels=in_channels, out_channels=pred_channels, learn_sigma=learn_sigma,
            **arch, mlp_ratio=mlp_ratio, num_classes=num_classes, class_dropout=class_dropout,
            cross_attention_dim=cross_attention_dim, qkv_bias=qkv_bias, time_freq_shift=time_freq_shift,
            time_embedding=time_embedding, fourier_scale=fourier_scale, mlp_norm_eps=mlp_norm_eps,
            attention_backend=attention_backend, gradient_checkpointing=gradient_checkpointing,
            interval_embedding=interval_embedding, per_block_embedding=per_block_embedding,
            guidance_embedding=guidance_embedding)
        self.input_size, self.in_channels, self.patch_size, self.hidden = input_size, in_channels, p, hidden
        self.out_channels = pred_channels * (2 if learn_sigma else 1)
        self.num_classes, self.cross_attention_dim = num_classes, cross_attention_dim
        self.gradient_checkpointing, self.class_dropout = gradient_checkpointing, class_dropout
        self.per_block_embedding = per_block_embedding
        self.grid = input_size // p

        self.patch_embed = nn.Conv2d(in_channels, hidden, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid), persistent=False)
        # with per-block embedders, labels are dropped once in forward, not by each embedder
        label_dropout = 0.0 if per_block_embedding else class_dropout

        def embedders() -> tuple[TimestepEmbedding, LabelEmbedding | None]:
            time = TimestepEmbedding(hidden, freq_shift=time_freq_shift, kind=time_embedding,
                                     fourier_scale=fourier_scale)
            return time, LabelEmbedding(num_classes, hidden, label_dropout) if num_classes is not None else None

        self.time_embed, self.label_embed = embedders()
        self.interval_embed, self.takes_interval = None, interval_embedding  # a two-time network u(x, r, t)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, num_heads, mlp_ratio, cross_attention_dim, qkv_bias, mlp_norm_eps, attention_backend,
                     *(embedders() if per_block_embedding and i > 0 else (None, None)))
            for i in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.proj_out = nn.Linear(hidden, p * p * self.out_channels)
        self.reset_parameters()
        if interval_embedding:  # after reset_parameters: its zero output layer stays zero
            self.interval_embed = self.time_embed.interval_twin()
        self.guidance_embed = self.time_embed.interval_twin() if guidance_embedding else None  # zero output too

    @staticmethod
    def _validate(input_size: int, p: int, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        """ValueError naming the fields unless the resolved architecture fits together."""
        if input_size % p:
            fits = [d for d in range(1, input_size + 1) if input_size % d == 0]
            raise ValueError(f"DiT: input_size ({input_size}) must be divisible by patch_size ({p}); divisors of "
                             f"{input_size}: {', '.join(map(str, fits))}")
        if hidden % num_heads:
            raise ValueError(f"DiT: hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        if hidden % 4:
            raise ValueError(f"DiT: hidden ({hidden}) must be a multiple of 4 (the 2D sin-cos position embedding)")
        if int(hidden * mlp_ratio) < 1:
            raise ValueError(f"DiT: the MLP width int(hidden * mlp_ratio) = int({hidden} * {mlp_ratio:g}) must be >= 1")

    def reset_parameters(self) -> None:
        """The paper's initialisation: Xavier-uniform linears (and patch conv), N(0, 0.02) embeddings,
        zero adaLN modulations and output layer (adaLN-Zero), zero cross-attention output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for time_embed, label_embed in self._embedders():
            for w in (time_embed.linear_1.weight, time_embed.linear_2.weight):
                nn.init.normal_(w, std=0.02)
            if label_embed is not None:
                nn.init.normal_(label_embed.embedding.weight, std=0.02)
        zero = [self.final_modulation[-1], self.proj_out]
        zero += [b.modulation[-1] for b in self.blocks] + [b.cross_attn.to_out for b in self.blocks if b.cross_attn]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _embedders(self) -> list[tuple[TimestepEmbedding, LabelEmbedding | None]]:
        """The time and label embedders of block 0 (the model's), then of each block that has its own."""
        own = [(b.time_embed, b.label_embed) for b in self.blocks if b.time_embed is not None]
        return [(self.time_embed, self.label_embed), *own]

    def conditions(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None,
                   interval: Tensor | float | None = None, guidance_scale: Tensor | float | None = None) -> list[Tensor]:
        """The conditioning ``c`` of each block, ``[B, hidden]`` each, for ``x: [B, C, H, W]`` (see
        ``forward``); block 0's also drives the final layer. Without ``per_block_embedding`` all are one."""
        if self.per_block_embedding and self.training and self.class_dropout > 0 and class_labels is not None:
            class_labels = drop_labels(class_labels, self.class_dropout)  # one draw for every embedder
        cs = [condition_embedding(time_embed, label_embed, x, t, class_labels, "DiT", self.interval_embed, interval,
                                  self.guidance_embed, guidance_scale)
              for time_embed, label_embed in self._embedders()]
        return cs if self.per_block_embedding else cs * len(self.blocks)

    def tokens(self, x: Tensor) -> Tensor:
        """The token stream the blocks start from, ``[B, N, hidden]``: ``x: [B, C, H, W]`` cut into patches
        (``patch_embed``) plus the position embedding."""
        return rearrange(self.patch_embed(x), "b d h w -> b (h w) d").contiguous() + self.pos_embed

    def injection_points(self, x_shape: tuple[int, ...] | torch.Size) -> dict[str, torch.Size]:
        """Names and shapes of the residuals ``forward`` accepts for an input of ``x_shape``:
        ``"block.i"`` -> ``[B, N, hidden]``, added to the tokens after block i."""
        self._check_x(tuple(x_shape))
        size = torch.Size([x_shape[0], self.grid**2, self.hidden])
        return {f"block.{i}": size for i in range(len(self.blocks))}

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None,
                context: Tensor | None = None, residuals: dict[str, Tensor] | None = None,
                interval: Tensor | float | None = None, guidance_scale: Tensor | float | None = None) -> Tensor:
        """See the class docstring; returns ``[B, out_channels, H, W]``."""
        self._check_x(tuple(x.shape))
        cs = self.conditions(x, t, class_labels, interval, guidance_scale)  # [B, hidden] per block
        self._check_context(context, x.shape[0])
        h = self.tokens(x)
        extra = self._check_residuals(residuals or {}, h.shape)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                selective = {"context_fn": selective_contexts} if self.gradient_checkpointing == "selective" else {}
                h = checkpoint(block, h, cs[i], context, use_reentrant=False, **selective)
            else:
                h = block(h, cs[i], context)
            if f"block.{i}" in extra:
                h = h + extra[f"block.{i}"]
        shift, scale = rearrange(self.final_modulation(cs[0]), "b (k d) -> k b 1 d", k=2)
        h = self.proj_out(modulate(self.norm_out(h), shift, scale))
        return rearrange(h, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=self.patch_size, q=self.patch_size)

    def _check_x(self, shape: tuple[int, ...]) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise ShapeError(f"DiT: expected x: [B, C, H, W] = [B, {', '.join(map(str, expected))}], got {list(shape)}")

    def _check_context(self, context: Tensor | None, batch: int) -> None:
        if context is None:
            return
        if self.cross_attention_dim is None:
            raise ValueError("DiT: context given, but the model was built with cross_attention_dim=None")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.cross_attention_dim:
            raise ShapeError(f"DiT: expected context: [B, L, D_ctx] = [{batch}, L, {self.cross_attention_dim}], "
                             f"got {list(context.shape)}")

    def _check_residuals(self, residuals: dict[str, Tensor], shape: torch.Size) -> dict[str, Tensor]:
        names = [f"block.{i}" for i in range(len(self.blocks))]
        for name, r in residuals.items():
            if name not in names:
                raise ValueError(f"DiT: unknown injection point {name!r}{did_you_mean(name, names)} "
                                 f"(valid: block.0 ... block.{len(names) - 1})")
            if r.shape != shape:
                raise ShapeError(f"DiT: expected residuals[{name!r}]: [B, N, hidden] = {list(shape)}, got {list(r.shape)}")
        return residuals
