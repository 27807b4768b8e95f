"""Convert weights between genlab's autoencoders and diffusers' ``AutoencoderKL`` / ``VQModel``.

``AutoencoderKL`` <-> :class:`~genlab.models.autoencoders.AutoencoderKL`: diffusers' ``encode(x).latent_dist``
(mean, logvar) is genlab's ``encode(x).stats``, ``decode(z)`` is ``decode(z)``; ``scaling_factor`` and
``shift_factor`` (None: 0) become the buffers of ``to_latent`` / ``from_latent``.

``VQModel`` <-> :class:`~genlab.models.autoencoders.VQAutoencoder` with a :class:`VectorQuantizer` (L2
distance, no projection, ``codebook_size = num_vq_embeddings``, ``dim = vq_embed_dim``). diffusers splits the
quantizer differently: its ``encode`` stops before the quantizer and its ``decode(h)`` quantizes first, so
diffusers' ``decode(encode(x).latents)`` is genlab's ``decode(encode(x).latent)`` and diffusers'
``decode(q, force_not_quantize=True)`` is genlab's ``decode(q)``. Losses: diffusers' ``VectorQuantizer`` keeps
its "legacy" placement of beta (0.25) on the codebook term, ``|sg(z) - q|^2`` (LDM's bug, kept for
compatibility), while genlab puts beta on the commitment term ``|z - sg(q)|^2`` as van den Oord et al.'s Eq. 3:
the converted model's losses are those of diffusers' ``VectorQuantizer(legacy=False)`` (the forward outputs
are the same). Imported, the codebook is learnt by gradient (``learning="gradient"``) as in diffusers.

diffusers' options that change nothing genlab computes are kept on the model as ``diffusers_options``
(``sample_size``, ``force_upcast``: run the VAE in float32 under a half-precision pipeline;
``lookup_from_codebook``) and written back by the export. What genlab cannot express raises a ``ValueError``
naming the option: other block types or activations, per-channel ``latents_mean`` / ``latents_std``,
``norm_type="spatial"`` (MoVQ's spatially conditioned decoder norms); on export, another quantizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from genlab.interop.unet_weights import _check_fixed, _check_keys, diffusers_key_map
from genlab.models.autoencoders import AutoencoderKL, ConvAutoencoder, Decoder, Encoder, VQAutoencoder
from genlab.models.autoencoders.networks import Level
from genlab.models.quantizers import VectorQuantizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers import VQModel

_RENAMES: dict[type, dict[str, str]] = {
    Encoder: {"down": "down_blocks", "mid": "mid_block", "norm_out": "conv_norm_out"},
    Decoder: {"up": "up_blocks", "mid": "mid_block", "norm_out": "conv_norm_out"},
    Level: {"blocks": "resnets", "downsample": "downsamplers.0", "upsample": "upsamplers.0"},
}
_FIXED: dict[str, tuple] = {"act_fn": ("silu", "swish"), "down_block_types": ("DownEncoderBlock2D",),
                            "up_block_types": ("UpDecoderBlock2D",)}
_FIXED_KL: dict[str, tuple] = {"latents_mean": (None,), "latents_std": (None,)}
_FIXED_VQ: dict[str, tuple] = {"norm_type": ("group",)}
_KEPT = {"AutoencoderKL": {"sample_size": 32, "force_upcast": True},
         "VQModel": {"sample_size": 32, "force_upcast": False, "lookup_from_codebook": False}}
_CODEBOOK = "quantize.embedding.weight"


def _key_map(model: ConvAutoencoder) -> dict[str, str]:
    """genlab key -> diffusers key for the encoder, decoder and 1x1 convs (the quantizer's codebook apart)."""
    return {g: d for g, d in diffusers_key_map(model, _RENAMES).items() if not g.startswith("quantizer.")}


def _kwargs(cfg: Any, kind: str) -> dict[str, Any]:
    _check_fixed(cfg, _FIXED, kind, "genlab's autoencoders")
    widths = tuple(cfg["block_out_channels"])
    for option in ("down_block_types", "up_block_types"):
        if len(cfg[option]) != len(widths):
            raise ValueError(f"{kind}: option {option} has {len(cfg[option])} entries for {len(widths)} "
                             "block_out_channels; genlab needs one block per level")
    return dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                latent_channels=cfg["latent_channels"], block_out_channels=widths,
                layers_per_block=cfg["layers_per_block"], norm_groups=cfg["norm_num_groups"],
                mid_attention=bool(cfg.get("mid_block_add_attention", True)))


def autoencoder_from_diffusers(model: DiffusersKL | VQModel) -> AutoencoderKL | VQAutoencoder:
    """The genlab autoencoder computing what the diffusers ``model`` computes (its dtype and device)."""
    kind, cfg = type(model).__name__, model.config
    if kind == "AutoencoderKL":
        _check_fixed(cfg, _FIXED_KL, kind, "genlab's AutoencoderKL (one scalar scaling_factor / shift_factor)")
        ours: ConvAutoencoder = AutoencoderKL(**_kwargs(cfg, kind), quant_conv=bool(cfg.get("use_quant_conv", True)),
                                              post_quant_conv=bool(cfg.get("use_post_quant_conv", True)))
    elif kind == "VQModel":
        _check_fixed(cfg, _FIXED_VQ, kind, "genlab's VQAutoencoder")
        embed = cfg.get("vq_embed_dim") or cfg["latent_channels"]
        quantizer = VectorQuantizer(embed, cfg["num_vq_embeddings"], learning="gradient", beta=0.25)
        ours = VQAutoencoder(**_kwargs(cfg, kind), embed_dim=embed, quantizer=quantizer)
    else:
        raise TypeError(f"autoencoder_from_diffusers: expected an AutoencoderKL or VQModel, got {kind}")
    state, keys = model.state_dict(), _key_map(ours)
    _check_keys(set(keys.values()) | ({_CODEBOOK} if kind == "VQModel" else set()), set(state), kind)
    missing = ours.load_state_dict({g: state[d] for g, d in keys.items()}, strict=False).missing_keys
    if any(not k.startswith("quantizer.") and k not in ("scaling_factor", "shift_factor") for k in missing):
        raise ValueError(f"autoencoder weight conversion ({kind}): genlab weights not mapped: {missing[:5]}")
    with torch.no_grad():
        if kind == "VQModel":
            ours.quantizer.codebook.copy_(state[_CODEBOOK])
            ours.quantizer.embed_sum.copy_(state[_CODEBOOK])
        ours.scaling_factor.fill_(float(cfg.get("scaling_factor", 1.0)))
        ours.shift_factor.fill_(float(cfg.get("shift_factor") or 0.0))
    ours.diffusers_options = {k: cfg.get(k, v) for k, v in _KEPT[kind].items()}
    weight = next(model.parameters())
    return ours.to(device=weight.device, dtype=weight.dtype).train(model.training)


def autoencoder_to_diffusers(model: AutoencoderKL | VQAutoencoder) -> DiffusersKL | VQModel:
    """The diffusers ``AutoencoderKL`` / ``VQModel`` computing what ``model`` computes (its dtype and device).
    ValueError for a VQ autoencoder whose quantizer diffusers' ``VQModel`` cannot express."""
    import diffusers

    kind = "AutoencoderKL" if isinstance(model, AutoencoderKL) else "VQModel"
    if not isinstance(model, (AutoencoderKL, VQAutoencoder)):
        raise TypeError(f"autoencoder_to_diffusers: expected a genlab AutoencoderKL or VQAutoencoder, got "
                        f"{type(model).__name__}")
    enc, dec, n = model.encoder, model.decoder, len(model.encoder.down)
    cfg: dict[str, Any] = dict(
        in_channels=model.in_channels, out_channels=dec.conv_out.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(level.blocks[-1].conv_2.out_channels for level in enc.down),
        layers_per_block=len(enc.down[0].blocks), act_fn="silu", norm_num_groups=enc.norm_out.num_groups,
        latent_channels=dec.conv_in.in_channels, scaling_factor=_short(model.scaling_factor),
        mid_block_add_attention=enc.mid.attn is not None,
        **{**_KEPT[kind], **getattr(model, "diffusers_options", {})})
    if kind == "AutoencoderKL":
        shift = _short(model.shift_factor)
        theirs = diffusers.AutoencoderKL(**cfg, shift_factor=shift or None,
                                         use_quant_conv=model.quant_conv is not None,
                                         use_post_quant_conv=model.post_quant_conv is not None)
    else:
        q = model.quantizer
        if not isinstance(q, VectorQuantizer) or q.cosine or q.projected:
            raise ValueError("autoencoder_to_diffusers: diffusers' VQModel quantizes with one L2 codebook in the "
                             f"latent space; got quantizer {type(q).__name__}"
                             f"{' (distance cosine)' if getattr(q, 'cosine', False) else ''}"
                             f"{' with a codebook_dim projection' if q.projected else ''}")
        theirs = diffusers.VQModel(**cfg, num_vq_embeddings=q.codebook_size,
                                  vq_embed_dim=None if q.dim == cfg["latent_channels"] else q.dim)
    state = model.state_dict()
    converted = {d: state[g] for g, d in _key_map(model).items()}
    if kind == "VQModel":
        converted[_CODEBOOK] = model.quantizer.codebook.detach()
    _check_keys(set(converted), set(theirs.state_dict()), f"genlab {type(model).__name__}")
    theirs.load_state_dict(converted)
    weight = next(model.parameters())
    if (weight.device, weight.dtype) != (torch.device("cpu"), torch.float32):
        theirs = theirs.to(device=weight.device, dtype=weight.dtype)
    return theirs.train(model.training)


def _short(value: torch.Tensor) -> float:
    """A scalar buffer as the shortest decimal that gives it back in its dtype (0.18215, not 0.18215000629)."""
    return float(str(value.detach().cpu().numpy()[()]))  # numpy prints a float32 by its shortest decimal

