"""The guidance weight as a condition: what a guidance-distilled student (Meng et al. 2023, Sec. 4.1) needs in
every objective that trains or samples it (stage one, :mod:`.guided_distillation`; stage two, progressive
distillation with w kept as a condition, :mod:`.distillation`).

The student's backbone takes ``guidance_scale`` w (genlab's scale: 1 is the conditional model) as a keyword
condition; training draws w ~ U[w_min, w_max] per example; sampling fixes w from the config's ``guidance:
{scale: w}`` (``genlab sample RUN guidance.scale=w``), one call per step instead of classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.guidance import CFG, GuidedDenoiser
from ..diffusion.denoiser import Denoiser
from ..diffusion.levels import Level

SCALE = "guidance_scale"  # the condition a guidance-distilled backbone takes (genlab's w)


def sampling_scale(guidance: Any) -> float:
    """The w a guidance-conditioned student samples with: the scale of the config's classifier-free guidance
    (``guidance: {scale: s}``), 1 (the conditional model) without one. ValueError for settings a student that
    takes w cannot honour (rescale, an interval, another unconditional branch, another guidance method)."""
    if guidance is None:
        return 1.0
    if type(guidance) is not CFG or guidance.rescale or guidance.interval is not None \
            or guidance.uncond != {"class_labels": -1}:
        raise ValueError(f"a guidance-distilled student takes the guidance weight as an input and samples with "
                         f"guidance: {{scale: w}} alone, got {guidance!r}; drop the other guidance settings")
    return guidance.scale


def check_student(model: nn.Module, who: str) -> None:
    """ValueError unless ``model`` takes the guidance weight (``guidance_embedding``) and keeps its labels."""
    if getattr(model, "guidance_embed", None) is None:
        raise ValueError(f"{who}: the student must take the guidance weight as an input; build it with "
                         "model.guidance_embedding: true")
    dropout = getattr(model, "config", {}).get("class_dropout", 0.0)
    if dropout:
        raise ValueError(f"{who}: the student learns the guided prediction for its label, which it must see: "
                         f"set model.class_dropout: 0 (got {dropout})")


class ScaleConditioned(GuidedDenoiser):
    """A guidance-distilled student's Denoiser with its guidance weight fixed: ``raw`` is the wrapped one's
    with ``guidance_scale=w`` added to the condition (one call; the fast path kept)."""

    def __init__(self, denoiser: Denoiser, scale: float) -> None:
        super().__init__(denoiser)
        self.scale = float(scale)
        self.guidance = f"guidance_scale={self.scale:g}"

    def raw(self, x: Tensor, level: Level, **cond: Any) -> Tensor:
        return self.inner.raw(x, level, **cond, **{SCALE: self.scale})


def draw_scales(w_range: tuple[float, float], n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """w ~ U[w_min, w_max] per example: [n] float64 on ``like``'s device, from ``generator``."""
    lo, hi = w_range
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64, device=like.device)


def described(method: str, scale: float) -> str:
    """How a guidance-distilled student samples, for the evaluation: ``method`` at its w, one call per step."""
    return f"{method} at guidance_scale={scale:g} (w an input: one call per step)"
