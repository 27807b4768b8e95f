"""Time grids: where a sampler evaluates the model, from t_max down to the data at t = 0.

A grid for N steps is a float64 tensor of N + 1 decreasing times. By default it places N points
in [t_min, t_max] with its spacing and then ends at t = 0 (the clean data), as k-diffusion and
diffusers do; ``final="min"`` instead ends at t_min (for ODE accuracy and likelihood studies).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from ..core.errors import ConfigError
from ..core.registry import register, register_namespace
from .processes import DiscreteVP, Process

Final = Literal["zero", "min"]


class TimeGrid:
    """Base: ``grid(process, steps) -> [steps + 1]`` times, decreasing."""

    def __call__(self, process: Process, steps: int) -> Tensor:
        raise NotImplementedError


register_namespace("grid", TimeGrid, "time grids for samplers")

#: what a sampler's ``grid`` accepts: a grid, a registered name or a config mapping ({type: name, ...})
GridSpec = TimeGrid | str | Mapping[str, Any]


class SpacedGrid(TimeGrid):
    """A grid given by a spacing between t_max and t_min; subclasses define ``spacing``."""

    def __init__(self, t_min: float | None = None, t_max: float | None = None, final: Final = "zero") -> None:
        self.t_min, self.t_max, self.final = t_min, t_max, final

    def spacing(self, process: Process, t_max: float, t_min: float, n: int) -> Tensor:
        raise NotImplementedError

    def __call__(self, process: Process, steps: int) -> Tensor:
        if steps < 1:
            raise ValueError(f"a grid needs at least 1 step, got {steps}")
        t_max = process.t_max if self.t_max is None else self.t_max
        t_min = process.t_min if self.t_min is None else self.t_min
        if self.final == "min":
            return self.spacing(process, t_max, t_min, steps + 1)
        if steps == 1:
            return torch.tensor([t_max, 0.0], dtype=torch.float64)
        return torch.cat([self.spacing(process, t_max, t_min, steps), torch.zeros(1, dtype=torch.float64)])


@register("grid", "uniform")
class UniformTime(SpacedGrid):
    """Uniform in t (DDIM's "linspace" in continuous time; flow matching's Euler grid)."""

    def spacing(self, process: Process, t_max: float, t_min: float, n: int) -> Tensor:
        return torch.linspace(t_max, t_min, n, dtype=torch.float64)


@register("grid", "log_snr")
class UniformLogSNR(SpacedGrid):
    """Uniform in the log-SNR l (Lu et al. 2022, DPM-Solver, Sec. 3.3 "logSNR" steps), or with
    ``snr_shift`` = s > 0 uniform in u = log(SNR + s) = l + log(1 + s e^-l).

    Why the shift: at high noise the denoiser's x0 estimate of data at scale d moves like
    SNR d^2 (for Gaussian data along the ODE, x0_hat = x0 (1 + 1 / (SNR d^2))^-1/2), so the
    solver's error per unit log-SNR vanishes there and uniform log-SNR spends steps on nothing.
    u is log-SNR where SNR >> s (Karras sigma << s^-1/2) and SNR itself where SNR << s: the steps
    widen smoothly above sigma ~ s^-1/2, every step still shrinks as steps grow (no truncated
    start, no error floor at the top), and the grid resembles the big-first-step shape of
    "Align Your Steps" (Sabour et al. 2024) without fitting. genlab's choice, not a paper equation.

    ``sigma_min`` / ``sigma_max`` set the ends in Karras' sigma = sigma / alpha instead of t (the
    one of t_min / sigma_min that is noisier wins; sigma_max above the process's range is t_max).
    Starting below the process's sigma_max treats the start noise as drawn there: for
    variance-preserving processes, whose x_T hardly changes at high noise, this is what diffusers'
    "leading" spacing does; it leaves an error that more steps do not remove (``snr_shift`` does
    not). Ending at sigma_min > 0 leaves one too: the last step returns x0_hat at sigma_min, whose
    distance to the ODE's end point is O(sigma_min^2). With ``sigma_min_steps`` = M, sigma_min holds
    for grids of up to M steps and shrinks as sigma_min (M / N)^(sigma_min_order / 2) for N > M, so
    that this error falls as N^-sigma_min_order, at the order of the solver (3 for UniPC-2 with its
    corrector), until the process's own t_min is reached.
    """

    def __init__(self, t_min: float | None = None, t_max: float | None = None, final: Final = "zero",
                 sigma_min: float | None = None, sigma_max: float | None = None, snr_shift: float = 0.0,
                 sigma_min_steps: int | None = None, sigma_min_order: float = 3.0) -> None:
        super().__init__(t_min, t_max, final)
        if not (snr_shift >= 0 and math.isfinite(snr_shift)):
            raise ConfigError(f"grid log_snr: snr_shift must be a finite number >= 0, got {snr_shift!r}")
        if sigma_min_steps is not None and not (sigma_min_steps >= 1 and sigma_min_order > 0):
            raise ConfigError(f"grid log_snr: need sigma_min_steps >= 1 and sigma_min_order > 0, got "
                              f"{sigma_min_steps!r}, {sigma_min_order!r}")
        self.sigma_min, self.sigma_max, self.snr_shift = sigma_min, sigma_max, snr_shift
        self.sigma_min_steps, self.sigma_min_order = sigma_min_steps, sigma_min_order

    def end_sigma(self, steps: int) -> float | None:
        """The grid's sigma_min for a grid of ``steps`` steps (see ``sigma_min_steps``)."""
        if self.sigma_min is None or self.sigma_min_steps is None or steps <= self.sigma_min_steps:
            return self.sigma_min
        return self.sigma_min * (self.sigma_min_steps / steps) ** (self.sigma_min_order / 2)

    def spacing(self, process: Process, t_max: float, t_min: float, n: int) -> Tensor:
        sigma_min = self.end_sigma(n if self.final == "zero" else n - 1)
        if self.sigma_max is not None:
            t_max = min(t_max, float(process.t_of_sigma_edm(torch.tensor(self.sigma_max, dtype=torch.float64))))
        if sigma_min is not None:
            t_min = max(t_min, float(process.t_of_sigma_edm(torch.tensor(sigma_min, dtype=torch.float64))))
        ends = process.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64))
        if not torch.isfinite(ends).all():
            raise ConfigError(f"grid log_snr: log-SNR is infinite at t in [{t_min}, {t_max}] of {process}; "
                              "set grid.t_max / grid.t_min inside the process's open range")
        s = self.snr_shift
        u = ends + torch.log1p(s * torch.exp(-ends))  # log(SNR + s), without losing SNR << s
        u = torch.linspace(u[0], u[1], n, dtype=torch.float64)
        log_snr = u + torch.log1p(-s * torch.exp(-u))  # log(e^u - s)
        log_snr[0], log_snr[-1] = ends[0], ends[-1]  # the ends exactly, whatever rounding did
        return process.t_of_log_snr(log_snr)


# The default grid of genlab's fast multistep sampler (UniPC): log(SNR + 0.03) (steps widen above
# Karras sigma ~ 6), ending at sigma 0.045 and then the data for up to 20 steps; beyond 20 steps the
# end shrinks as (20 / N)^1.5, so the error of ending there falls at UniPC's order 3 and the default
# converges (down to the process's t_min). Chosen with scripts/bench_samplers.py's problems on other
# start noise than the script's (DDPM linear, exact eps; shift 1/sigma^2 for sigma in 4..10, sigma_min
# 0.04-0.05, sigma_min_steps 10-20); the script's "UniPC bh2 (log_snr)" row shows what the shift buys
# and its convergence lines what the moving end buys.
FAST_GRID: Mapping[str, Any] = MappingProxyType({"type": "log_snr", "snr_shift": 0.03, "sigma_min": 0.045,
                                                 "sigma_min_steps": 20})


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> Tensor:
    """n Karras sigmas [n] (float64) from sigma_max down to sigma_min (Karras et al. 2022, Eq. 5):
    sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@register("grid", "karras")
class Karras(SpacedGrid):
    """Karras sigmas (:func:`karras_sigmas`, Karras et al. 2022, Eq. 5) in sigma = sigma / alpha,
    mapped to the process's time."""

    def __init__(self, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None,
                 final: Final = "zero") -> None:
        super().__init__(final=final)
        self.rho, self.sigma_min, self.sigma_max = rho, sigma_min, sigma_max

    def spacing(self, process: Process, t_max: float, t_min: float, n: int) -> Tensor:
        ends = process.level(torch.tensor([t_max, t_min], dtype=torch.float64)).sigma_edm
        s_max = float(ends[0]) if self.sigma_max is None else self.sigma_max
        s_min = float(ends[1]) if self.sigma_min is None else self.sigma_min
        if not (0 < s_min < s_max < float("inf")):
            raise ConfigError(f"grid karras: need 0 < sigma_min < sigma_max < inf, got {s_min:g}, {s_max:g} "
                              f"for {process}; set grid.sigma_max / grid.sigma_min")
        return process.t_of_sigma_edm(karras_sigmas(s_max, s_min, n, self.rho))


@register("grid", "ddpm")
class DDPMGrid(TimeGrid):
    """Integer-step grids of a :class:`DiscreteVP` in diffusers' conventions, ending at the data.

    ``leading``: i * (T // N) + offset; ``trailing``: round(T - i T / N) - 1; ``linspace``:
    linspace(0, T - 1, N) unrounded (Euler / Heun); or explicit DDPM step indices ``timesteps``.
    (Lin et al. 2024, Table 2, compares these spacings.)
    """

    def __init__(self, spacing: Literal["leading", "trailing", "linspace"] = "trailing", offset: int = 0,
                 timesteps: list[float] | None = None) -> None:
        self.spacing, self.offset, self.timesteps = spacing, offset, timesteps

    def indices(self, T: int, steps: int) -> Tensor:
        if self.timesteps is not None:
            return torch.as_tensor(self.timesteps, dtype=torch.float64)
        if self.spacing == "leading":
            return torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (T // steps) + self.offset
        if self.spacing == "trailing":
            return torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1
        return torch.linspace(T - 1, 0, steps, dtype=torch.float64)

    def __call__(self, process: Process, steps: int) -> Tensor:
        if not isinstance(process, DiscreteVP):
            raise ConfigError(f"grid ddpm needs a discrete process (type: ddpm), got {process}")
        t = (self.indices(process.T, steps) + 1) / process.T
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@register("grid", "explicit")
class ExplicitGrid(TimeGrid):
    """A given list of decreasing times (the number of steps is len(times) - 1)."""

    def __init__(self, times: list[float]) -> None:
        self.times = torch.as_tensor(times, dtype=torch.float64)

    def __call__(self, process: Process, steps: int | None = None) -> Tensor:
        return self.times.clone()
