"""Latent text-to-image diffusion (Rombach et al. 2022, Sec. 3.3: Stable Diffusion): a text encoder gives the
cross-attention context, a backbone denoises autoencoder latents, the autoencoder decodes them.

:class:`LatentTextToImage` composes genlab's own parts and no pipeline code: the backbone (a cross-attending
``UNet`` or ``DiT``) becomes a :class:`~genlab.diffusion.Denoiser` on ``process`` with ``prediction``,
classifier-free guidance is :class:`~genlab.adapters.guidance.CFG` with the negative prompts' context as its
unconditional branch, any genlab sampler integrates from the prior to the grid's end, and the autoencoder's
``from_latent`` (``decode(z / scaling_factor + shift_factor)``) gives the images.
``genlab.interop.stable_diffusion`` builds one from a diffusers Stable Diffusion directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import DDIM
from ..diffusion.denoiser import Denoiser
from ..diffusion.grids import TimeGrid
from ..diffusion.processes import Process
from ..diffusion.samplers.base import Sampler
from ..models.autoencoders import Autoencoder
from .guidance import CFG
from .text_encoder import TextEncoder


class LatentTextToImage(nn.Module):
    """Text-to-image sampling in an autoencoder's latent space: ``sample(prompts) -> images [B, C, H, W]`` in [-1, 1].

    Args:
        backbone: ``backbone(z_t [B, c, h, w], t_model [B], context=[B, L, D]) -> [B, c, h, w]``.
        autoencoder: its latents are the backbone's space (``from_latent`` decodes them).
        text_encoder: prompts -> context ``[B, L, D]``; the empty prompt is the default negative prompt.
        process: the diffusion process the backbone was trained on; ``prediction``: its output type.
        grid: the default time grid of :meth:`sample` (None: the sampler's own).
        t_end: where the default grid ends: 0 (the data) or a time > 0 whose latents are decoded as they are
            (diffusers' ``set_alpha_to_one=False``: the last step goes to the first DDPM step, t = 1 / T).
        size: the default image size (H, W).
    """

    def __init__(self, backbone: nn.Module, autoencoder: Autoencoder, text_encoder: TextEncoder, process: Process,
                 prediction: str = "eps", grid: TimeGrid | None = None, t_end: float = 0.0,
                 size: tuple[int, int] = (512, 512)) -> None:
        super().__init__()
        if not 0 <= t_end < process.t_max:
            raise ValueError(f"LatentTextToImage: t_end must be in [0, {process.t_max}), got {t_end}")
        f = autoencoder.downsample
        if len(size) != 2 or size[0] % f or size[1] % f:
            raise ValueError(f"LatentTextToImage: size must be (H, W), multiples of the autoencoder's {f}, got {size}")
        self.backbone, self.autoencoder, self.text_encoder = backbone, autoencoder, text_encoder
        self.process, self.prediction, self.grid, self.t_end, self.size = process, prediction, grid, t_end, tuple(size)
        Denoiser(backbone, process, prediction)  # checks the prediction type now

    @property
    def denoiser(self) -> Denoiser:
        """The backbone as a :class:`Denoiser` on the process (made per call: not a second copy in the state dict)."""
        return Denoiser(self.backbone, self.process, self.prediction)

    def timesteps(self, steps: int, sampler: Sampler | None = None) -> Tensor:
        """The default grid [N + 1] for ``steps`` steps: ``grid`` (else the sampler's own), its end moved to
        ``t_end`` (times at or below ``t_end`` dropped)."""
        times = (self.grid(self.process, steps) if self.grid is not None
                 else (sampler or DDIM(steps)).timesteps(self.process, steps))
        if self.t_end > 0:
            times = torch.cat([times[times > self.t_end], times.new_full((1,), self.t_end)])
        return times

    def guided(self, negative: Tensor, guidance_scale: float) -> Any:
        """The denoiser with classifier-free guidance of scale w away from the context ``negative`` ``[B, L, D]``
        (the unconditional branch; w = 1: the conditional model alone, one call)."""
        return CFG(guidance_scale, uncond={"context": negative}).wrap(self.denoiser)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *, steps: int = 50,
               guidance_scale: float = 7.5, sampler: Sampler | None = None, generator: torch.Generator | None = None,
               latents: Tensor | None = None, size: tuple[int, int] | None = None, times: Tensor | None = None,
               progress: bool = False) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] for ``prompts`` (B strings).

        ``negative_prompts`` (default: the empty prompt) is the unconditional branch of classifier-free
        guidance with scale ``guidance_scale`` (u + w (c - u): diffusers' formula; w = 1 runs the conditional
        model alone, and w < 1 blends toward the negative prompt, where diffusers' pipeline turns guidance off).
        ``sampler`` (default ``DDIM(steps)``) runs on ``times`` (default :meth:`timesteps`) from ``latents``
        ``[B, c, H / f, W / f]`` (default: a prior draw from ``generator``, on its device, for ``size``, default
        ``self.size``). The latents are decoded in the autoencoder's dtype: after ``model.half()``,
        ``model.autoencoder.float()`` decodes in float32 (what diffusers' ``force_upcast`` asks for).
        """
        prompts = list(prompts)
        negative = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"LatentTextToImage: {len(prompts)} prompts but {len(negative)} negative prompts")
        sampler = sampler or DDIM(steps)
        weight = next(self.backbone.parameters())
        if latents is None:
            h, w = size or self.size
            f = self.autoencoder.downsample
            shape = (len(prompts), self.autoencoder.latent_channels, h // f, w // f)
            device = weight.device if generator is None else generator.device  # a CPU generator on any device
            latents = self.process.prior(shape, generator=generator, dtype=weight.dtype, device=device)
            latents = latents.to(weight.device)
        elif latents.shape[0] != len(prompts):
            raise ValueError(f"LatentTextToImage: latents hold {latents.shape[0]} samples for {len(prompts)} prompts")
        context = self.text_encoder(prompts).to(weight)
        guided = self.guided(self.text_encoder(negative).to(weight), guidance_scale)
        times = self.timesteps(steps, sampler) if times is None else times
        z = sampler.sample(guided, latents, times=times, generator=generator, cond={"context": context},
                           progress=progress)
        return self.autoencoder.from_latent(z.to(next(self.autoencoder.parameters()).dtype)).clamp(-1, 1)

    def forward(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, **kwargs: Any) -> Tensor:
        """:meth:`sample`."""
        return self.sample(prompts, negative_prompts, **kwargs)
