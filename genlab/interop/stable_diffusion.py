"""Stable Diffusion 1.x / 2.x from a diffusers pipeline directory, as genlab parts.

``stable_diffusion_from_diffusers(path)`` reads a ``StableDiffusionPipeline`` directory (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and returns a
:class:`~genlab.adapters.latent_text_to_image.LatentTextToImage`: the ``UNet2DConditionModel`` as genlab's
``UNet`` (``unet_weights``), the ``AutoencoderKL`` as genlab's (``autoencoder_weights``; its
``scaling_factor``), the CLIP text encoder as :class:`~genlab.adapters.text_encoder.TextEncoder`, and from the
scheduler's config the process and the default grid:

- the process: genlab's ``DiscreteVP`` of ``num_train_timesteps`` steps with the config's betas
  (``linear`` / ``scaled_linear`` from ``beta_start``, ``beta_end``, or ``trained_betas``;
  ``rescale_betas_zero_snr``: zero terminal SNR), the prediction type from ``prediction_type``;
- the grid: genlab's ``ddpm`` grid with the config's ``timestep_spacing`` ("leading" with ``steps_offset``,
  or "trailing"), ending at the data, or, with ``set_alpha_to_one=False`` (Stable Diffusion's), at the
  first DDPM step (t = 1 / T), whose latents diffusers decodes as they are.

As ``StableDiffusionPipeline`` does when it loads a scheduler, ``steps_offset`` is taken as 1 and
``clip_sample`` as False whatever the file says (diffusers rewrites such "outdated" configs).

With genlab's DDIM on this grid the model computes what ``StableDiffusionPipeline`` with a ``DDIMScheduler``
of that config computes (tested to 1e-4 on the images); other genlab samplers run on the same model.
Options that would change that and genlab does not implement raise a ``ValueError`` naming them
(``clip_sample``, ``thresholding``, other beta schedules, "linspace" spacing, which DDIM rounds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..adapters.latent_text_to_image import LatentTextToImage
from ..adapters.text_encoder import TextEncoder
from ..core.errors import GenlabError
from ..diffusion import DDPMGrid, DiscreteVP
from .autoencoder_weights import autoencoder_from_diffusers
from .diffusers import load_diffusers
from .unet_weights import unet_from_diffusers

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_FIXED = {"clip_sample": (False, None), "thresholding": (False, None), "beta_schedule": ("linear", "scaled_linear"),
          "timestep_spacing": ("leading", "trailing", None), "prediction_type": (*PREDICTIONS, None)}


def scheduler_process(cfg: dict[str, Any]) -> tuple[DiscreteVP, str, DDPMGrid, float]:
    """``(process, prediction, grid, t_end)`` of a diffusers DDPM-family scheduler config (see the module
    docstring); ValueError naming an option genlab does not reproduce."""
    for name, allowed in _FIXED.items():
        if name in cfg and cfg[name] not in allowed and not (name == "beta_schedule" and cfg.get("trained_betas")):
            raise ValueError(f"scheduler: option {name}={cfg[name]!r} is not supported by genlab's Stable Diffusion "
                             f"(supported: {', '.join(repr(a) for a in allowed if a is not None)})")
    T = int(cfg.get("num_train_timesteps", 1000))
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("trained_betas"):
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
        process = DiscreteVP(alphas_cumprod=torch.cumprod(1 - betas, 0).tolist(), zero_terminal_snr=zero_snr)
    else:
        process = DiscreteVP(cfg.get("beta_schedule", "linear"), T, float(cfg.get("beta_start", 1e-4)),
                             float(cfg.get("beta_end", 0.02)), zero_terminal_snr=zero_snr)
    grid = DDPMGrid(cfg.get("timestep_spacing") or "leading", int(cfg.get("steps_offset", 0)))
    t_end = 0.0 if cfg.get("set_alpha_to_one", True) else 1.0 / process.T
    return process, PREDICTIONS[cfg.get("prediction_type") or "epsilon"], grid, t_end


def stable_diffusion_from_diffusers(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                                    device: torch.device | str | None = None) -> LatentTextToImage:
    """The Stable Diffusion pipeline directory ``path`` as a :class:`LatentTextToImage` in ``dtype`` on ``device``
    (see the module docstring); nothing is downloaded."""
    root = Path(path)
    if not (root / "model_index.json").is_file():
        raise GenlabError(f"{root}: no model_index.json; pass a Stable Diffusion pipeline directory (vae/, unet/, "
                          "text_encoder/, tokenizer/, scheduler/)")
    index = json.loads((root / "model_index.json").read_text())
    missing = [c for c in COMPONENTS if c not in index]
    if missing or "text_encoder_2" in index:
        what = f"names no {', '.join(missing)}" if missing else "has a second text encoder (SDXL)"
        raise GenlabError(f"{root}: this {index.get('_class_name', 'pipeline')} {what}: not a Stable Diffusion 1.x / "
                          f"2.x pipeline; pass subfolder=... to convert one of its models")
    config = root / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise GenlabError(f"{root}: no scheduler/scheduler_config.json")
    scheduler = {**json.loads(config.read_text()), "steps_offset": 1, "clip_sample": False}  # as the pipeline
    process, prediction, grid, t_end = scheduler_process(scheduler)
    peer_unet = load_diffusers(root, "unet")
    unet, vae = unet_from_diffusers(peer_unet), autoencoder_from_diffusers(load_diffusers(root, "vae"))
    text = TextEncoder.from_pretrained(root, dtype=dtype)
    if text.hidden_size != unet.config["cross_attention_dim"]:
        raise ValueError(f"{root}: the text encoder's width {text.hidden_size} is not the UNet's "
                         f"cross_attention_dim {unet.config['cross_attention_dim']}")
    side = int(peer_unet.config.sample_size) * vae.downsample
    model = LatentTextToImage(unet.eval(), vae.eval(), text, process, prediction, grid, t_end, (side, side))
    return model.to(device=device, dtype=dtype)
