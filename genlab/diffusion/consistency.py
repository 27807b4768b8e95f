"""The consistency-model parameterisation (Song et al. 2023, "Consistency Models", Sec. 3 and App. C).

A consistency model maps any point x_t of a probability-flow ODE trajectory to the trajectory's end
at the smallest noise level sigma_min (their epsilon). It is parameterised so that it is the identity
there (their Eq. 5's boundary condition, built in rather than learned):

    f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)),                      (Song et al., Eq. 5)
    c_skip(t) = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out(t)  = (sigma - sigma_min) sigma_data / sqrt(sigma_data^2 + sigma^2),        (App. C)

so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly. The network's inputs are EDM's (Karras
et al. 2022, Table 1): c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4 (Song et al.'s
code feeds 1000 ln(sigma) / 4; the factor is the embedding's business).

Every process: these formulas are for alpha = 1 (Song et al. use EDM's x = x0 + sigma eps). Here
sigma is Karras' sigma = sigma_t / alpha_t of the level (:attr:`Level.sigma_edm`) and the formulas act
on the scaled sample x^ = x / alpha, since x_t = alpha (x0 + sigma_edm eps) for every process (VP,
sub-VP, DDPM's table, rectified flow; alpha = 1 for VE and EDM). f's output is in the data's scale:
the estimate of the ODE's end x^(sigma_min), the data up to noise of std sigma_min. At the boundary
level f(x, t_min) = x / alpha(t_min) (the identity on x^; on x itself for VE and EDM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.bounds import PositiveFloat, checked
from .denoiser import Denoiser
from .levels import Level, Scalar, combine
from .processes import Process, edm_c_noise


def consistency_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) [same shape as sigma] of Song et al. 2023 (App. C; c_in, c_noise of
    Karras et al. 2022, Table 1) at Karras' sigma = sigma_t / alpha_t, for the scaled sample x^ = x / alpha:
    f = c_skip x^ + c_out F(c_in x^, c_noise).

    Below the boundary (sigma < sigma_min, levels a consistency model is not trained on) sigma - sigma_min
    is taken as 0: f is the identity there too (c_skip = 1, c_out = 0), as at the boundary itself.
    """
    offset = (sigma - sigma_min).clamp_min(0)
    norm = torch.sqrt(sigma**2 + sigma_data**2)
    return sigma_data**2 / (offset**2 + sigma_data**2), offset * sigma_data / norm, 1 / norm, edm_c_noise(sigma)


@checked
class ConsistencyDenoiser(Denoiser):
    """A consistency model as a :class:`Denoiser`: its x0 is the consistency function f(x, t).

    x0 = f = c_skip(sigma) x / alpha + c_out(sigma) F(c_in(sigma) x / alpha, c_noise(sigma)) with Song et
    al.'s scalings (:func:`consistency_scalings`) at sigma = sigma_t / alpha_t of the level, and eps =
    (x - alpha x0) / sigma_t, the noise that x0 implies (so x = alpha x0 + sigma eps holds; at the boundary,
    where x0 = x / alpha, it is 0). Both are linear in (x, F): the samplers' fast path (:meth:`linear`),
    every sampler and every wrapper that takes a Denoiser work with it.

    Args:
        model: the backbone F, ``model(x_in [B, ...], c_noise [B], **cond) -> [B, ...]``.
        process: the noise process x_t = alpha x0 + sigma eps.
        sigma_data: the data's std in Song et al.'s formulas (> 0; 0.5 for images in [-1, 1]).
        sigma_min: the boundary, a Karras sigma (> 0, below the process's sigma_edm at t_max): f is the
            identity at levels with sigma_t / alpha_t = sigma_min. Default: the process's level at its
            t_min (0.002 on EDM, Song et al.'s epsilon).

    ``prediction`` is ``"x0"`` and ``preconditioning`` is ``"consistency"``: read-only labels, the
    network's output is F.
    """

    def __init__(self, model: Callable[..., Tensor], process: Process, sigma_data: PositiveFloat = 0.5,
                 sigma_min: PositiveFloat | None = None) -> None:
        super().__init__(model, process, "x0", None, sigma_data)
        if sigma_min is None:
            sigma_min = float(process.level(process.t_min).sigma_edm)
        top = float(process.level(process.t_max).sigma_edm)
        if not sigma_min < top:
            raise ValueError(f"ConsistencyDenoiser: sigma_min ({sigma_min:g}) must be below the largest noise level "
                             f"sigma / alpha = {top:g} of {process} (at t_max)")
        self.sigma_min = float(sigma_min)
        self.preconditioning = "consistency"

    def scalings(self, level: Level) -> tuple[Scalar, Scalar, Scalar, Scalar]:
        """(c_skip, c_out, c_in, c_noise) of :func:`consistency_scalings` at the level, for x^ = x / alpha
        (floats on a shared level, float64 [B] tensors per sample)."""
        key = ("consistency", self.sigma_data, self.sigma_min)
        return level.values(key, lambda lv: consistency_scalings(lv.sigma_edm, self.sigma_data, self.sigma_min))

    def network_input(self, level: Level) -> tuple[Scalar, Scalar]:
        """(c_in / alpha, c_noise): the network sees c_in x^ = (c_in / alpha) x and c_noise = ln(sigma) / 4."""
        key = ("consistency_input", self.sigma_data)

        def inputs(lv: Level) -> tuple[Tensor, Tensor]:
            _, _, c_in, c_noise = consistency_scalings(lv.sigma_edm, self.sigma_data, self.sigma_min)
            return c_in / lv.alpha, c_noise

        return level.values(key, inputs)

    def coefficients(self, level: Level) -> tuple[Scalar, Scalar, Scalar, Scalar]:
        """(a_x0, b_x0, a_eps, b_eps) with x0 = f = (c_skip / alpha) x + c_out F and eps = (x - alpha x0) /
        sigma_t = ((1 - c_skip) / sigma_t) x - (alpha c_out / sigma_t) F (exactly 0 and 0 at the boundary)."""

        def coefficients(lv: Level) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            c_skip, c_out, _, _ = consistency_scalings(lv.sigma_edm, self.sigma_data, self.sigma_min)
            return c_skip / lv.alpha, c_out, (1 - c_skip) / lv.sigma, -lv.alpha * c_out / lv.sigma

        return level.values(("consistency_coefficients", self.sigma_data, self.sigma_min), coefficients)

    def to_x0_eps(self, raw: Tensor, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(x0, eps) [B, ...] from the backbone's output F at (x, level)."""
        a_x0, b_x0, a_eps, b_eps = self.coefficients(level)
        return combine((a_x0, x), (b_x0, raw)), combine((a_eps, x), (b_eps, raw))

    def consistency(self, x: Tensor, t: Tensor | float | Level, **cond: Any) -> Tensor:
        """f(x, t) [B, ...]: the estimate of the ODE trajectory's end x^(sigma_min), in the data's scale."""
        return self(x, t, **cond)[0]

    def target(self, x0: Tensor, eps: Tensor, x: Tensor, level: Level) -> Tensor:
        """F's output that makes f equal ``x0`` [B, ...] at x: (x0 - (c_skip / alpha) x) / c_out (EDM's
        regression target with these scalings; undefined at the boundary, where c_out = 0). Consistency
        training and distillation compare f at two levels instead; this is for regression to a known end."""
        a_x0, b_x0, _, _ = self.coefficients(level)
        return combine((1 / b_x0, x0), (-a_x0 / b_x0, x))

    def extra_repr(self) -> str:
        return f"process={self.process}, sigma_data={self.sigma_data:g}, sigma_min={self.sigma_min:g}"


@checked
class ConsistencyOnDenoiser(ConsistencyDenoiser):
    """A consistency function on a diffusion model's parameterisation: with x0_D(x, t) the x0 estimate of
    ``denoiser`` (its prediction type, time input, preconditioning; on the same network),

        f(x, t) = c_skip(t) x^ + (1 - c_skip(t)) x0_D(x, t),     c_skip of Song et al. 2023 (App. C),

    the identity at sigma_min (c_skip = 1) as Eq. 5 requires, and x0_D itself far from it. A student
    initialised from its teacher's weights then starts at the teacher's one-step x0 estimate, whereas
    with Song et al.'s c_in, c_noise and c_out it would start from a network fed another time input and
    asked for another output (their teacher was EDM-preconditioned, so the two coincided). f is linear
    in (x, raw) as every Denoiser: a_x0 = c_skip / alpha + (1 - c_skip) a_D, b_x0 = (1 - c_skip) b_D.
    """

    def __init__(self, denoiser: Denoiser, sigma_data: PositiveFloat = 0.5,
                 sigma_min: PositiveFloat | None = None) -> None:
        super().__init__(denoiser.model, denoiser.process, sigma_data, sigma_min)
        self.inner = denoiser

    def network_input(self, level: Level) -> tuple[Scalar, Scalar]:
        """The inner denoiser's network input (scale, time input)."""
        return self.inner.network_input(level)

    def coefficients(self, level: Level) -> tuple[Scalar, Scalar, Scalar, Scalar]:
        """(a_x0, b_x0, a_eps, b_eps) of f (see the class) and eps = (x - alpha f) / sigma_t."""
        a_d, b_d, _, _ = self.inner.coefficients(level)
        c_skip = self.scalings(level)[0]
        a_x0, b_x0 = c_skip / level.coef("alpha")[0] + (1 - c_skip) * a_d, (1 - c_skip) * b_d
        alpha, sigma = level.coef("alpha", "sigma")
        return a_x0, b_x0, (1 - alpha * a_x0) / sigma, -alpha * b_x0 / sigma

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, on {self.inner.prediction} prediction"
