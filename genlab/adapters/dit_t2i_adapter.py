"""T2I-Adapter (Mou et al. 2023) for genlab's DiT: the UNet adapter's network (``t2i_adapter``: pixel
unshuffle, then residual conv blocks, full or light layout) made single-scale, since a DiT's tokens have
one resolution at every block. The condition image is unshuffled straight to the DiT's token grid, the
blocks keep that resolution, and the last feature map, as tokens, goes through one zero-initialised
linear projection per steered block::

    F_c = F_AD(C): [B, c_last, H/p, W/p] -> tokens [B, N, c_last]
    r_i = s * Z_i(F_c)     (Z_i: Linear(c_last, hidden), zero-initialised)
    h_i <- Block_i(h_{i-1}) + r_i        (the DiT's injection point block.{i})

(the paper's ``F_enc^i <- F_enc^i + F_c^i`` with the DiT's blocks for the UNet encoder's levels). The
projections make the adapter the identity at initialisation (the UNet adapter is not; both give the
backbone alone at ``conditioning_scale=0``). As the UNet adapter, the features depend on the condition
only, not on ``x_t`` or ``t``: compute them once per condition and reuse them at every step::

    adapter = DiTT2IAdapter.from_dit(dit, in_channels=1)
    residuals = adapter(cond, conditioning_scale=1.0)             # once per condition
    out = dit(x, t, class_labels, residuals=residuals)             # at every step

With a ``DiTControlNet`` too, ``ControlledModel(dit, controlnet)(x, t, y, control=c, residuals=residuals)``
sums the two residuals at a shared ``block.{i}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt, checked
from genlab.core.errors import ShapeError
from genlab.models.dit import DiT

from .t2i_adapter import adapter_features, adapter_layers, per_adapter


@checked
class DiTT2IAdapter(nn.Module):
    """T2I-Adapter for a ``DiT`` of ``dit_config`` (its arguments or resolved ``config``): ``(cond: [B,
    in_channels, f S, f S], conditioning_scale) -> {"block.i": [B, N, hidden]}`` for i in ``blocks``, the
    DiT's ``residuals`` (``S`` the DiT's input_size, ``f = downscale_factor``, ``N = (S / p)^2``, ``p`` its
    patch size). ``features(cond)`` gives them at scale 1.

    The network: pixel unshuffle by ``f p`` (the condition to the token grid), then as ``T2IAdapter``'s
    layouts without downsampling: ``full_adapter`` a 3x3 ``conv_in`` and one ``AdapterBlock`` per width of
    ``channels`` (``num_res_blocks`` residual blocks with 3x3 and 1x1 convs each); ``light_adapter`` no
    ``conv_in``, one block per width working at a quarter of it (3x3 convs). ``projections[j]``, zero-
    initialised, maps the last block's ``channels[-1]`` to the DiT's hidden width for ``blocks[j]``.

    ``blocks``: the DiT blocks steered, default the first half, ``0 ... ceil(depth / 2) - 1``: where the
    UNet adapter's features go (its way down, the first half of the UNet) and where PixArt's
    ControlNet-Transformer steers (13 of 28 blocks). Every k-th block: ``blocks=range(0, depth, k)``.
    ``downscale_factor``: the condition's resolution over the DiT's input (1: at the DiT's input size, as
    ``DiTControlNet``'s control; 8: an image for a DiT on SD's latents).

    Ranges: in_channels, num_res_blocks, downscale_factor and every width >= 1 (>= 4 for light_adapter);
    blocks distinct, in [0, depth - 1], at least one.
    """

    def __init__(self, dit_config: Mapping[str, Any], in_channels: PositiveInt = 3,
                 channels: tuple[PositiveInt, ...] = (256, 512), num_res_blocks: PositiveInt = 2,
                 downscale_factor: PositiveInt = 1,
                 adapter_type: Literal["full_adapter", "light_adapter"] = "full_adapter",
                 blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        with torch.device("meta"):  # the DiT resolves and checks its arguments; nothing is allocated
            config = DiT(**dit_config).config
        depth = config["depth"]
        blocks = tuple(range(math.ceil(depth / 2))) if blocks is None else tuple(int(i) for i in blocks)
        if not blocks or len(set(blocks)) != len(blocks) or not all(0 <= i < depth for i in blocks):
            raise ValueError(f"DiTT2IAdapter: blocks must be distinct block indices in [0, {depth - 1}] (the DiT's "
                             f"depth is {depth}), at least one, got {list(blocks)}")
        channels = tuple(channels)
        self.in_channels, self.channels, self.num_res_blocks = in_channels, channels, num_res_blocks
        self.downscale_factor, self.adapter_type, self.blocks = downscale_factor, adapter_type, blocks
        self.config = {k: config[k] for k in ("input_size", "patch_size", "hidden", "depth")}  # the DiT's
        self.factor = downscale_factor * config["patch_size"]  # condition pixels per token side
        self.conv_in, self.body = adapter_layers(in_channels * self.factor**2, channels, num_res_blocks,
                                                 adapter_type, "DiTT2IAdapter", single_scale=True)
        self.projections = nn.ModuleList(nn.Linear(channels[-1], config["hidden"]) for _ in blocks)
        for layer in self.projections:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_dit(cls, dit: DiT, **kwargs: Any) -> DiTT2IAdapter:
        """An adapter for ``dit`` (its config; on its device and dtype); ``kwargs`` as the constructor's."""
        if not isinstance(dit, DiT):
            raise TypeError(f"DiTT2IAdapter.from_dit: expected a genlab DiT, got {type(dit).__name__}")
        param = next(dit.parameters())
        return cls(dit.config, **kwargs).to(device=param.device, dtype=param.dtype)

    def tokens(self, cond: Tensor) -> Tensor:
        """The adapter's feature map as tokens, ``[B, N, channels[-1]]``, in the DiT's (row-major) order."""
        size = self.config["input_size"] * self.downscale_factor
        if cond.ndim != 4 or tuple(cond.shape[1:]) != (self.in_channels, size, size):
            raise ShapeError(f"DiTT2IAdapter: expected cond: [B, {self.in_channels}, {size}, {size}] (the DiT's "
                             f"input_size {self.config['input_size']} times downscale_factor {self.downscale_factor}), "
                             f"got {list(cond.shape)}")
        h = adapter_features(cond, self.factor, self.conv_in, self.body)[-1]
        return rearrange(h, "b c h w -> b (h w) c")

    def features(self, cond: Tensor) -> dict[str, Tensor]:
        """``{"block.i": Z_j(F_c)}``, ``[B, N, hidden]`` each: the residuals at ``conditioning_scale`` 1."""
        h = self.tokens(cond)
        return {f"block.{i}": proj(h) for i, proj in zip(self.blocks, self.projections)}

    def forward(self, cond: Tensor, conditioning_scale: float = 1.0) -> dict[str, Tensor]:
        """The DiT's ``residuals``: ``conditioning_scale`` times ``features(cond)``."""
        return {name: r * conditioning_scale for name, r in self.features(cond).items()}


class MultiDiTT2IAdapter(nn.Module):
    """Several :class:`DiTT2IAdapter` s on one DiT: ``(conds: one per adapter, weights: one per adapter or one
    for all, conditioning_scale) -> residuals`` ``{"block.i": conditioning_scale * sum_j weights[j]
    F^(j)_i}`` over the union of the adapters' blocks (an adapter adds nothing at a block it does not
    feed), as :class:`~genlab.adapters.t2i_adapter.MultiT2IAdapter` for a UNet. The adapters must be built
    for one DiT (``input_size``, ``patch_size``, ``hidden``, ``depth``); their conditions may differ in
    channels and resolution (each adapter's own ``in_channels`` and ``downscale_factor``)."""

    def __init__(self, adapters: Sequence[DiTT2IAdapter]) -> None:
        super().__init__()
        if not adapters or not all(isinstance(a, DiTT2IAdapter) for a in adapters):
            raise ValueError("MultiDiTT2IAdapter: expected one or more DiTT2IAdapters, got "
                             f"{[type(a).__name__ for a in adapters]}")
        configs = {tuple(sorted(a.config.items())) for a in adapters}
        if len(configs) > 1:
            raise ValueError(f"MultiDiTT2IAdapter: the adapters must be built for one DiT, got DiTs {sorted(configs)}")
        self.adapters = nn.ModuleList(adapters)

    def features(self, conds: Sequence[Tensor], weights: float | Sequence[float] = 1.0) -> dict[str, Tensor]:
        """``{"block.i": sum_j weights[j] F^(j)_i}`` (``[B, N, hidden]`` each)."""
        total: dict[str, Tensor] = {}
        for adapter, cond, w in zip(self.adapters, conds, per_adapter(len(self.adapters), conds, weights,
                                                                      type(self).__name__)):
            for name, f in adapter.features(cond).items():
                total[name] = total[name] + w * f if name in total else w * f
        return total

    def forward(self, conds: Sequence[Tensor], weights: float | Sequence[float] = 1.0,
                conditioning_scale: float = 1.0) -> dict[str, Tensor]:
        """The DiT's ``residuals``: ``conditioning_scale`` times ``features(conds, weights)``."""
        return {name: r * conditioning_scale for name, r in self.features(conds, weights).items()}
