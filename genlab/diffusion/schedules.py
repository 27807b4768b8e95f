"""Noise schedules of variance-preserving processes, as log alpha_bar(t) on t in [0, 1].

``alpha_bar = alpha^2`` is DDPM's cumulative product (Ho et al. 2020, Eq. 4). Each schedule is
given in continuous time and, through :func:`discrete_alphas_cumprod`, as the T-step table that
Hugging Face diffusers builds (``DDPMScheduler(beta_schedule=...)``), so trained models match.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
T_REF = 1000  # continuous-time betas are T_REF * the per-step betas (score_sde: 0.1 .. 20)
# The cosine schedule reaches alpha_bar = 0 at t = 1; like the clipped discrete table (whose last
# log-SNR is -19.8 in diffusers' squaredcos_cap_v2) it is floored at log-SNR -20 near t = 1.
COSINE_FLOOR = -math.log1p(math.exp(20.0))  # log sigmoid(-20)


def log_alpha_bar(schedule: str, t: Tensor, *, beta_start: float = 1e-4, beta_end: float = 0.02,
                  cosine_s: float = 0.008, sigmoid_range: tuple[float, float] = (-3.0, 3.0),
                  sigmoid_tau: float = 1.0) -> Tensor:
    """log alpha_bar(t) of a continuous schedule, t: any shape in [0, 1].

    linear: beta(t) = b0 + t (b1 - b0), log alpha_bar = -int_0^t beta (Song et al. 2021, Eq. 33);
    scaled_linear: sqrt(beta) linear in t (Stable Diffusion); cosine: Nichol & Dhariwal 2021, Eq. 17;
    sigmoid: Chen 2023, "On the importance of noise scheduling", Algorithm 1.
    The cosine schedule is floored at log-SNR -20 (alpha_bar = 2e-9) near t = 1.
    """
    b0, b1 = beta_start * T_REF, beta_end * T_REF
    if schedule == "linear":
        return -(b0 * t + 0.5 * (b1 - b0) * t**2)
    if schedule == "scaled_linear":
        r0, r1 = math.sqrt(b0), math.sqrt(b1)
        u = (r1 - r0) * t  # int_0^t (r0 + (r1 - r0) s)^2 ds = ((r0 + u)^3 - r0^3) / (3 (r1 - r0))
        return -t * (r0**2 + r0 * u + u**2 / 3)
    if schedule == "cosine":
        f = lambda u: torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2)  # noqa: E731
        lab = 2 * (torch.log(f(t).clamp_min(1e-20)) - torch.log(f(torch.zeros_like(t))))
        return lab.clamp(min=COSINE_FLOOR, max=0)
    if schedule == "sigmoid":
        start, end = sigmoid_range
        v_start, v_end = (torch.sigmoid(torch.tensor(v / sigmoid_tau, dtype=t.dtype, device=t.device))
                          for v in (start, end))
        v = torch.sigmoid((t * (end - start) + start) / sigmoid_tau)
        return torch.log(((v_end - v) / (v_end - v_start)).clamp(1e-9, 1.0))
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def discrete_alphas_cumprod(schedule: str, timesteps: int, *, beta_start: float = 1e-4,
                            beta_end: float = 0.02, max_beta: float = 0.999, **kwargs: float) -> Tensor:
    """The T-step ``alphas_cumprod`` table [T] (float64), as diffusers' DDPMScheduler builds it.

    linear / scaled_linear: betas linear in beta / sqrt(beta) from beta_start to beta_end;
    cosine (diffusers' ``squaredcos_cap_v2``) and sigmoid: beta_i = min(1 - ab((i+1)/T) / ab(i/T),
    max_beta) from the continuous alpha_bar (Nichol & Dhariwal 2021, Eq. 17 and below).
    """
    T = timesteps
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    else:
        grid = torch.arange(T + 1, dtype=torch.float64) / T
        lab = log_alpha_bar(schedule, grid, **kwargs)
        betas = (1 - torch.exp(lab[1:] - lab[:-1])).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(alpha_bar: Tensor, floor: float = 2.0**-24) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the last entry is zero (Lin et al. 2024, Algorithm 1).

    The terminal value is then raised to ``floor`` (as diffusers does) so eps-parameterised
    conversions stay finite; alpha_bar: [..., T] with the noisiest entry last.
    """
    root = alpha_bar.sqrt()
    first, last = root[..., :1], root[..., -1:]
    root = (root - last) * first / (first - last)
    return (root**2).clamp_min(floor)
