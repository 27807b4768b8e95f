"""The noise-conditional classifier of classifier guidance: cross-entropy on noised data."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.gradient_guidance import noisy_logits
from ..core.bounds import UnitInterval
from ..core.errors import GenlabError
from ..core.registry import build, register
from ..diffusion.levels import combine
from ..diffusion.time_distributions import TimeDistribution
from .base import Batch, BuildContext, Objective


@register("objective", "noisy_classifier")
class NoisyClassifier(Objective):
    """-log p(y | x_t, t) of a time-conditioned classifier (``time_classifier``) on x_t = alpha x0 + sigma eps,
    t from ``t_distribution`` over the process (Dhariwal & Nichol 2021, Sec. 4.1: a classifier trained on
    noised images, for classifier guidance; the guidance is ``guidance: {type: classifier, classifier: RUN}``).
    It draws no samples: its evaluation is the accuracy on the held-out test split at the times ``report_t``
    (fractions of the process's t_max), each image noised once from the evaluation's seed.

    Args:
        t_distribution: how training times are drawn (uniform, log_normal, logit_normal).
        report_t: fractions of t_max at which the evaluation reports accuracy.
    """

    draws_samples = False

    def __init__(self, t_distribution: TimeDistribution | str | dict = "uniform",
                 report_t: tuple[UnitInterval, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
        self.t_distribution = build("time_distribution", t_distribution, path="objective.t_distribution")
        self.report_t = tuple(report_t)

    def build(self, context: BuildContext) -> None:
        super().build(context)
        if context.num_classes is None:
            raise ValueError("noisy_classifier needs labelled data and a model with num_classes "
                             "(model: time_classifier)")

    def noised(self, x0: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Any]:
        """(x_t [B, ...], its level) for data x0 [B, ...] at times t [B], the noise drawn from ``generator``."""
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        level = self.context.process.level(t)
        return combine(*zip(level.coef("alpha", "sigma"), (x0, eps))), level

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """The mean cross-entropy over the batch (``x`` [B, ...], ``class_labels`` [B])."""
        x0 = batch["x"]
        t = self.t_distribution.sample(self.context.process, x0.shape[0], generator, device=x0.device)
        x_t, level = self.noised(x0, t, generator)
        return F.cross_entropy(noisy_logits(modules["model"], self.context.process, x_t, level).float(),
                               batch["class_labels"])

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        raise GenlabError("noisy_classifier trains a classifier, which draws no samples; guide a diffusion run "
                          "with it: genlab sample RUN guidance.type=classifier guidance.classifier=THIS_RUN")

    def sampling_steps(self) -> None:
        return None

    @torch.no_grad()
    def metrics(self, modules: dict[str, nn.Module], images: Tensor, labels: Tensor,
                generator: torch.Generator) -> dict[str, float]:
        """``classifier_accuracy_t{f}``: the accuracy on ``images`` [N, ...] (``labels`` [N]) noised at
        t = max(f t_max, t_min), for each f of ``report_t``."""
        process, out = self.context.process, {}
        for f in self.report_t:
            t = torch.full((len(images),), max(f * process.t_max, process.t_min), dtype=torch.float64,
                           device=images.device)
            x_t, level = self.noised(images, t, generator)
            logits = noisy_logits(modules["model"], process, x_t, level)
            out[f"classifier_accuracy_t{f:g}"] = (logits.argmax(1) == labels).float().mean().item()
        return out
