"""``from_diffusers`` / ``to_diffusers``: genlab models from diffusers models or checkpoints, and back.

Supported: ``UNet2DModel``, ``UNet2DConditionModel`` (Stable Diffusion 1.x layout),
``DiTTransformer2DModel``, ``ControlNetModel`` (genlab's ``ControlNet``), ``T2IAdapter`` (genlab's
``T2IAdapter``), ``AutoencoderKL`` and ``VQModel`` (genlab's ``AutoencoderKL`` and ``VQAutoencoder``), and a
Stable Diffusion pipeline directory (``model_index.json`` with ``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``: a ``LatentTextToImage``, see ``genlab.interop.stable_diffusion``). Checkpoints load
through diffusers' ``from_pretrained`` (safetensors); nothing is downloaded unless the path is a hub
id and diffusers is allowed to fetch it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters.controlnet import ControlNet
from ..adapters.t2i_adapter import T2IAdapter
from ..core.errors import GenlabError
from ..models.autoencoders import AutoencoderKL, VQAutoencoder
from ..models.dit import DiT
from ..models.unet import UNet

CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "ControlNetModel", "T2IAdapter",
           "AutoencoderKL", "VQModel")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise GenlabError("diffusers interoperability needs the diffusers package: pip install 'genlab[interop]'") from e
    return diffusers


def load_diffusers(path: str | os.PathLike, subfolder: str | None = None) -> nn.Module:
    """A diffusers model from a local directory holding ``config.json`` (the class is read from
    ``_class_name``; a pipeline directory needs ``subfolder``, e.g. "unet" or "transformer")."""
    root = Path(path) / (subfolder or "")
    config = root / "config.json"
    if not config.is_file():
        raise GenlabError(f"{root}: no config.json; pass the model directory (or subfolder='unet' for a pipeline)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in CLASSES:
        raise GenlabError(f"{config}: model class {name!r} is not supported; expected one of {', '.join(CLASSES)}")
    return getattr(_diffusers(), name).from_pretrained(str(root))


def from_diffusers(model_or_path: nn.Module | str | os.PathLike, subfolder: str | None = None,
                   **kwargs: Any) -> UNet | DiT | ControlNet | T2IAdapter | AutoencoderKL | VQAutoencoder | Any:
    """The equivalent genlab model with converted weights (outputs equal to 1e-5 in float32). A Stable
    Diffusion pipeline directory (``model_index.json``, no ``subfolder``) gives a
    :class:`~genlab.adapters.latent_text_to_image.LatentTextToImage` (``kwargs``: ``dtype``, ``device``; see
    :func:`~genlab.interop.stable_diffusion.stable_diffusion_from_diffusers`)."""
    from .autoencoder_weights import autoencoder_from_diffusers
    from .dit_weights import dit_from_diffusers
    from .t2i_weights import t2i_adapter_from_diffusers
    from .unet_weights import controlnet_from_diffusers, unet_from_diffusers

    pipeline = not isinstance(model_or_path, nn.Module) and subfolder is None
    if pipeline and (Path(model_or_path) / "model_index.json").is_file():
        from .stable_diffusion import stable_diffusion_from_diffusers

        return stable_diffusion_from_diffusers(model_or_path, **kwargs)
    if kwargs:
        raise TypeError(f"from_diffusers: unexpected arguments {sorted(kwargs)} (they are for a pipeline directory)")
    model = model_or_path if isinstance(model_or_path, nn.Module) else load_diffusers(model_or_path, subfolder)
    name = type(model).__name__
    if name in ("AutoencoderKL", "VQModel"):
        return autoencoder_from_diffusers(model)
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        return unet_from_diffusers(model)
    if name == "DiTTransformer2DModel":
        return dit_from_diffusers(model)
    if name == "ControlNetModel":
        return controlnet_from_diffusers(model)
    if name == "T2IAdapter":
        return t2i_adapter_from_diffusers(model)
    raise GenlabError(f"from_diffusers: {name} is not supported; expected one of {', '.join(CLASSES)}")


def to_diffusers(model: UNet | DiT | ControlNet | T2IAdapter | AutoencoderKL | VQAutoencoder) -> nn.Module:
    """The equivalent diffusers model (``save_pretrained`` it to use it with diffusers' pipelines)."""
    from .autoencoder_weights import autoencoder_to_diffusers
    from .dit_weights import dit_to_diffusers
    from .t2i_weights import t2i_adapter_to_diffusers
    from .unet_weights import controlnet_to_diffusers, unet_to_diffusers

    if isinstance(model, (AutoencoderKL, VQAutoencoder)):
        return autoencoder_to_diffusers(model)
    if isinstance(model, ControlNet):
        return controlnet_to_diffusers(model)
    if isinstance(model, T2IAdapter):
        return t2i_adapter_to_diffusers(model)
    if isinstance(model, UNet):
        return unet_to_diffusers(model)
    if isinstance(model, DiT):
        return dit_to_diffusers(model)
    raise GenlabError(f"to_diffusers: expected a genlab UNet, DiT, ControlNet, T2IAdapter, AutoencoderKL or "
                      f"VQAutoencoder, got {type(model).__name__}")
