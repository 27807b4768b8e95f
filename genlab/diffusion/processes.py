"""Gaussian noise processes x_t = alpha(t) x0 + sigma(t) eps in continuous time.

One picture for all of them (Karras et al. 2022, Sec. 2; Kingma et al. 2021, VDM): DDPM, the
VP / sub-VP / VE SDEs (Song et al. 2021), EDM and rectified flow differ only in alpha, sigma and
their time range. Every process reaches the clean data at t = 0 (alpha = 1, sigma = 0) and its
noisiest level at ``t_max``; samplers work on :class:`Level` values and never on a formula.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..core.bounds import NonNegativeFloat, PositiveFloat, Range
from ..core.registry import register, register_namespace
from .levels import Level, level_dtype
from .schedules import T_REF, discrete_alphas_cumprod, log_alpha_bar, rescale_zero_terminal_snr


def edm_c_noise(sigma: Tensor) -> Tensor:
    """c_noise(sigma) = ln(sigma) / 4: the noise level a network is given under EDM's conventions
    (Karras et al. 2022, Table 1), for the EDM process's model time and EDM preconditioning alike."""
    return torch.log(sigma) / 4


class Process:
    """Base class: subclasses define ``alpha`` and ``sigma`` on [0, t_max] (any tensor shape).

    Generic parts: log-SNR and its inverse (bisection unless overridden), t-derivatives (autograd
    unless overridden), SDE coefficients, the prior, and the time fed to a network.
    """

    t_min: float  # smallest nonzero time a grid or a training distribution uses
    t_max: float  # the noisiest time; sampling starts there

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt) at t, by autograd through ``alpha`` and ``sigma``. When t itself
        requires grad (a time grid being learned), the derivatives keep their graph, so gradients
        reach t through them too (the velocity conversion uses them)."""
        keep = t.requires_grad and torch.is_grad_enabled()
        with torch.enable_grad():
            u = t if keep else t.detach().requires_grad_(True)
            d_alpha = torch.autograd.grad(self.alpha(u).sum(), u, create_graph=keep)[0]
            d_sigma = torch.autograd.grad(self.sigma(u).sum(), u, create_graph=keep)[0]
        return d_alpha, d_sigma

    def level(self, t: Tensor | float) -> Level:
        """The :class:`Level` at t ([], [B] or a grid [N + 1, ...]), in float64 on t's device."""
        t = t.to(level_dtype(t.device)) if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64)
        return Level(t, self.alpha(t), self.sigma(t), *self.derivatives(t))

    def log_snr(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2) at t (= 2 lambda, lambda = log(alpha / sigma))."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of ``log_snr`` by bisection on [0, t_max] (log-SNR decreases in t)."""
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        lo, hi = torch.zeros_like(log_snr), torch.full_like(log_snr, self.t_max)
        for _ in range(64):
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > log_snr
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def t_of_sigma_edm(self, sigma: Tensor | float) -> Tensor:
        """The time at which sigma / alpha equals ``sigma`` (Karras et al.'s noise level)."""
        return self.t_of_log_snr(-2 * torch.log(torch.as_tensor(sigma, dtype=torch.float64)))

    def model_time(self, t: Tensor) -> Tensor:
        """The time a network is given: 1000 t for processes on [0, 1] (DDPM-style embeddings)."""
        return 1000 * t

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift rate f(t) and squared diffusion g(t)^2 of dx = f x dt + g dW matching the marginals
        (see :attr:`Level.sde`)."""
        return self.level(t).sde

    def prior_std(self) -> float:
        """Std of x at t_max for unit-variance data: sqrt(alpha^2 + sigma^2)."""
        alpha, sigma = self.level(self.t_max).coef("alpha", "sigma")
        return math.sqrt(alpha**2 + sigma**2)

    def prior(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """A draw of x_{t_max} ~ N(0, prior_std^2 I) of the given shape, on ``device`` (default: the
        generator's device, else the CPU)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return self.prior_std() * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def within(self, t_min: float, t_max: float) -> Process:
        """This process used on [t_min, t_max] only: a shallow copy with those ends, for what draws or
        grids on the process's range (a training-time distribution drawing on a path's open interval,
        as the Schrödinger bridge's [t_eps, 1 - t_eps]). ValueError unless 0 <= t_min < t_max <= t_max of
        this process."""
        if not 0 <= t_min < t_max <= self.t_max:
            raise ValueError(f"{self!r}.within({t_min:g}, {t_max:g}): need 0 <= t_min < t_max <= {self.t_max:g}")
        out = copy.copy(self)
        out.t_min, out.t_max = t_min, t_max
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


register_namespace("process", Process, "Gaussian noise processes x_t = alpha(t) x0 + sigma(t) eps")

#: a number strictly between 0 and 1: a per-step beta of DDPM's T = 1000 table, t_min of a process on [0, 1]
OpenUnit = Annotated[float, Range(gt=0, lt=1)]
Schedule = Literal["linear", "scaled_linear", "cosine", "sigmoid"]


def check_betas(who: str, schedule: str, beta_start: float, beta_end: float) -> None:
    """ValueError unless beta_start <= beta_end where the schedule uses them (linear, scaled_linear):
    a decreasing beta makes alpha_bar's inverse (t of a log-SNR) undefined."""
    if schedule in ("linear", "scaled_linear") and not beta_start <= beta_end:
        raise ValueError(f"{who}: beta_start ({beta_start:g}) must be <= beta_end ({beta_end:g}) for the {schedule} "
                         "schedule (betas grow from the data to the noise), e.g. 1e-4 and 0.02")


def check_sigmas(who: str, sigma_min: float, sigma_max: float) -> None:
    """ValueError unless sigma_min < sigma_max."""
    if not sigma_min < sigma_max:
        raise ValueError(f"{who}: sigma_min ({sigma_min:g}) must be < sigma_max ({sigma_max:g})")


@register("process", "vp")
class VP(Process):
    """Variance preserving: alpha = sqrt(alpha_bar(t)), sigma = sqrt(1 - alpha_bar(t)), t in [0, 1].

    The continuous-time DDPM (Song et al. 2021, Eq. 11) with a linear, scaled-linear, cosine or
    sigmoid schedule; ``zero_terminal_snr`` rescales it to reach alpha = 0 at t = 1 (Lin et al.
    2024). :meth:`discrete` gives the T-step view that matches diffusers' tables.
    """

    def __init__(self, schedule: Schedule = "linear", beta_start: OpenUnit = 1e-4, beta_end: OpenUnit = 0.02,
                 zero_terminal_snr: bool = False, t_min: OpenUnit = 1e-3, cosine_s: NonNegativeFloat = 0.008) -> None:
        check_betas(type(self).__name__, schedule, beta_start, beta_end)
        self.schedule, self.beta_start, self.beta_end = schedule, beta_start, beta_end
        self.zero_terminal_snr, self.cosine_s = zero_terminal_snr, cosine_s
        self.t_min, self.t_max = t_min, 1.0
        log_alpha_bar(schedule, torch.zeros(()))  # validate the schedule name early

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        kw = dict(beta_start=self.beta_start, beta_end=self.beta_end, cosine_s=self.cosine_s)
        lab = log_alpha_bar(self.schedule, t, **kw)
        if self.zero_terminal_snr:  # Lin et al. 2024, Alg. 1, on sqrt(alpha_bar) with value 1 at t = 0
            last = torch.exp(0.5 * log_alpha_bar(self.schedule, torch.ones((), dtype=t.dtype, device=t.device), **kw))
            lab = torch.log(((torch.exp(0.5 * lab) - last) / (1 - last)).clamp_min(2.0**-12)) * 2
        return lab.clamp(max=0)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))

    def _log_alpha_bar_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """log alpha_bar at a log-SNR: alpha_bar = sigmoid(log-SNR) when sigma^2 = 1 - alpha_bar."""
        return torch.nn.functional.logsigmoid(log_snr)

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """Closed form for the linear schedule (the root of log alpha_bar(t) = -(b0 t + (b1 - b0) t^2 / 2))
        and the cosine one (arccos); bisection for the others and under zero-terminal SNR."""
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        if self.zero_terminal_snr or self.schedule not in ("linear", "cosine"):
            return super().t_of_log_snr(log_snr)
        lab = self._log_alpha_bar_of_log_snr(log_snr)
        if self.schedule == "linear":
            b0, b1 = self.beta_start * T_REF, self.beta_end * T_REF
            t = -2 * lab / (b0 + torch.sqrt(b0**2 - 2 * (b1 - b0) * lab))  # the stable form of the root
        else:
            s, top = self.cosine_s, math.cos(self.cosine_s / (1 + self.cosine_s) * math.pi / 2)
            t = torch.arccos((torch.exp(0.5 * lab) * top).clamp(max=1)) * 2 * (1 + s) / math.pi - s
        return t.clamp(0, self.t_max)

    def discrete(self, timesteps: int = 1000) -> DiscreteVP:
        """The T-step process with diffusers' ``alphas_cumprod`` for this schedule."""
        return DiscreteVP(self.schedule, timesteps, self.beta_start, self.beta_end, self.zero_terminal_snr)


@register("process", "sub_vp")
class SubVP(VP):
    """Sub-VP (Song et al. 2021, Eq. 17): alpha = sqrt(alpha_bar), sigma = 1 - alpha_bar."""

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(self._log_alpha_bar(t))

    def _log_alpha_bar_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """alpha_bar / (1 - alpha_bar)^2 = e^l (l the log-SNR): the root below 1 of e^l a^2 - (2 e^l + 1) a
        + e^l, a = 2 e^l / (2 e^l + 1 + sqrt(4 e^l + 1)) (the cancellation-free form)."""
        e = torch.exp(log_snr)
        return torch.log(2 * e) - torch.log(2 * e + 1 + torch.sqrt(4 * e + 1))


def check_decreasing_values(who: str, field: str, values: Tensor, valid: Tensor, rule: str, order: str) -> None:
    """ValueError naming ``who``, ``field`` and the first bad entry unless ``values`` [N] has N >= 2 entries,
    each where ``valid`` [N] holds (``rule`` says what that is), and decreases strictly (``order`` says
    between what)."""
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"{who}: {field} must be a list of at least 2 values ({order}), got shape "
                         f"{list(values.shape)}")
    bad = ~valid
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{who}: {field}[{i}] = {float(values[i])!r} must be {rule}")
    up = values[1:] >= values[:-1]
    if up.any():
        i = int(up.nonzero()[0]) + 1
        raise ValueError(f"{who}: {field} must decrease strictly ({order}), but {field}[{i}] = "
                         f"{float(values[i]):g} >= {field}[{i - 1}] = {float(values[i - 1]):g}")


def check_alphas_cumprod(who: str, ab: Tensor) -> None:
    """ValueError unless ``ab`` [T] is a DDPM table: T >= 2 values in (0, 1), strictly decreasing."""
    check_decreasing_values(who, "alphas_cumprod", ab, (ab > 0) & (ab < 1), "in (0, 1)", "from the data to the noise")


@register("process", "ddpm")
class DiscreteVP(Process):
    """DDPM's T-step VP process: step i in 0..T-1 sits at t = (i + 1) / T, t = 0 is the data.

    ``alphas_cumprod`` equals diffusers' table for the same schedule, or is given directly (any
    trained table). Between steps, Karras' sigma = sqrt((1 - ab) / ab) is linear in the step
    index, as diffusers' Euler and Heun schedulers interpolate. The network sees the step index.
    """

    def __init__(self, schedule: Schedule = "linear", timesteps: Annotated[int, Range(ge=2)] = 1000,
                 beta_start: OpenUnit = 1e-4, beta_end: OpenUnit = 0.02, zero_terminal_snr: bool = False,
                 alphas_cumprod: list[OpenUnit] | None = None) -> None:
        if alphas_cumprod is None:
            check_betas(type(self).__name__, schedule, beta_start, beta_end)
            ab = discrete_alphas_cumprod(schedule, timesteps, beta_start=beta_start, beta_end=beta_end)
        else:
            ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
            check_alphas_cumprod(type(self).__name__, ab)
        if zero_terminal_snr:
            ab = rescale_zero_terminal_snr(ab)
        self.alphas_cumprod = ab
        self.T = len(ab)
        self.t_min, self.t_max = 1.0 / self.T, 1.0
        # knots of sigma_edm at step indices -1, 0, ..., T-1 (index -1: the data, sigma 0)
        self._knots = torch.cat([torch.zeros(1, dtype=torch.float64), ((1 - ab) / ab).sqrt()])

    def _sigma_edm(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Interpolated sigma_edm at t and its slope d sigma_edm / dt."""
        knots = self._knots.to(t.device, t.dtype)
        pos = (t * self.T).clamp(0, self.T)  # position in the knot array = step index + 1
        i = pos.floor().clamp(max=self.T - 1).long()
        slope = knots[i + 1] - knots[i]
        return knots[i] + (pos - i) * slope, slope * self.T

    def alpha(self, t: Tensor) -> Tensor:
        return torch.rsqrt(1 + self._sigma_edm(t)[0] ** 2)

    def sigma(self, t: Tensor) -> Tensor:
        s = self._sigma_edm(t)[0]
        return s * torch.rsqrt(1 + s**2)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s, ds = self._sigma_edm(t)
        a3 = (1 + s**2) ** -1.5
        return -s * a3 * ds, a3 * ds

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        s = torch.exp(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))
        knots = self._knots.to(s.device)
        i = (torch.searchsorted(knots, s.contiguous()) - 1).clamp(0, self.T - 1)
        frac = (s - knots[i]) / (knots[i + 1] - knots[i])
        return ((i + frac) / self.T).clamp(0, self.t_max)

    def model_time(self, t: Tensor) -> Tensor:
        """The (fractional) DDPM step index t T - 1, as diffusers feeds its networks."""
        return t * self.T - 1


@register("process", "ve")
class VE(Process):
    """Variance exploding (Song et al. 2021, Eq. 9): alpha = 1, sigma = s_min (s_max / s_min)^t on
    (0, 1], and sigma = 0 at t = 0 (the data)."""

    def __init__(self, sigma_min: PositiveFloat = 0.01, sigma_max: PositiveFloat = 50.0, t_min: OpenUnit = 1e-5) -> None:
        check_sigmas(type(self).__name__, sigma_min, sigma_max)
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = sigma_min, sigma_max, t_min, 1.0
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.where(t > 0, self.sigma_min * torch.exp(t * self._log_ratio), torch.zeros_like(t))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), self.sigma(t) * self._log_ratio

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        sigma = torch.exp(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))
        return (torch.log(sigma / self.sigma_min) / self._log_ratio).clamp(0, self.t_max)


@register("process", "edm")
class EDM(Process):
    """Karras et al. 2022: alpha = 1, sigma = t, t in [sigma_min, sigma_max]; the network is given
    c_noise = log(sigma) / 4 (Table 1)."""

    def __init__(self, sigma_min: PositiveFloat = 0.002, sigma_max: PositiveFloat = 80.0) -> None:
        check_sigmas(type(self).__name__, sigma_min, sigma_max)
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), torch.ones_like(t)

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.exp(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))

    def model_time(self, t: Tensor) -> Tensor:
        return edm_c_noise(t)


@register("process", "rectified_flow")
class RectifiedFlow(Process):
    """Rectified flow / flow matching with the linear path (Liu et al. 2023; Lipman et al. 2023):
    alpha = 1 - t, sigma = t, t in [0, 1]; the velocity is eps - x0."""

    def __init__(self, t_min: OpenUnit = 1e-3) -> None:
        self.t_min, self.t_max = t_min, 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))


@register("process", "trigonometric")
class Trigonometric(Process):
    """The trigonometric interpolant (Albergo & Vanden-Eijnden 2023, Eq. 5; the variance-preserving path of
    flow matching, :class:`genlab.objectives.paths.VariancePreserving`): alpha = cos(pi t / 2), sigma =
    sin(pi t / 2), t in [0, 1], alpha^2 + sigma^2 = 1.

    It is the cosine schedule of Nichol & Dhariwal 2021 (Eq. 17) with offset s = 0 in continuous time, but
    ``VP(schedule="cosine", cosine_s=0)`` floors alpha_bar at log-SNR -20 for t > 1 - 2.9e-5 (alpha(1) =
    4.5e-5, not 0) and there, as at t = 0 for sigma, its autograd derivatives are 0: a velocity-predicting
    model is singular at t = 1 (alpha sigma' - sigma alpha' = 0), where sampling starts. Here alpha =
    sin(pi (1 - t) / 2), so alpha(1) = 0 and sigma(0) = 0 exactly, with the derivatives in closed form
    (alpha' = -pi / 2 sigma, sigma' = pi / 2 alpha) and log-SNR = 2 log cot(pi t / 2), inverted as
    t = (2 / pi) arctan(exp(-log-SNR / 2)).
    """

    def __init__(self, t_min: OpenUnit = 1e-3) -> None:
        self.t_min, self.t_max = t_min, 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(math.pi / 2 * (1 - t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(math.pi / 2 * t)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -math.pi / 2 * self.sigma(t), math.pi / 2 * self.alpha(t)

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        return (2 / math.pi * torch.atan(torch.exp(-0.5 * log_snr))).clamp(0, self.t_max)
