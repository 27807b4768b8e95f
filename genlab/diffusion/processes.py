"""Gaussian noise processes x_t = alpha(t) x0 + sigma(t) eps in continuous time.

One picture for all of them (Karras et al. 2022, Sec. 2; Kingma et al. 2021, VDM): DDPM, the
VP / sub-VP / VE SDEs (Song et al. 2021), EDM and rectified flow differ only in alpha, sigma and
their time range. Every process reaches the clean data at t = 0 (alpha = 1, sigma = 0) and its
noisiest level at ``t_max``; samplers work on :class:`Level` values and never on a formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch
from torch import Tensor

from ..core.registry import register, register_namespace
from .schedules import T_REF, discrete_alphas_cumprod, log_alpha_bar, rescale_zero_terminal_snr


class Level:
    """A noise level of a process: time ``t``, ``alpha``, ``sigma`` and their t-derivatives.

    Fields have one shape: [] (shared by the batch), [B] (per sample), or [N, ...] for a whole
    time grid, which ``level[i]`` indexes. Derived quantities (log-SNR, conversion coefficients)
    go through :meth:`memo`: computed once for a whole grid, vectorised, and indexed per step.
    """

    __slots__ = ("t", "alpha", "sigma", "d_alpha", "d_sigma", "_parent", "_memo")
    FIELDS = ("t", "alpha", "sigma", "d_alpha", "d_sigma")

    def __init__(self, t: Tensor, alpha: Tensor, sigma: Tensor, d_alpha: Tensor, d_sigma: Tensor,
                 parent: tuple[Level, Any] | None = None) -> None:
        self.t, self.alpha, self.sigma, self.d_alpha, self.d_sigma = t, alpha, sigma, d_alpha, d_sigma
        self._parent, self._memo = parent, {}

    def memo(self, key: Hashable, fn: Callable[[Level], Any]) -> Any:
        """``fn(self)`` (a tensor or a tuple of tensors), cached; on a step of a grid it is computed
        for the whole grid at once and indexed."""
        if key not in self._memo:
            if self._parent is None:
                self._memo[key] = fn(self)
            else:
                parent, index = self._parent
                value = parent.memo(key, fn)
                self._memo[key] = tuple(v[index] for v in value) if isinstance(value, tuple) else value[index]
        return self._memo[key]

    def values(self, key: Hashable, fn: Callable[[Level], Any]) -> Any:
        """:meth:`memo` as Python floats when this level is a step of a grid shared by the batch
        (the grid's values are turned into lists once), so step formulas cost no tensor ops."""
        if self._parent is None or self._parent[0].t.ndim != 1 or self.t.device.type != "cpu":
            return self.memo(key, fn)
        parent, index = self._parent
        lists = parent.memo(("floats", key), lambda lv: _tolist(lv.memo(key, fn)))
        return tuple(v[index] for v in lists) if isinstance(lists, tuple) else lists[index]

    def coef(self, *names: str) -> tuple[Tensor | float, ...]:
        """Fields (or ``log_snr``, ``sigma_edm``) by name, as floats on a shared grid (see :meth:`values`)."""
        return tuple(self.values(name, lambda lv, n=name: getattr(lv, n)) for name in names)

    @property
    def log_snr(self) -> Tensor:
        """lambda = log(alpha^2 / sigma^2) (Kingma et al. 2021, Eq. 2 uses its negative, gamma)."""
        return self.memo("log_snr", lambda lv: 2 * (torch.log(lv.alpha) - torch.log(lv.sigma)))

    @property
    def sigma_edm(self) -> Tensor:
        """Karras et al.'s sigma = sigma / alpha: the noise level of the scaled sample x / alpha."""
        return self.memo("sigma_edm", lambda lv: lv.sigma / lv.alpha)

    @property
    def sde(self) -> tuple[Tensor, Tensor]:
        """(f, g^2) of the forward SDE dx = f x dt + g dW with these marginals: f = d log alpha / dt,
        g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, App. A.1; Song et al. 2021's VP,
        sub-VP and VE SDEs, Eqs. 9, 11, 17)."""

        def coefficients(lv: Level) -> tuple[Tensor, Tensor]:
            f = lv.d_alpha / lv.alpha
            return f, 2 * lv.sigma * (lv.d_sigma - f * lv.sigma)

        return self.memo("sde", coefficients)

    def __getitem__(self, index: int | slice | Tensor) -> Level:
        return Level(self.t[index], self.alpha[index], self.sigma[index], self.d_alpha[index], self.d_sigma[index],
                     parent=(self, index))

    def steps(self) -> list[Level]:
        """The levels of a grid [N, ...] as a list, sharing this grid's memo."""
        rows = zip(*(getattr(self, f).unbind(0) for f in self.FIELDS))
        return [Level(*row, parent=(self, i)) for i, row in enumerate(rows)]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Level:
        """A copy with fields cast; this level itself if nothing changes."""
        if (dtype is None or self.alpha.dtype == dtype) and (device is None or self.alpha.device == torch.device(device)):
            return self
        return Level(*(getattr(self, f).to(device=device, dtype=dtype) for f in self.FIELDS))

    def __repr__(self) -> str:
        return "Level(" + ", ".join(f"{f}={getattr(self, f)}" for f in self.FIELDS) + ")"


def _tolist(value: Tensor | tuple[Tensor, ...]) -> list | tuple[list, ...]:
    return tuple(v.tolist() for v in value) if isinstance(value, tuple) else value.tolist()


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
        """(d alpha / dt, d sigma / dt) at t, by autograd through ``alpha`` and ``sigma``."""
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            d_alpha = torch.autograd.grad(self.alpha(t).sum(), t)[0]
            d_sigma = torch.autograd.grad(self.sigma(t).sum(), t)[0]
        return d_alpha, d_sigma

    def level(self, t: Tensor | float) -> Level:
        """The :class:`Level` at t (float64 unless t is a floating tensor of another dtype)."""
        t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) or not t.is_floating_point() else t
        return Level(t, self.alpha(t), self.sigma(t), *self.derivatives(t))

    def log_snr(self, t: Tensor) -> Tensor:
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of ``log_snr`` by bisection on [0, t_max] (log-SNR decreases in t)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo, hi = torch.zeros_like(lam), torch.full_like(lam, self.t_max)
        for _ in range(64):
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > lam
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def t_of_sigma_edm(self, sigma: Tensor) -> Tensor:
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
        lv = self.level(torch.tensor(self.t_max, dtype=torch.float64))
        return float(torch.sqrt(lv.alpha**2 + lv.sigma**2))

    def prior(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """A draw of x_{t_max} ~ N(0, prior_std^2 I) of the given shape."""
        return self.prior_std() * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


register_namespace("process", Process, "Gaussian noise processes x_t = alpha(t) x0 + sigma(t) eps")


@register("process", "vp")
class VP(Process):
    """Variance preserving: alpha = sqrt(alpha_bar(t)), sigma = sqrt(1 - alpha_bar(t)), t in [0, 1].

    The continuous-time DDPM (Song et al. 2021, Eq. 11) with a linear, scaled-linear, cosine or
    sigmoid schedule; ``zero_terminal_snr`` rescales it to reach alpha = 0 at t = 1 (Lin et al.
    2024). :meth:`discrete` gives the T-step view that matches diffusers' tables.
    """

    def __init__(self, schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid"] = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False,
                 t_min: float = 1e-3, cosine_s: float = 0.008) -> None:
        self.schedule, self.beta_start, self.beta_end = schedule, beta_start, beta_end
        self.zero_terminal_snr, self.cosine_s = zero_terminal_snr, cosine_s
        self.t_min, self.t_max = t_min, 1.0
        log_alpha_bar(schedule, torch.zeros(()))  # validate the schedule name early

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        kw = dict(beta_start=self.beta_start, beta_end=self.beta_end, cosine_s=self.cosine_s)
        lab = log_alpha_bar(self.schedule, t, **kw)
        if self.zero_terminal_snr:  # Lin et al. 2024, Alg. 1, on sqrt(alpha_bar) with value 1 at t = 0
            last = torch.exp(0.5 * log_alpha_bar(self.schedule, torch.ones((), dtype=t.dtype), **kw))
            lab = torch.log(((torch.exp(0.5 * lab) - last) / (1 - last)).clamp_min(2.0**-12)) * 2
        return lab.clamp(max=0)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))

    def _log_alpha_bar_of_log_snr(self, lam: Tensor) -> Tensor:
        """log alpha_bar at log-SNR lambda: alpha_bar = sigmoid(lambda) when sigma^2 = 1 - alpha_bar."""
        return torch.nn.functional.logsigmoid(lam)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Closed form for the linear schedule (the root of log alpha_bar(t) = -(b0 t + (b1 - b0) t^2 / 2))
        and the cosine one (arccos); bisection for the others and under zero-terminal SNR."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        if self.zero_terminal_snr or self.schedule not in ("linear", "cosine"):
            return super().t_of_log_snr(lam)
        lab = self._log_alpha_bar_of_log_snr(lam)
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

    def _log_alpha_bar_of_log_snr(self, lam: Tensor) -> Tensor:
        """alpha_bar / (1 - alpha_bar)^2 = e^lambda: the root below 1 of e^l a^2 - (2 e^l + 1) a + e^l,
        a = 2 e^l / (2 e^l + 1 + sqrt(4 e^l + 1)) (the cancellation-free form)."""
        e = torch.exp(lam)
        return torch.log(2 * e) - torch.log(2 * e + 1 + torch.sqrt(4 * e + 1))


@register("process", "ddpm")
class DiscreteVP(Process):
    """DDPM's T-step VP process: step i in 0..T-1 sits at t = (i + 1) / T, t = 0 is the data.

    ``alphas_cumprod`` equals diffusers' table for the same schedule, or is given directly (any
    trained table). Between steps, Karras' sigma = sqrt((1 - ab) / ab) is linear in the step
    index, as diffusers' Euler and Heun schedulers interpolate. The network sees the step index.
    """

    def __init__(self, schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid"] = "linear",
                 timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 zero_terminal_snr: bool = False, alphas_cumprod: list[float] | None = None) -> None:
        if alphas_cumprod is None:
            ab = discrete_alphas_cumprod(schedule, timesteps, beta_start=beta_start, beta_end=beta_end)
        else:
            ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
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

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        s = torch.exp(-0.5 * torch.as_tensor(lam, dtype=torch.float64))
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

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5) -> None:
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = sigma_min, sigma_max, t_min, 1.0
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.where(t > 0, self.sigma_min * torch.exp(t * self._log_ratio), torch.zeros_like(t))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), self.sigma(t) * self._log_ratio

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        sigma = torch.exp(-0.5 * torch.as_tensor(lam, dtype=torch.float64))
        return (torch.log(sigma / self.sigma_min) / self._log_ratio).clamp(0, self.t_max)


@register("process", "edm")
class EDM(Process):
    """Karras et al. 2022: alpha = 1, sigma = t, t in [sigma_min, sigma_max]; the network is given
    c_noise = log(sigma) / 4 (Table 1)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), torch.ones_like(t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-0.5 * torch.as_tensor(lam, dtype=torch.float64))

    def model_time(self, t: Tensor) -> Tensor:
        return torch.log(t) / 4


@register("process", "rectified_flow")
class RectifiedFlow(Process):
    """Rectified flow / flow matching with the linear path (Liu et al. 2023; Lipman et al. 2023):
    alpha = 1 - t, sigma = t, t in [0, 1]; the velocity is eps - x0."""

    def __init__(self, t_min: float = 1e-3) -> None:
        self.t_min, self.t_max = t_min, 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * torch.as_tensor(lam, dtype=torch.float64))
