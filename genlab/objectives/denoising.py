"""Denoising objectives: regression with any target (denoising score matching), and flow matching.

The loss is w(t) |raw - target|^2 with raw the network output. Weightings are defined on the
x0-space error (Kingma & Gao 2023, "Understanding diffusion objectives"): a weight w_x0 on
|x0_hat - x0|^2 is applied as w_x0 b^2 to the raw error, b = d x0 / d raw, so a weighting means
the same thing under every prediction type. ``constant`` is the plain MSE on the raw output.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import PositiveFloat
from ..core.registry import build, register
from ..diffusion.denoiser import Denoiser
from ..diffusion.levels import Level, combine
from ..diffusion.predictions import PredictionType
from ..diffusion.processes import Process
from ..diffusion.time_distributions import TimeDistribution
from .base import Batch, Objective, conditions

Weighting = Literal["constant", "snr", "min_snr", "edm"]


@register("objective", "denoising")
class DenoisingObjective(Objective):
    """Denoising score matching: regress the network output on its target at x_t.

    Args:
        prediction: what the network predicts (eps, x0, v, score, velocity).
        preconditioning: ``"edm"`` for Karras et al.'s F-parameterisation (prediction ignored).
        t_distribution: how training times are drawn (uniform, log_normal, logit_normal).
        weighting: ``constant`` (plain MSE on the output), ``snr`` (x0 error weighted by SNR, the
            eps-MSE), ``min_snr`` (x0 error weighted by min(SNR, gamma), Hang et al. 2023, Eq. 8),
            ``edm`` (x0 error weighted by 1 / c_out^2, Karras et al. 2022, Eq. 8 and Table 1).
        min_snr_gamma: gamma of min-SNR (> 0); sigma_data: EDM's data std (> 0).
    """

    def __init__(self, prediction: PredictionType = "eps", preconditioning: Literal["edm"] | None = None,
                 t_distribution: TimeDistribution | str | dict = "uniform", weighting: Weighting = "constant",
                 min_snr_gamma: PositiveFloat = 5.0, sigma_data: PositiveFloat = 0.5) -> None:
        self.prediction, self.preconditioning, self.sigma_data = prediction, preconditioning, sigma_data
        self.t_distribution = build("time_distribution", t_distribution, path="objective.t_distribution")
        self.weighting, self.min_snr_gamma = weighting, min_snr_gamma

    def denoiser(self, model: Any, process: Process | None = None) -> Denoiser:
        """The :class:`Denoiser` this objective trains ``model`` as (on the experiment's process by default)."""
        process = self.context.process if process is None else process
        return Denoiser(model, process, self.prediction, self.preconditioning, self.sigma_data)

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """:meth:`__call__` on the batch, the model as the objective's Denoiser."""
        cond = conditions(batch)
        return self(self.denoiser(modules["model"]), batch["x"], generator=generator, **cond)

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples with the experiment's sampler (in ``steps`` steps) from the model as a Denoiser."""
        denoiser = self.guided(self.denoiser(modules["model"]))
        return self.context.sampler.sample(denoiser, shape=(n, *self.context.data_shape),
                                           steps=steps, generator=generator, progress=False, cond=cond)

    def x0_weight(self, level: Level) -> Tensor:
        """w_x0(t), the weight of |x0_hat - x0|^2."""
        snr = (level.alpha / level.sigma) ** 2
        if self.weighting == "snr":
            return snr
        if self.weighting == "min_snr":
            return snr.clamp(max=self.min_snr_gamma)
        if self.weighting == "edm":
            s, sd = level.sigma_edm, self.sigma_data
            return (s**2 + sd**2) / (s * sd) ** 2
        raise ValueError(f"unknown weighting {self.weighting!r}; expected constant, snr, min_snr or edm")

    def pair(self, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """The coupling of data and noise (independent here; minibatch OT in a subclass)."""
        return x0, eps

    def __call__(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
                 **cond: Any) -> Tensor:
        """The mean loss over the batch x0 [B, ...] (noise and times drawn from ``generator``)."""
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x0, eps = self.pair(x0, eps)
        level = denoiser.process.level(self.t_distribution.sample(denoiser.process, x0.shape[0], generator,
                                                                  device=x0.device))
        x_t = combine(*zip(level.coef("alpha", "sigma"), (x0, eps)))
        raw = denoiser.raw(x_t, level, **cond)
        err = (raw - denoiser.target(x0, eps, x_t, level)).square().flatten(1).mean(1)
        if self.weighting != "constant":
            err = err * (self.x0_weight(level) * denoiser.x0_sensitivity(level) ** 2).to(err.dtype)
        return err.mean()


@register("objective", "flow_matching")
class FlowMatchingObjective(DenoisingObjective):
    """Conditional flow matching (Lipman et al. 2023, Eq. 23; Liu et al. 2023): regress the
    velocity alpha' x0 + sigma' eps of the path, t ~ U[t_min, t_max], independent coupling, on the
    experiment's process and its Gaussian prior. Couplings (OT-CFM), the paths of
    :mod:`genlab.objectives.paths` and other sources (a data set): objective ``cfm``
    (:class:`genlab.objectives.flow_matching.ConditionalFlowMatching`)."""

    def __init__(self, prediction: PredictionType = "velocity",
                 t_distribution: TimeDistribution | str | dict = "uniform", weighting: Weighting = "constant",
                 min_snr_gamma: PositiveFloat = 5.0) -> None:
        super().__init__(prediction, None, t_distribution, weighting, min_snr_gamma)


