"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): a network learns the
*average* velocity of a flow over an interval, so that one evaluation crosses the whole interval.

Time is genlab's (t = 0 the data, t = 1 the source), which is the paper's: z_t = (1 - t) x + t eps on
the straight path, instantaneous velocity v = dz/dt. The average velocity over [r, t] (Eq. 3) is

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,      so      z_r = z_t - (t - r) u(z_t, r, t).

Differentiating (t - r) u = int_r^t v ds in t (r fixed) gives the MeanFlow identity (Eq. 6):

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + d_t u   (Eq. 8),

the total derivative along the flow: one Jacobian-vector product of the network with tangent
(dz, dt) = (v, 1) (``torch.func.jvp``; forward mode, about the cost of a second forward pass). A loss
step (Algorithm 1) draws the pair and the path point as conditional flow matching does (any coupling,
source and path of :class:`~.flow_matching.ConditionalFlowMatching`; the conditional velocity v_t of the
path stands in for v, as in flow matching), then

    u_tgt = v_t - (t - r) sg(d/dt u_theta(z_t, r, t)),     L = sg(w) |u_theta(z_t, r, t) - u_tgt|^2   (Eq. 9),

|.|^2 summed over the coordinates, with the adaptive weight w = 1 / (|.|^2 + c)^p (Sec. 4.3; p = 1,
c = 1e-3 by default; p = 0 is the plain squared error). (t, r): two draws of the time distribution
(logit-normal(-0.4, 1) by default, the paper's best), t the larger; with probability 1 - ``ratio`` the
pair is set to r = t (75 % by default, Table 1a), where the target is the flow-matching one.

The network is a two-time backbone (``interval_embedding: true`` on ``mlp``, ``concat_mlp``, ``unet``,
``dit``): it sees the model time of t and the interval t_in(t) - t_in(r) (the paper embeds (t, t - r)).
It is wrapped in a velocity :class:`~genlab.diffusion.Denoiser`, and sampled with the ``mean_flow``
sampler (:class:`~genlab.diffusion.samplers.flow_euler.MeanFlowSampler`): z_r = z_t - (t - r) u on the
sampler's grid, one step from the source to the data with ``steps: 1`` (Algorithm 2).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import PositiveFloat, Range, UnitInterval
from ..core.registry import register
from ..diffusion.levels import broadcast
from ..diffusion.time_distributions import TimeDistribution
from .base import Batch, BuildContext
from .couplings import Coupling
from .flow_matching import CFMDraw, ConditionalFlowMatching
from .paths import Path, SchrodingerBridge


def mean_flow_times(t: Tensor, s: Tensor, generator: torch.Generator, ratio: float) -> tuple[Tensor, Tensor]:
    """(t, r) [B] from two draws t, s [B] of a time distribution: t the larger, r the smaller, and r = t
    for each row with probability 1 - ``ratio`` (one uniform draw per row from ``generator``)."""
    hi, lo = torch.maximum(t, s), torch.minimum(t, s)
    apart = torch.rand(t.shape, generator=generator, device=t.device) < ratio
    return hi, torch.where(apart, lo, hi)


@register("objective", "meanflow")
class MeanFlow(ConditionalFlowMatching):
    """MeanFlow (see the module's docstring): average-velocity training through the MeanFlow identity.

    Args:
        coupling, path, source, prediction: as :class:`~.flow_matching.ConditionalFlowMatching` (any
            coupling and source; the paper's path is ``cond_ot`` on ``rectified_flow``).
        t_distribution: the distribution of both time draws (default logit-normal(-0.4, 1)).
        ratio: the fraction of rows with r != t (0.25, the paper's; at 0 the loss is flow matching's,
            with t the larger of two draws).
        adaptive_p, adaptive_c: the adaptive weight 1 / (|error|^2 + c)^p (p = 1, c = 1e-3).
    """

    def __init__(self, coupling: Coupling | str | dict = "independent", path: Path | str | dict = "cond_ot",
                 source: str | dict | None = None,
                 t_distribution: TimeDistribution | str | dict | None = None,
                 prediction: Literal["velocity"] = "velocity", ratio: UnitInterval = 0.25,
                 adaptive_p: Annotated[float, Range(ge=0, le=4)] = 1.0, adaptive_c: PositiveFloat = 1e-3) -> None:
        if t_distribution is None:
            t_distribution = {"type": "logit_normal", "mean": -0.4, "std": 1.0}
        super().__init__(coupling, path, source, t_distribution, prediction)
        self.ratio, self.adaptive_p, self.adaptive_c = ratio, adaptive_p, adaptive_c

    def build(self, context: BuildContext) -> None:
        """As flow matching's; ValueError for the Schrödinger-bridge path and unless the model takes an
        interval (a two-time backbone)."""
        super().build(context)
        if isinstance(self.path, SchrodingerBridge):
            raise ValueError("meanflow: path schrodinger_bridge is a stochastic bridge (its sampling needs a score "
                             "network and an SDE); MeanFlow's average velocity is of a deterministic flow: use "
                             "path cond_ot or variance_preserving")
        if self.ratio > 0 and not getattr(context.model, "takes_interval", False):
            raise ValueError(f"meanflow: the model ({type(context.model).__name__}) must be a two-time network "
                             "u(z, r, t): set model.interval_embedding: true (mlp, concat_mlp, unet, dit)")

    def draw_times(self, draw: CFMDraw, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t, r) [B] for a flow-matching draw: its t and one more draw of the time distribution, then
        :func:`mean_flow_times`."""
        s = self.t_distribution.sample(self.context.process, len(draw.t), generator, device=draw.t.device)
        return mean_flow_times(draw.t, s.to(draw.t.dtype), generator, self.ratio)

    def average_velocity(self, model: Any, z: Tensor, t: Tensor, r: Tensor, cond: dict[str, Tensor],
                         tangent: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """u_theta(z, r, t) [B, ...] for z [B, ...], t, r [B], and, with ``tangent`` = v [B, ...], its total
        derivative d/dt u = v . grad_z u + d_t u along (v, 1) (Eq. 8; one forward-mode JVP), else None."""
        denoiser = self.denoiser(model)
        t_in_r = denoiser.model_time(r)

        def u(z: Tensor, t: Tensor) -> Tensor:
            return denoiser.raw(z, denoiser.level(t, z), interval=denoiser.model_time(t) - t_in_r, **cond)

        if tangent is None:
            return u(z, t), None
        return torch.func.jvp(u, (z, t), (tangent, torch.ones_like(t)))

    def loss_at(self, model: Any, draw: CFMDraw, r: Tensor | None = None) -> Tensor:
        """Eq. 9 at a flow-matching draw (its t the larger time) and r [B] (default r = t): the mean over
        the batch of sg(w) |u_theta - u_tgt|^2."""
        r = draw.t if r is None else r
        point = self.path.sample(draw.x0, draw.x1, draw.t, draw.eps)
        u, du_dt = self.average_velocity(model, point.x_t, draw.t, r, draw.cond, tangent=point.velocity)
        h = broadcast((draw.t - r).to(u.dtype), u)
        target = (point.velocity - h * du_dt).detach()
        error = (u - target).square().flatten(1).sum(1)  # [B]
        weight = (error.detach() + self.adaptive_c).pow(-self.adaptive_p)
        return (weight * error).mean()

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """:meth:`loss_at` of a flow-matching draw and :meth:`draw_times` (drawn after it)."""
        draw = self.draw(batch, generator)
        t, r = self.draw_times(draw, generator)
        return self.loss_at(modules["model"], draw._replace(t=t), r)
