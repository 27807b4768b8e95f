"""Convert between a genlab ``UNet`` with an attached ``GLIGEN`` and diffusers' ``UNet2DConditionModel`` of
``attention_type="gated"`` (a fuser in every transformer block, ``position_net`` text-only).

The UNet's key map (``diffusers_key_map``) covers the attached fusers; ``position_net`` keeps diffusers'
names. diffusers is imported only inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from genlab.adapters.gligen import GLIGEN
from genlab.interop.unet_weights import _check_keys, _diffusers_config, _kwargs_condition, diffusers_key_map
from genlab.interop.unet_weights import state_dict_to_diffusers
from genlab.models.unet import UNet

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

_POSITION = "position_net."


def gligen_from_diffusers(model: UNet2DConditionModel) -> tuple[UNet, GLIGEN]:
    """A genlab UNet and its attached GLIGEN computing what the gated diffusers ``model`` computes:
    ``with gligen.grounding(boxes, masks, embeddings): unet(x, t, context=context)`` equals ``model(x, t,
    context, cross_attention_kwargs={"gligen": {"boxes": boxes, "positive_embeddings": embeddings,
    "masks": masks}})`` (same dtype)."""
    cfg = dict(model.config)
    if cfg.get("attention_type") != "gated":
        raise ValueError(f"gligen_from_diffusers: expected a UNet2DConditionModel with attention_type='gated' "
                         f"(text-only grounding), got attention_type={cfg.get('attention_type')!r}")
    unet = UNet(**_kwargs_condition({**cfg, "attention_type": "default"}))
    state = model.state_dict()
    position = {k[len(_POSITION):]: v for k, v in state.items() if k.startswith(_POSITION)}
    embedding_dim = position["null_positive_feature"].shape[0]
    gligen = GLIGEN(unet, embedding_dim, hidden=position["linears.0.weight"].shape[0],
                    fourier_freqs=position["null_position_feature"].shape[0] // 8).attach()
    keys = diffusers_key_map(unet)
    _check_keys(set(keys.values()), {k for k in state if not k.startswith(_POSITION)}, "gated diffusers UNet")
    unet.load_state_dict({g: state[d] for g, d in keys.items()})
    gligen.position_net.load_state_dict(position)
    dtype = next(model.parameters()).dtype
    return unet.to(dtype), gligen.to(dtype)


def gligen_to_diffusers(unet: UNet, gligen: GLIGEN) -> UNet2DConditionModel:
    """The gated diffusers ``UNet2DConditionModel`` computing what ``unet`` with ``gligen`` attached computes
    (see ``gligen_from_diffusers``). diffusers' position net has 512 hidden units, 8 Fourier frequencies,
    phrase embeddings as wide as the tokens (``cross_attention_dim``) and no class labels."""
    from diffusers import UNet2DConditionModel

    net, who = gligen.position_net, "gligen_to_diffusers"
    if not gligen.attached or gligen._blocks[0] not in list(unet.modules()):
        raise ValueError(f"{who}: the GLIGEN must be attached to this UNet")
    shape = (net.linears[0].out_features, net.fourier_freqs, net.embedding_dim, net.class_embed is None)
    if shape != (512, 8, unet.cross_attention_dim, True):
        raise ValueError(f"{who}: diffusers' gated UNet needs a position net of (hidden, fourier_freqs, "
                         f"embedding_dim, no classes) = (512, 8, {unet.cross_attention_dim}, True), got {shape}")
    model = UNet2DConditionModel(**_diffusers_config(unet, None, who), attention_type="gated")
    converted = {**state_dict_to_diffusers(unet), **{_POSITION + k: v for k, v in net.state_dict().items()}}
    _check_keys(set(converted), set(model.state_dict()), f"genlab UNet + {type(gligen).__name__}")
    model.load_state_dict(converted)
    dtype = next(unet.parameters()).dtype
    return model if dtype == torch.float32 else model.to(dtype)
