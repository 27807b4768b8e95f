"""Convert weights between genlab's ``UNet`` and diffusers' ``UNet2DModel`` / ``UNet2DConditionModel``,
and between genlab's ``ControlNet`` (a copy of the UNet's way down) and diffusers' ``ControlNetModel``.

Supported (any ``block_out_channels``: genlab's ``channels_per_level``):
``UNet2DModel`` with DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D, mid block
``UNetMidBlock2D``, ``resnet_time_scale_shift`` "default" or "scale_shift", class embeddings by
``num_class_embeds``; ``UNet2DConditionModel`` in the Stable Diffusion 1.x/2.x layout
(CrossAttnDownBlock2D / DownBlock2D / CrossAttnUpBlock2D / UpBlock2D, ``UNetMidBlock2DCrossAttn``,
conv or linear ``proj_in``/``proj_out``); ``ControlNetModel`` of such a UNet
(``controlnet_conditioning_channel_order`` "rgb", no ``global_pool_conditions``). Any other option
raises a ``ValueError`` naming it.

Differences the conversion takes care of:
- diffusers' ``UNet2DModel`` uses ``attention_head_dim`` as the width of a head, while
  ``UNet2DConditionModel`` reads it as the number of heads (diffusers issue #2011);
- ``UNet2DModel``'s mid-block attention has no GroupNorm under "scale_shift" unless
  ``attn_norm_num_groups`` is set (genlab: ``mid_attention_norm=False``);
- diffusers' class embedding has no null class: genlab's extra row (label -1) is set to zero
  when importing and dropped when exporting;
- ``downsample_type="resnet"`` only affects AttnDownBlock2D/AttnUpBlock2D in diffusers, so genlab's
  ``resample="resblock"`` converts only when every level has attention.

The key mapping is built by walking genlab's module tree with one table of child names per block
class (``diffusers_key_map``). diffusers is imported only inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from genlab.adapters.controlnet import ControlNet
from genlab.adapters.gligen import GatedSelfAttention
from genlab.models.layers import LabelEmbedding
from genlab.models.unet import UNet, UNetEncoder
from genlab.models.attention import MultiHeadAttention
from genlab.models.unet_blocks import (
    AttentionBlock,
    DownLevel,
    FeedForward,
    MidBlock,
    ResBlock,
    SpatialTransformer,
    TransformerBlock,
    UpLevel,
)

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel, UNet2DModel

# genlab child name -> diffusers child name, per genlab class ("" merges the child into its parent)
_RENAMES: dict[type, dict[str, str]] = {
    UNet: {"time_embed": "time_embedding", "label_embed": "class_embedding", "down": "down_blocks",
           "mid": "mid_block", "up": "up_blocks", "norm_out": "conv_norm_out"},
    ControlNet: {"time_embed": "time_embedding", "label_embed": "class_embedding", "down": "down_blocks",
                 "mid": "mid_block", "cond_embed": "controlnet_cond_embedding", "zero_convs": "controlnet_down_blocks",
                 "mid_conv": "controlnet_mid_block"},
    LabelEmbedding: {"embedding": ""},
    DownLevel: {"blocks": "resnets", "attns": "attentions", "downsample": "downsamplers.0"},
    UpLevel: {"blocks": "resnets", "attns": "attentions", "upsample": "upsamplers.0"},
    MidBlock: {"res_1": "resnets.0", "attn": "attentions.0", "res_2": "resnets.1"},
    ResBlock: {"norm_1": "norm1", "conv_1": "conv1", "emb_proj": "time_emb_proj", "norm_2": "norm2",
               "conv_2": "conv2", "skip": "conv_shortcut"},
    AttentionBlock: {"norm": "group_norm", "attn": ""},
    MultiHeadAttention: {"to_out": "to_out.0"},
    SpatialTransformer: {"blocks": "transformer_blocks"},
    TransformerBlock: {"norm_1": "norm1", "attn_1": "attn1", "norm_2": "norm2", "attn_2": "attn2", "norm_3": "norm3"},
    FeedForward: {"proj_in": "net.0.proj", "proj_out": "net.2"},
    GatedSelfAttention: {"norm_1": "norm1", "norm_2": "norm2"},  # an attached GLIGEN's fuser
}
_LABEL_KEY = "label_embed.embedding.weight"

# options genlab cannot express: option -> the values it can (a list value must hold only these)
_FIXED_COMMON: dict[str, tuple] = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "mid_block_scale_factor": (1,),
    "downsample_padding": (1,), "act_fn": ("silu", "swish"), "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}
_FIXED_CONDITION: dict[str, tuple] = {
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False), "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "addition_embed_type": (None,), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}
_FIXED_CONTROLNET: dict[str, tuple] = {"controlnet_conditioning_channel_order": ("rgb",),
                                       "global_pool_conditions": (False,)}
_BLOCKS_2D = ({"DownBlock2D"}, {"AttnDownBlock2D"}, {"UpBlock2D"}, {"AttnUpBlock2D"})
_BLOCKS_CONDITION = ({"DownBlock2D"}, {"CrossAttnDownBlock2D"}, {"UpBlock2D"}, {"CrossAttnUpBlock2D"})


def diffusers_key_map(unet: nn.Module, renames: dict[type, dict[str, str]] | None = None) -> dict[str, str]:
    """genlab state-dict key -> diffusers state-dict key, for every parameter of ``unet`` (a UNet or ControlNet;
    another model with its own table of child names per class, ``renames``, over the UNet's)."""
    keys: dict[str, str] = {}
    table = _RENAMES if renames is None else {**_RENAMES, **renames}

    def walk(module: nn.Module, g: str, d: str) -> None:
        for name, _ in module.named_parameters(recurse=False):
            keys[g + name] = d + name
        renames = table.get(type(module), {})
        for name, child in module.named_children():
            new = renames.get(name, name)
            walk(child, f"{g}{name}.", f"{d}{new}." if new else d)

    walk(unet, "", "")
    return keys


def _check_fixed(cfg: Any, fixed: dict[str, tuple], kind: str, target: str = "genlab's UNet") -> None:
    for name, allowed in fixed.items():
        value = cfg.get(name, allowed[0])
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v not in allowed for v in values):
            raise ValueError(f"{kind}: option {name}={value!r} is not supported by {target} "
                             f"(supported: {', '.join(map(repr, allowed))})")


def _uniform(cfg: Any, name: str, indices: Iterable[int], kind: str) -> Any:
    """The one value of a per-level option over ``indices`` (an int/None applies to every level)."""
    value = cfg.get(name)
    if not isinstance(value, (list, tuple)):
        return value
    values = {value[i] if not isinstance(value[i], (list, tuple)) else tuple(value[i]) for i in indices}
    if len(values) > 1 or any(isinstance(v, tuple) for v in values):
        raise ValueError(f"{kind}: option {name}={list(value)} differs between levels; genlab's UNet needs one value")
    return values.pop() if values else value[-1]


def _attention_levels(cfg: Any, blocks: tuple[set, set, set, set], kind: str) -> tuple[int, ...]:
    """Levels with attention, from ``down_block_types`` and ``up_block_types`` (which must mirror)."""
    plain_down, attn_down, plain_up, attn_up = blocks
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for option, types, known in (("down_block_types", down, plain_down | attn_down),
                                 ("up_block_types", up, plain_up | attn_up)):
        for name in types:
            if name not in known:
                raise ValueError(f"{kind}: option {option} contains {name!r}, which genlab's UNet does not express "
                                 f"(supported: {', '.join(sorted(known))})")
    n = len(cfg["block_out_channels"])
    levels = tuple(i for i, name in enumerate(down) if name in attn_down)
    up_levels = tuple(sorted(n - 1 - i for i, name in enumerate(up) if name in attn_up))
    if len(down) != n or len(up) != n or levels != up_levels:
        raise ValueError(f"{kind}: options down_block_types={down} and up_block_types={up} must mirror each other "
                         f"(attention at the same levels, one block per entry of block_out_channels)")
    return levels


def _common_kwargs(cfg: Any, kind: str) -> dict[str, Any]:
    """genlab UNet arguments shared by both diffusers classes."""
    widths = tuple(cfg["block_out_channels"])
    if cfg.get("norm_num_groups") is None:
        raise ValueError(f"{kind}: option norm_num_groups=None is not supported by genlab's UNet")
    layers = cfg["layers_per_block"]
    if isinstance(layers, (list, tuple)) and len(set(layers)) > 1:
        raise ValueError(f"{kind}: option layers_per_block={list(layers)} differs between levels")
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], channels_per_level=widths,
        num_res_blocks=layers[0] if isinstance(layers, (list, tuple)) else layers,
        dropout=float(cfg.get("dropout", 0.0)),
        scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift", resample="conv",
        num_classes=cfg.get("num_class_embeds"), time_embed_dim=cfg.get("time_embedding_dim") or 4 * widths[0],
        time_flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]), time_freq_shift=float(cfg["freq_shift"]),
        norm_groups=cfg["norm_num_groups"], norm_eps=float(cfg["norm_eps"]), zero_init=False)


def _kwargs_2d(cfg: Any) -> dict[str, Any]:
    kind = "UNet2DModel"
    _check_fixed(cfg, {**_FIXED_COMMON, "mid_block_type": ("UNetMidBlock2D",)}, kind)
    kwargs = _common_kwargs(cfg, kind)
    levels = _attention_levels(cfg, _BLOCKS_2D, kind)
    head_dim = cfg.get("attention_head_dim")  # a head's width here; None: one head
    kwargs.update(attention_levels=levels, num_heads=1, head_dim=head_dim)
    resample = {cfg.get("downsample_type", "conv"), cfg.get("upsample_type", "conv")}
    if resample == {"resnet"} and len(levels) == len(cfg["block_out_channels"]):
        kwargs["resample"] = "resblock"
    elif resample != {"conv"}:
        raise ValueError(f"{kind}: options downsample_type/upsample_type={sorted(resample)} are supported only both "
                         "'conv', or both 'resnet' with attention blocks at every level (diffusers' DownBlock2D and "
                         "UpBlock2D ignore them)")
    groups = cfg.get("attn_norm_num_groups")
    if groups not in (None, cfg["norm_num_groups"]):
        raise ValueError(f"{kind}: option attn_norm_num_groups={groups} differs from norm_num_groups; not supported")
    kwargs.update(mid_attention=bool(cfg.get("add_attention", True)),
                  mid_attention_norm=groups is not None or cfg.get("resnet_time_scale_shift", "default") == "default")
    return kwargs


def _kwargs_condition(cfg: Any, kind: str = "UNet2DConditionModel") -> dict[str, Any]:
    _check_fixed(cfg, {**_FIXED_COMMON, **_FIXED_CONDITION}, kind)
    kwargs = _common_kwargs(cfg, kind)
    levels = _attention_levels(cfg, _BLOCKS_CONDITION, kind)
    used = (*levels, len(cfg["block_out_channels"]) - 1)  # the mid block takes the last level's settings
    widths, heads = list(cfg["block_out_channels"]), cfg["attention_head_dim"]  # heads per level (issue #2011)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    pairs = {(widths[i], heads[i]) for i in used}
    if len({h for _, h in pairs}) == 1:
        kwargs["num_heads"] = heads[used[0]]
    elif len({w // h for w, h in pairs}) == 1 and all(w % h == 0 for w, h in pairs):
        kwargs["head_dim"] = widths[used[0]] // heads[used[0]]
    else:
        raise ValueError(f"{kind}: option attention_head_dim={cfg['attention_head_dim']} gives neither one number of "
                         "heads nor one head width over the attention levels")
    kwargs.update(attention_levels=levels, cross_attention_dim=_uniform(cfg, "cross_attention_dim", used, kind),
                  transformer_depth=_uniform(cfg, "transformer_layers_per_block", used, kind),
                  linear_projection=bool(cfg.get("use_linear_projection", False)))
    return kwargs


def unet_from_diffusers(model: UNet2DModel | UNet2DConditionModel) -> UNet:
    """A genlab ``UNet`` computing the same function as the diffusers ``model`` (same dtype).

    ``genlab(x, t, class_labels, context)`` equals ``model(x, t, class_labels=...)`` (``UNet2DModel``)
    or ``model(x, t, encoder_hidden_states=context, class_labels=...)`` (``UNet2DConditionModel``);
    diffusers' ``timestep`` (the DDPM step index) is genlab's model time unchanged.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel

    if isinstance(model, UNet2DConditionModel):
        kwargs = _kwargs_condition(model.config)
    elif isinstance(model, UNet2DModel):
        kwargs = _kwargs_2d(model.config)
    else:
        raise TypeError("unet_from_diffusers: expected a UNet2DModel or UNet2DConditionModel, "
                        f"got {type(model).__name__}")
    return _load_from_diffusers(UNet(**kwargs), model)


def _load_from_diffusers(target: UNetEncoder, model: nn.Module) -> Any:
    """``target`` (a UNet or ControlNet) with the weights of the diffusers ``model``, in its dtype."""
    state, keys = model.state_dict(), diffusers_key_map(target)
    _check_keys(set(keys.values()), set(state), "diffusers model")
    converted = {g: state[d] for g, d in keys.items()}
    if _LABEL_KEY in converted:  # genlab's null class (label -1): a zero row
        weight = converted[_LABEL_KEY]
        converted[_LABEL_KEY] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    target.load_state_dict(converted)
    return target.to(next(model.parameters()).dtype)


def controlnet_from_diffusers(model: ControlNetModel) -> ControlNet:
    """A genlab ``ControlNet`` computing what the diffusers ``model`` computes: ``genlab(x, t, cond,
    class_labels, context, conditioning_scale)`` gives the residuals ``down.{k}`` / ``mid`` that diffusers
    returns as ``down_block_res_samples`` / ``mid_block_res_sample`` of ``model(x, t, context, cond,
    conditioning_scale)`` (same dtype). Its UNet is the ``UNet2DConditionModel`` it was made from."""
    kind = "ControlNetModel"
    cfg = model.config
    _check_fixed(cfg, _FIXED_CONTROLNET, kind)
    mirror = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
    up = [mirror.get(name, name) for name in reversed(cfg["down_block_types"])]  # the UNet it controls
    kwargs = _kwargs_condition({**cfg, "up_block_types": up, "out_channels": cfg["in_channels"]}, kind)
    net = ControlNet(kwargs, cfg["conditioning_channels"], tuple(cfg["conditioning_embedding_out_channels"]))
    return _load_from_diffusers(net, model)


def unet_to_diffusers(unet: UNet, sample_size: int | None = None) -> UNet2DModel | UNet2DConditionModel:
    """A diffusers model computing the same function as ``unet``: ``UNet2DConditionModel`` if ``unet``
    cross-attends, else ``UNet2DModel``. ``sample_size`` is recorded in its config (pipelines read it).
    Raises ``ValueError`` for genlab options diffusers cannot express. The null-class row is dropped."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg = _diffusers_config(unet, sample_size, "unet_to_diffusers")
    return _load_into_diffusers(unet, (UNet2DModel if unet.config["cross_attention_dim"] is None else
                                       UNet2DConditionModel)(**cfg))


def controlnet_to_diffusers(net: ControlNet) -> ControlNetModel:
    """A diffusers ``ControlNetModel`` computing what ``net`` computes (see ``controlnet_from_diffusers``).
    Raises ``ValueError`` for what diffusers cannot express: a UNet without cross-attention (its middle
    block always cross-attends) or a ``time_embed_dim`` other than 4 ``channels``. Dropout is dropped
    (``ControlNetModel`` has none; the outputs agree in eval mode)."""
    from diffusers import ControlNetModel

    c, who = net.config, "controlnet_to_diffusers"
    if c["cross_attention_dim"] is None:
        raise ValueError(f"{who}: diffusers' ControlNetModel always cross-attends in its middle block; this "
                         "ControlNet's UNet has cross_attention_dim=None")
    if c["time_embed_dim"] != 4 * c["channels"]:
        raise ValueError(f"{who}: diffusers' ControlNetModel fixes the time embedding width to 4 * channels = "
                         f"{4 * c['channels']}, got time_embed_dim={c['time_embed_dim']}")
    cfg = _diffusers_config(net, None, who)
    for name in ("sample_size", "out_channels", "up_block_types", "time_embedding_dim", "dropout"):
        del cfg[name]
    cfg.update(conditioning_channels=net.conditioning_channels,
               conditioning_embedding_out_channels=net.embedding_channels)
    return _load_into_diffusers(net, ControlNetModel(**cfg))


def _load_into_diffusers(source: UNetEncoder, model: nn.Module) -> Any:
    """The diffusers ``model`` with the weights of ``source`` (a UNet or ControlNet), in its dtype."""
    converted = state_dict_to_diffusers(source)
    _check_keys(set(converted), set(model.state_dict()), f"genlab {type(source).__name__}")
    model.load_state_dict(converted)
    dtype = next(source.parameters()).dtype
    return model if dtype == torch.float32 else model.to(dtype)


def _diffusers_config(unet: UNetEncoder, sample_size: int | None, who: str) -> dict[str, Any]:
    """The diffusers config arguments of ``unet``'s architecture: ``UNet2DConditionModel``'s if it
    cross-attends, else ``UNet2DModel``'s. ``who`` names the caller in errors."""
    c = unet.config
    if c["time_embedding"] != "sinusoidal":
        raise ValueError(f"{who}: diffusers cannot express time_embedding={c['time_embedding']!r} "
                         "(its Fourier time projection embeds log t, as [sin, cos])")
    widths = unet.widths
    if c["channels"] != widths[0]:
        raise ValueError(f"{who}: diffusers needs channels (conv_in's width, {c['channels']}) equal to "
                         f"the first level's width ({widths[0]}); build the UNet with channels={widths[0]}")
    levels, n = set(c["attention_levels"]), len(widths)
    cfg: dict[str, Any] = dict(
        sample_size=sample_size, in_channels=c["in_channels"], out_channels=c["out_channels"],
        block_out_channels=tuple(widths), layers_per_block=c["num_res_blocks"], dropout=c["dropout"],
        norm_num_groups=c["norm_groups"], norm_eps=c["norm_eps"], flip_sin_to_cos=c["time_flip_sin_to_cos"],
        freq_shift=int(c["time_freq_shift"]) if float(c["time_freq_shift"]).is_integer() else c["time_freq_shift"],
        time_embedding_dim=c["time_embed_dim"], num_class_embeds=c["num_classes"],
        resnet_time_scale_shift="scale_shift" if c["scale_shift_norm"] else "default")
    attended = [widths[i] for i in levels] + ([widths[-1]] if c["mid_attention"] else [])
    if c["cross_attention_dim"] is None:
        if c["resample"] == "resblock" and len(levels) < n:
            raise ValueError(f"{who}: resample='resblock' needs attention at every level for diffusers "
                             "(its DownBlock2D/UpBlock2D always resample by conv)")
        if not c["mid_attention_norm"] and not c["scale_shift_norm"]:
            raise ValueError(f"{who}: mid_attention_norm=False needs scale_shift_norm=True in diffusers")
        if c["head_dim"] or c["num_heads"] == 1:
            head_dim = c["head_dim"]
        elif len({w // c["num_heads"] for w in attended}) <= 1:
            head_dim = attended[0] // c["num_heads"] if attended else None
        else:
            raise ValueError(f"{who}: num_heads={c['num_heads']} gives different head widths at the "
                             "attention levels; diffusers' UNet2DModel needs one (set head_dim instead)")
        cfg.update(
            down_block_types=tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)),
            up_block_types=tuple("AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(n))),
            attention_head_dim=head_dim, add_attention=c["mid_attention"],
            attn_norm_num_groups=c["norm_groups"] if c["mid_attention_norm"] and c["scale_shift_norm"] else None,
            downsample_type="resnet" if c["resample"] == "resblock" else "conv",
            upsample_type="resnet" if c["resample"] == "resblock" else "conv")
    else:
        if c["resample"] == "resblock" or not c["mid_attention"]:
            raise ValueError(f"{who}: UNet2DConditionModel has no resample='resblock' and always has "
                             "attention in the middle block (mid_attention=True)")
        heads = [max(w // c["head_dim"], 1) if c["head_dim"] else c["num_heads"] for w in widths]
        cfg.update(
            down_block_types=tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)),
            up_block_types=tuple("CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(n))),
            attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),
            cross_attention_dim=c["cross_attention_dim"], transformer_layers_per_block=c["transformer_depth"],
            use_linear_projection=c["linear_projection"])
    return cfg


def _check_keys(mapped: set[str], actual: set[str], source: str) -> None:
    """Every mapped diffusers key exists in the diffusers state dict and vice versa."""
    missing, unexpected = sorted(actual - mapped), sorted(mapped - actual)
    if missing or unexpected:
        raise ValueError(f"weight conversion ({source}): diffusers keys not produced by the mapping: "
                         f"{missing[:5]}; mapped keys absent in diffusers: {unexpected[:5]}")


def state_dict_to_diffusers(unet: UNetEncoder) -> dict[str, Tensor]:
    """``unet``'s (a UNet's or ControlNet's) weights under diffusers' names (label embedding without the
    null row), e.g. to save
    for a diffusers model built from the matching config."""
    keys, state = diffusers_key_map(unet), unet.state_dict()
    return {d: state[g][:-1] if g == _LABEL_KEY else state[g] for g, d in keys.items()}
