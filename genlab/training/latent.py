"""Latent diffusion in a training config: the ``latent:`` section (Rombach et al. 2022, Sec. 3).

A frozen autoencoder (:class:`~genlab.models.autoencoders.Autoencoder`) moves the experiment from pixels to its
latent space::

    latent: {autoencoder: runs/vae_digits, sample: true}
    data: {type: digits, image_size: 32}           # images [1, 32, 32]
    model: {type: unet, ...}                       # built for latents [4, 8, 8]: in_channels, input_size from them

- ``autoencoder``: a genlab run or checkpoint directory of an ``autoencoder_kl`` / ``autoencoder_vq`` (its EMA
  weights, as every pretrained component loads: :func:`~genlab.training.experiment.load_pretrained`), or a
  diffusers ``AutoencoderKL`` / ``VQModel`` directory (or a pipeline directory: its ``vae/``) converted through
  :func:`genlab.interop.from_diffusers`. It is frozen and in eval mode, moved to the device of what it encodes,
  and never part of the objective's modules: no optimizer, no EMA, not in a checkpoint (the config names it);
- training: each batch's images ``x`` [B, C, H, W] become ``to_latent(x, generator, sample)`` =
  ``scaling_factor * (z - shift_factor)`` [B, c, H / f, W / f] before the objective sees them (the Trainer's one
  hook; the posterior draw comes from the step's generator, so a resumed run repeats it); ``sample: false``
  trains on the posterior's mode;
- the experiment's ``data_shape`` is the latent's (the model, the prior and every sampler work on latents,
  unchanged); ``image_shape`` is the data's;
- evaluation: every sample is decoded with ``from_latent`` before its picture and metrics (classifier accuracy
  and Frechet distance on digits, as for a pixel model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.bounds import PositiveInt, checked
from ..core.errors import ConfigError, GenlabError
from ..core.registry import construct
from ..models.autoencoders import Autoencoder


@checked
@dataclass
class LatentConfig:
    """The ``latent:`` section."""

    autoencoder: str  # a genlab run / checkpoint directory, or a diffusers AutoencoderKL (or pipeline) directory
    sample: bool = True  # train on posterior draws (False: the posterior's mode)
    decode_batch: PositiveInt = 256  # samples decoded at a time in the evaluation


def load_autoencoder(path: str, pretrained: Callable[[str], Any] | None = None) -> Autoencoder:
    """The autoencoder that ``path`` names (see the module docstring), frozen and in eval mode; GenlabError
    for a path that holds none. ``pretrained``: how a genlab run is loaded (default
    :func:`~genlab.training.experiment.load_pretrained`; an Experiment passes one that pins the checkpoint)."""
    root = Path(path)
    if (root / "config.json").is_file() or (root / "vae" / "config.json").is_file():
        from ..interop.diffusers import from_diffusers

        model = from_diffusers(root, subfolder=None if (root / "config.json").is_file() else "vae")
    else:
        if pretrained is None:
            from .experiment import load_pretrained as pretrained
        model = pretrained(path).model
    if not isinstance(model, Autoencoder):
        raise GenlabError(f"{path}: holds a {type(model).__name__}, not an autoencoder (autoencoder_kl, "
                          "autoencoder_vq or a diffusers AutoencoderKL / VQModel)")
    return model.eval().requires_grad_(False)


class LatentSpace:
    """The built ``latent:`` section: the frozen autoencoder, the latent shape, encoding and decoding."""

    def __init__(self, cfg: LatentConfig, image_shape: tuple[int, ...], source: str = "config",
                 pretrained: Callable[[str], Any] | None = None) -> None:
        self.cfg = cfg
        try:
            self.autoencoder = load_autoencoder(cfg.autoencoder, pretrained)
        except (GenlabError, ValueError, OSError) as e:
            raise ConfigError(f"{source}: latent.autoencoder: {e}") from None
        ae, f = self.autoencoder, self.autoencoder.downsample
        channels = getattr(ae, "in_channels", None)
        if len(image_shape) != 3 or (channels is not None and image_shape[0] != channels) or \
                image_shape[1] % f or image_shape[2] % f:
            raise ConfigError(f"{source}: latent.autoencoder: {cfg.autoencoder} encodes images [{channels or 'C'}, H, W] "
                              f"with H and W multiples of {f}; the data's items are {list(image_shape)}")
        self.image_shape = tuple(image_shape)
        self.shape = (ae.latent_channels, image_shape[1] // f, image_shape[2] // f)

    def _on(self, device: torch.device) -> Autoencoder:
        """The autoencoder, moved to ``device`` the first time it is needed there."""
        if next(self.autoencoder.parameters()).device != torch.device(device):
            self.autoencoder.to(device)
        return self.autoencoder

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
        """``batch`` with its images ``x`` [B, C, H, W] replaced by their latents [B, c, h, w] (float32, drawn
        from ``generator`` unless ``sample`` is false)."""
        x = batch["x"]
        z = self._on(x.device).to_latent(x.float(), generator, sample=self.cfg.sample)
        return {**batch, "x": z}

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images [B, C, H, W] of latents ``z`` [B, c, h, w] (``from_latent``, ``decode_batch`` at a time)."""
        ae = self._on(z.device)
        dtype = next(ae.parameters()).dtype
        return torch.cat([ae.from_latent(chunk.to(dtype)) for chunk in z.split(self.cfg.decode_batch)])

    def decoding(self, sample: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``sample`` (any function returning latents) followed by :meth:`decode`."""
        return lambda *args, **kwargs: self.decode(sample(*args, **kwargs))


def latent_from(config: Any, image_shape: tuple[int, ...], data: Any, source: str = "config",
                pretrained: Callable[[str], Any] | None = None) -> LatentSpace | None:
    """The ``latent:`` section built (None without one), checked against the data."""
    section = config.get("latent")
    if section is None:
        return None
    if getattr(data, "control", None) is not None:
        raise ConfigError(f"{source}: latent: the data set gives control images, which stay in pixel space; a "
                          "latent ControlNet is not supported (drop data.control or latent)")
    return LatentSpace(construct(LatentConfig, section, path="latent", source=source), image_shape, source, pretrained)
