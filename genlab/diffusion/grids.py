"""Time grids: where a sampler evaluates the model, from t_max down to the data at t = 0.

A grid for N steps is a float64 tensor of N + 1 decreasing times. By default it places N points
in [t_min, t_max] with its spacing and then ends at t = 0 (the clean data), as k-diffusion and
diffusers do; ``final="min"`` instead ends at t_min (for ODE accuracy and likelihood studies).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from ..core.bounds import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from ..core.errors import ConfigError
from ..core.registry import register, register_namespace
from .processes import DiscreteVP, Process, check_decreasing_values

Final = Literal["zero", "min"]


def check_decreasing(who: str, times: Sequence[float] | Tensor, field: str = "times") -> Tensor:
    """``times`` as a float64 tensor [N + 1], after a ValueError naming ``who``, ``field`` and the first
    bad entry unless it is a grid: N >= 1, finite, >= 0 and strictly decreasing (noise to data)."""
    t = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
    valid = torch.isfinite(t) & (t >= 0)
    check_decreasing_values(who, field, t, valid, "a finite time >= 0", "from the noise to the data")
    return t


def check_times(who: str, times: Tensor, process: Process) -> Tensor:
    """``times`` [N + 1] unchanged after the checks of :func:`check_decreasing` and that they lie in
    [0, t_max] of ``process`` (a grid starts at most at the noisiest time and ends at the data, t = 0,
    or above it); ValueError naming ``who``, the bad value and the process's range otherwise."""
    t = check_decreasing(who, times)
    if float(t[0]) > process.t_max * (1 + 1e-12):
        raise ValueError(f"{who}: times[0] = {float(t[0]):g} is above t_max = {process.t_max:g} of {process}; "
                         f"times must lie in [0, {process.t_max:g}]")
    return times


class TimeGrid:
    """Base: ``grid(process, steps) -> [steps + 1]`` times, decreasing."""

    def __call__(self, process: Process, steps: int) -> Tensor:
        raise NotImplementedError


register_namespace("grid", TimeGrid, "time grids for samplers")

#: what a sampler's ``grid`` accepts: a grid, a registered name or a config mapping ({type: name, ...})
GridSpec = TimeGrid | str | Mapping[str, Any]


class SpacedGrid(TimeGrid):
    """A grid given by a spacing between t_max and t_min; subclasses define ``spacing``."""

    def __init__(self, t_min: NonNegativeFloat | None = None, t_max: PositiveFloat | None = None,
                 final: Final = "zero") -> None:
        if t_min is not None and t_max is not None and not t_min < t_max:
            raise ValueError(f"{type(self).__name__}: t_min ({t_min:g}) must be < t_max ({t_max:g})")
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
    """Uniform in t (DDIM's "linspace" in continuous time; flow matching's Euler grid), optionally
    time-shifted (Esser et al. 2024, SD3, Sec. 5.3.2): with u = t / T on the process's [0, T],

        t_shift = T s u / (1 + (s - 1) u),

    which keeps both ends; ``shift`` s > 1 spends more steps near the noise, s < 1 near the data (a
    few-step flow-matching sampler gains there: ``scripts/bench_flow_matching.py``).

    Args:
        t_min, t_max, final: as :class:`SpacedGrid`.
        shift: s > 0 (1: no shift).
    """

    def __init__(self, t_min: NonNegativeFloat | None = None, t_max: PositiveFloat | None = None,
                 final: Final = "zero", shift: PositiveFloat = 1.0) -> None:
        super().__init__(t_min, t_max, final)
        self.shift = shift

    def spacing(self, process: Process, t_max: float, t_min: float, n: int) -> Tensor:
        t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
        if self.shift == 1.0:
            return t
        u = t / process.t_max
        return process.t_max * self.shift * u / (1 + (self.shift - 1) * u)


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

    def __init__(self, t_min: NonNegativeFloat | None = None, t_max: PositiveFloat | None = None,
                 final: Final = "zero", sigma_min: PositiveFloat | None = None, sigma_max: PositiveFloat | None = None,
                 snr_shift: NonNegativeFloat = 0.0, sigma_min_steps: PositiveInt | None = None,
                 sigma_min_order: PositiveFloat = 3.0) -> None:
        super().__init__(t_min, t_max, final)
        check_sigma_range(type(self).__name__, sigma_min, sigma_max)
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


def check_sigma_range(who: str, sigma_min: float | None, sigma_max: float | None) -> None:
    """ValueError unless sigma_min < sigma_max where both are given."""
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise ValueError(f"{who}: sigma_min ({sigma_min:g}) must be < sigma_max ({sigma_max:g})")


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> Tensor:
    """n Karras sigmas [n] (float64) from sigma_max down to sigma_min (Karras et al. 2022, Eq. 5):
    sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@register("grid", "karras")
class Karras(SpacedGrid):
    """Karras sigmas (:func:`karras_sigmas`, Karras et al. 2022, Eq. 5) in sigma = sigma / alpha,
    mapped to the process's time."""

    def __init__(self, rho: PositiveFloat = 7.0, sigma_min: PositiveFloat | None = None,
                 sigma_max: PositiveFloat | None = None, final: Final = "zero") -> None:
        super().__init__(final=final)
        check_sigma_range(type(self).__name__, sigma_min, sigma_max)
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

    def __init__(self, spacing: Literal["leading", "trailing", "linspace"] = "trailing", offset: NonNegativeInt = 0,
                 timesteps: list[NonNegativeFloat] | None = None) -> None:
        if timesteps is not None and len(timesteps) > 1:
            check_decreasing(type(self).__name__, timesteps, "timesteps")
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
        if self.timesteps is None and steps > process.T:
            raise ValueError(f"{type(self).__name__}: {steps} steps on the {process.T} steps of {process}: a DDPM grid "
                             f"takes at most T = {process.T} steps")
        t = (self.indices(process.T, steps) + 1) / process.T
        return check_times(type(self).__name__, torch.cat([t, torch.zeros(1, dtype=torch.float64)]), process)


@register("grid", "explicit")
class ExplicitGrid(TimeGrid):
    """A given list of strictly decreasing times >= 0 (the number of steps is len(times) - 1); on a
    process, they must lie in [0, t_max]."""

    def __init__(self, times: list[NonNegativeFloat]) -> None:
        self.times = check_decreasing(type(self).__name__, times)

    def __call__(self, process: Process, steps: int | None = None) -> Tensor:
        return check_times(type(self).__name__, self.times.clone(), process)
