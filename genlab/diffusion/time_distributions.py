"""Distributions of training times t on a process: uniform, log-normal in sigma (EDM), logit-normal (SD3)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.bounds import NonNegativeFloat
from ..core.registry import register, register_namespace
from .levels import level_dtype
from .processes import Process


class TimeDistribution:
    """Base: ``sample(process, n, generator, device) -> t [n]`` (float64) on ``device`` (default: the
    generator's device, else the CPU); draws come from ``generator``, which must live there."""

    def sample(self, process: Process, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        raise NotImplementedError


def _draw(draw: str, n: int, generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """n uniform (``"rand"``) or standard normal (``"randn"``) draws [n] from ``generator`` on
    ``device`` (default: the generator's device), in the dtype of levels."""
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return getattr(torch, draw)(n, generator=generator, dtype=level_dtype(device), device=device)


register_namespace("time_distribution", TimeDistribution, "training-time distributions")


@register("time_distribution", "uniform")
class UniformT(TimeDistribution):
    """t ~ U[t_min, t_max] of the process (Ho et al. 2020; Song et al. 2021)."""

    def sample(self, process: Process, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        return process.t_min + (process.t_max - process.t_min) * _draw("rand", n, generator, device)


@register("time_distribution", "log_normal")
class LogNormalSigma(TimeDistribution):
    """ln(sigma / alpha) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1, "training"), clipped
    to the process's range (p_std >= 0; 0 is a single level)."""

    def __init__(self, p_mean: float = -1.2, p_std: NonNegativeFloat = 1.2) -> None:
        self.p_mean, self.p_std = p_mean, p_std

    def sample(self, process: Process, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        log_sigma = self.p_mean + self.p_std * _draw("randn", n, generator, device)
        return process.t_of_log_snr(-2 * log_sigma).clamp(process.t_min, process.t_max)


@register("time_distribution", "logit_normal")
class LogitNormalT(TimeDistribution):
    """t = sigmoid(N(m, s^2)) scaled to [t_min, t_max] (Esser et al. 2024, SD3, Eq. 19); s >= 0."""

    def __init__(self, mean: float = 0.0, std: NonNegativeFloat = 1.0) -> None:
        self.mean, self.std = mean, std

    def sample(self, process: Process, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        u = torch.sigmoid(self.mean + self.std * _draw("randn", n, generator, device))
        return process.t_min + (process.t_max - process.t_min) * u
