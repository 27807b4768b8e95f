"""Convert DiT weights between genlab's ``DiT`` and diffusers' ``DiTTransformer2DModel``.

diffusers keeps a copy of the timestep and label embedders in every block
(``transformer_blocks.i.norm1.emb``; the final layer uses block 0's), where the paper has one. The
copies are equal in converted checkpoints (e.g. facebook/DiT-XL-2-256), which become a DiT with one
embedder; a model trained with diffusers has different copies and becomes a DiT with
``per_block_embedding=True`` (block 0's copy is the model's ``time_embed`` / ``label_embed``, block
i's is ``blocks.i.time_embed`` / ``blocks.i.label_embed``; in training genlab drops a label for all
blocks at once, where diffusers' copies drop independently). It embeds time with
``downscale_freq_shift=1`` and uses ``norm_eps`` for the LayerNorm before the MLP, which genlab
reproduces with ``time_freq_shift=1`` and ``mlp_norm_eps``. An output of ``2 * in_channels``
channels is read as ``learn_sigma=True``. diffusers is imported only inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from genlab.models.dit import DiT

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel

# genlab key (inside blocks.i) -> diffusers key (inside transformer_blocks.i)
_BLOCK = {
    "modulation.1": "norm1.linear",
    "attn.to_q": "attn1.to_q",
    "attn.to_k": "attn1.to_k",
    "attn.to_v": "attn1.to_v",
    "attn.to_out": "attn1.to_out.0",
    "mlp.0": "ff.net.0.proj",
    "mlp.2": "ff.net.2",
}
# genlab key (top level, or inside blocks.i with per_block_embedding) -> diffusers key inside
# transformer_blocks.i.norm1.emb, one copy per block
_EMBED = {
    "time_embed.linear_1": "timestep_embedder.linear_1",
    "time_embed.linear_2": "timestep_embedder.linear_2",
    "label_embed.embedding": "class_embedder.embedding_table",
}
_TOP = {"patch_embed": "pos_embed.proj", "final_modulation.1": "proj_out_1", "proj_out": "proj_out_2"}


def _key_map(depth: int, per_block_embedding: bool) -> list[tuple[str, str]]:
    """``(genlab key, diffusers key)`` for every diffusers parameter; genlab's embedding keys repeat
    unless ``per_block_embedding``."""
    pairs = list(_TOP.items())
    for i in range(depth):
        own = f"blocks.{i}." if per_block_embedding and i > 0 else ""
        pairs += [(f"blocks.{i}.{g}", f"transformer_blocks.{i}.{d}") for g, d in _BLOCK.items()]
        pairs += [(own + g, f"transformer_blocks.{i}.norm1.emb.{d}") for g, d in _EMBED.items()]
    names = {g: ("weight",) if g.endswith("embedding") else ("weight", "bias") for g, _ in pairs}
    return [(f"{g}.{p}", f"{d}.{p}") for g, d in pairs for p in names[g]]


def _embedders_differ(source: dict[str, Tensor], depth: int) -> bool:
    """Whether some block's time/label embedder differs from block 0's in a diffusers state dict."""
    keys = [k for k in source if k.startswith("transformer_blocks.0.norm1.emb.")]
    return any(not torch.equal(source[k.replace(".0.", f".{i}.", 1)], source[k]) for i in range(1, depth) for k in keys)


def dit_from_diffusers(model: DiTTransformer2DModel) -> DiT:
    """A genlab ``DiT`` computing exactly what ``model`` computes, on its device and dtype.

    Blocks whose time/label embedders differ (a model trained with diffusers) give a DiT with
    ``per_block_embedding=True``; equal copies give the paper's single embedder. Raises ValueError for
    what genlab's DiT cannot express: other activations or norms, dropout, affine norms, non-square
    samples.
    """
    cfg = model.config
    unsupported = {
        "norm_type": (cfg.norm_type, "ada_norm_zero"),
        "activation_fn": (cfg.activation_fn, "gelu-approximate"),
        "dropout": (cfg.dropout, 0.0),
        "norm_elementwise_affine": (cfg.norm_elementwise_affine, False),
    }
    for name, (got, supported) in unsupported.items():
        if got != supported:
            raise ValueError(f"dit_from_diffusers: genlab's DiT supports only {name}={supported!r}, got {got!r}")
    if not isinstance(cfg.sample_size, int):
        raise ValueError(f"dit_from_diffusers: genlab's DiT needs a square int sample_size, got {cfg.sample_size!r}")
    out = cfg.out_channels or cfg.in_channels
    learn_sigma = out == 2 * cfg.in_channels
    source = model.state_dict()
    per_block = _embedders_differ(source, cfg.num_layers)
    dit = DiT(
        input_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=out // 2 if learn_sigma else out,
        learn_sigma=learn_sigma, patch_size=cfg.patch_size, hidden=cfg.num_attention_heads * cfg.attention_head_dim,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads, mlp_ratio=4.0, num_classes=cfg.num_embeds_ada_norm,
        class_dropout=0.1, qkv_bias=cfg.attention_bias, time_freq_shift=1.0, mlp_norm_eps=cfg.norm_eps,
        per_block_embedding=per_block,
    )
    # biases are absent with attention_bias=False; load_state_dict checks the rest. Shared embedders:
    # every block's (equal) copy lands on the one genlab key.
    state: dict[str, Tensor] = {g: source[d] for g, d in _key_map(cfg.num_layers, per_block) if d in source}
    dit.load_state_dict(state)
    param = next(model.parameters())
    return dit.to(device=param.device, dtype=param.dtype).train(model.training)


def dit_to_diffusers(dit: DiT) -> DiTTransformer2DModel:
    """A diffusers ``DiTTransformer2DModel`` computing exactly what ``dit`` computes.

    Raises ValueError for genlab options diffusers' DiT does not have: no classes, cross-attention,
    ``mlp_ratio != 4``, Fourier time features, ``time_freq_shift != 1`` (diffusers' timestep
    embedding is fixed), or an interval embedding. A DiT with one embedder writes it into every
    block; one with ``per_block_embedding`` writes each block's own.
    """
    from diffusers import DiTTransformer2DModel

    c = dit.config
    problems = [
        (c["num_classes"] is None, "num_classes=None (diffusers' DiT is always class-conditional)"),
        (c["cross_attention_dim"] is not None, f"cross_attention_dim={c['cross_attention_dim']}"),
        (c["mlp_ratio"] != 4.0, f"mlp_ratio={c['mlp_ratio']} (diffusers uses 4)"),
        (c["time_embedding"] != "sinusoidal", f"time_embedding={c['time_embedding']!r} (diffusers uses sinusoids)"),
        (c["time_freq_shift"] != 1.0, f"time_freq_shift={c['time_freq_shift']} (diffusers embeds time with "
                                      "downscale_freq_shift=1; build the DiT with time_freq_shift=1)"),
        (c["interval_embedding"], "interval_embedding=True (a second time input)"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"dit_to_diffusers: diffusers' DiTTransformer2DModel cannot express {what}")
    model = DiTTransformer2DModel(
        num_attention_heads=c["num_heads"], attention_head_dim=c["hidden"] // c["num_heads"],
        in_channels=c["in_channels"], out_channels=dit.out_channels, num_layers=c["depth"],
        attention_bias=c["qkv_bias"], sample_size=c["input_size"], patch_size=c["patch_size"],
        num_embeds_ada_norm=c["num_classes"], norm_eps=c["mlp_norm_eps"],
    )
    source = dit.state_dict()
    pairs = _key_map(c["depth"], c["per_block_embedding"])
    model.load_state_dict({d: source[g] for g, d in pairs if g in source})
    param = next(dit.parameters())
    model = model.to(param.device) if param.dtype == torch.float32 else model.to(param.device, param.dtype)
    return model.train(dit.training)
