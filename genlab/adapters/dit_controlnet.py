"""ControlNet for genlab's DiT (Zhang et al. 2023's idea on a transformer, as SD3's and PixArt's
ControlNets do it): a trainable copy of the DiT's patch embedding, time/label embedders and first
``num_blocks`` blocks, whose token stream starts from

    h_0 = Patchify(x) + pos + Z_in(Patchify_c(c))

(``Z_in``: the conditioning image's own patch embedding, zero-initialised, SD3's ``pos_embed_input``), and
after copied block i emits the residual ``s * Z_i(h_i)`` for the DiT's injection point ``block.{i}``, with
``Z_i`` a zero-initialised linear ``hidden -> hidden`` (the transformer form of the zero convolution).
The DiT adds it to its tokens after its own block i. At initialisation every residual is zero, so the
controlled DiT computes exactly what it computed before::

    controlnet = DiTControlNet.from_dit(dit, num_blocks=2, conditioning_channels=1)
    out = dit(x, t, class_labels, residuals=controlnet(x, t, cond, class_labels))

The control image is at the DiT's input size (a latent DiT takes the control's latent, as SD3 does).
The copied blocks run without gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
from genlab.models.dit import DiT

_UNUSED = ("norm_out", "final_modulation", "proj_out")  # the DiT's output layers: not part of the copy


class DiTControlNet(nn.Module):
    """ControlNet for a ``DiT`` of ``dit_config`` (its arguments or resolved ``config``): ``(x: [B, C, H, W],
    t, cond: [B, conditioning_channels, H, W], class_labels, context, conditioning_scale, interval) ->
    {"block.i": [B, N, hidden]}`` for i < ``num_blocks``, the DiT's ``residuals``. Use ``from_dit`` to
    start from a DiT's weights. ``dit`` holds the copy (a DiT of depth ``num_blocks`` without output
    layers), ``cond_embed`` the conditioning patch embedding, ``zero_linears`` the output projections.

    Ranges: num_blocks in [1, the DiT's depth], conditioning_channels >= 1.
    """

    def __init__(self, dit_config: Mapping[str, Any], num_blocks: PositiveInt = 1,
                 conditioning_channels: PositiveInt = 3) -> None:
        super().__init__()
        with torch.device("meta"):  # the DiT resolves and checks its arguments; nothing is allocated
            depth = DiT(**dit_config).config["depth"]
        if not 1 <= num_blocks <= depth:
            raise ValueError(f"DiTControlNet: num_blocks must be in [1, {depth}] (the DiT's depth), got {num_blocks}")
        if conditioning_channels < 1:
            raise ValueError(f"DiTControlNet: conditioning_channels must be >= 1, got {conditioning_channels}")
        self.dit = DiT(**{**dit_config, "depth": num_blocks})
        for name in _UNUSED:
            delattr(self.dit, name)
        self.config = {**self.dit.config, "depth": depth}  # the controlled DiT's
        self.num_blocks, self.conditioning_channels = num_blocks, conditioning_channels
        hidden, p = self.dit.hidden, self.dit.patch_size
        self.cond_embed = nn.Conv2d(conditioning_channels, hidden, kernel_size=p, stride=p)
        self.zero_linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        for layer in [self.cond_embed, *self.zero_linears]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    control_factor = 1  # the control image is at the DiT's input size

    def mismatch(self, dit: nn.Module) -> str | None:
        """Where this ControlNet does not fit ``dit`` (a field, its value and the DiT's), or None."""
        if not isinstance(dit, DiT):
            return f"backbone {type(dit).__name__}, a DiTControlNet steers a DiT"
        keys = ("input_size", "in_channels", "patch_size", "hidden", "depth", "num_classes", "cross_attention_dim",
                "per_block_embedding", "interval_embedding")
        k = next((k for k in keys if self.config[k] != dit.config[k]), None)
        return None if k is None else f"{k} {self.config[k]}, the DiT's {dit.config[k]}"

    @classmethod
    def from_dit(cls, dit: DiT, num_blocks: PositiveInt = 1, conditioning_channels: PositiveInt = 3) -> DiTControlNet:
        """A ControlNet whose patch embedding, embedders and blocks are copies of ``dit``'s first ones (on its
        device and dtype)."""
        if not isinstance(dit, DiT):
            raise TypeError(f"DiTControlNet.from_dit: expected a genlab DiT, got {type(dit).__name__}")
        param = next(dit.parameters())
        net = cls(dit.config, num_blocks, conditioning_channels).to(device=param.device, dtype=param.dtype)
        source = dit.state_dict()
        copied = {f"dit.{k}": v for k, v in source.items() if f"dit.{k}" in net.state_dict()}
        net.load_state_dict({**net.state_dict(), **copied})
        return net.train(dit.training)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor, class_labels: Tensor | None = None,
                context: Tensor | None = None, conditioning_scale: float = 1.0,
                interval: Tensor | float | None = None) -> dict[str, Tensor]:
        """See the class docstring; ``t``, ``class_labels``, ``context`` and ``interval`` as the DiT's."""
        dit = self.dit
        dit._check_x(tuple(x.shape))
        expected = [x.shape[0], self.conditioning_channels, *x.shape[2:]]
        if list(cond.shape) != expected:
            raise ShapeError(f"DiTControlNet: expected cond: [B, C_cond, H, W] = {expected}, got {list(cond.shape)}")
        cs = dit.conditions(x, t, class_labels, interval)  # [B, hidden] per block
        dit._check_context(context, x.shape[0])
        h = dit.tokens(x) + rearrange(self.cond_embed(cond), "b d h w -> b (h w) d")
        residuals = {}
        for i, (block, zero) in enumerate(zip(dit.blocks, self.zero_linears)):
            h = block(h, cs[i], context)
            residuals[f"block.{i}"] = zero(h) * conditioning_scale
        return residuals

