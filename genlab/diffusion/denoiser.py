"""The Denoiser: a model callable joined with a process and a parameterisation.

Any ``model(x_in, t_in, **cond) -> out`` works: an ``nn.Module`` or a plain function (an analytic
score, a lookup table). The Denoiser answers ``(x0, eps)`` for any (x_t, t), so samplers,
guidance and objectives never see what the network predicts.

Every parameterisation, EDM's included, makes x0 and eps linear in (x, raw) with ``raw`` the
network's output: x0 = a_x0 x + b_x0 raw, eps = a_eps x + b_eps raw. :meth:`Denoiser.linear`
declares this as the samplers' fast path (see :func:`linear_path`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.errors import ShapeError
from . import predictions as P
from .levels import Level, Scalar, combine
from .processes import Process, edm_c_noise

Linear = tuple[Tensor, tuple[Scalar, Scalar, Scalar, Scalar]]  # (raw, (a_x0, b_x0, a_eps, b_eps))


def edm_scalings(level: Level, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM preconditioning (Karras et al. 2022, Table 1) at
    s = sigma / alpha, for x in the process's units: Karras' scaled sample is x^ = x / alpha, so
    c_skip and c_in carry a factor 1 / alpha, and D(x) = c_skip x + c_out F(c_in x, c_noise) is
    their Eq. 7, D(x^; s) = c_skip(s) x^ + c_out(s) F(c_in(s) x^, c_noise(s))."""
    s, sd, alpha = level.sigma_edm, sigma_data, level.alpha
    norm = torch.sqrt(s**2 + sd**2)
    return sd**2 / (s**2 + sd**2) / alpha, s * sd / norm, 1 / norm / alpha, edm_c_noise(s)


class Denoiser(nn.Module):
    """model + process + prediction type (+ EDM preconditioning) -> (x0, eps).

    Args:
        model: ``model(x_in [B, ...], t_in [B], **cond) -> [B, ...]``.
        process: the noise process x_t = alpha x0 + sigma eps.
        prediction: what ``model`` outputs: eps, x0, v, score or velocity (with EDM
            preconditioning the output is Karras et al.'s F and ``prediction`` is not used).
        preconditioning: ``"edm"``: x0 = D(x) = c_skip x + c_out F(c_in x, c_noise) (Karras et al.
            2022, Eq. 7 and Table 1; :func:`edm_scalings`).
        sigma_data: the data std for EDM preconditioning.
        model_time: maps process time t to the network's time input; default
            ``process.model_time``. Pass ``lambda t: t`` to give an analytic model t itself. Not
            with EDM preconditioning, whose time input is c_noise.
    """

    def __init__(self, model: Callable[..., Tensor], process: Process, prediction: P.PredictionType = "eps",
                 preconditioning: Literal["edm"] | None = None, sigma_data: float = 0.5,
                 model_time: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if prediction not in P.PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {', '.join(P.PREDICTIONS)}")
        if preconditioning not in (None, "edm"):
            raise ValueError(f"unknown preconditioning {preconditioning!r}; expected 'edm' or None")
        if preconditioning == "edm" and model_time is not None:
            raise ValueError("model_time cannot be used with preconditioning='edm': the network's time input is "
                             "c_noise = ln(sigma / alpha) / 4 (Karras et al. 2022, Table 1); drop model_time")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.model, self.process, self.prediction = model, process, prediction
        self.preconditioning, self.sigma_data = preconditioning, sigma_data
        self.model_time = model_time or process.model_time

    fast_path = True  # linear() gives this class's outputs (see __init_subclass__ and linear_path)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that changes ``forward`` without ``linear`` has no fast path: the inherited
        linear map would skip its change. Defining ``linear`` (or ``linear = None``) says what it has."""
        super().__init_subclass__(**kwargs)
        if "linear" in vars(cls):
            cls.fast_path = vars(cls)["linear"] is not None
        elif "forward" in vars(cls):
            cls.fast_path = False

    def level(self, t: Tensor | float | Level, x: Tensor) -> Level:
        """The level at t (a float, [], [B] or a Level): float64; per-sample levels on x's device."""
        return level_at(self.process, t, x)

    def network_input(self, level: Level) -> tuple[Scalar, Scalar]:
        """(scale, t_in): the network sees ``scale * x`` and the time input ``t_in`` (floats on a
        shared level): (1, model_time(t)), or (c_in, c_noise) under EDM preconditioning."""
        if self.preconditioning == "edm":
            return level.values(("edm_input", self.sigma_data), lambda lv: edm_scalings(lv, self.sigma_data)[2:])
        return 1.0, level.values(("model_time", self.model_time), lambda lv: self.model_time(lv.t))

    def raw(self, x: Tensor, level: Level, **cond: Any) -> Tensor:
        """The network's output [B, ...] at (x [B, ...], level): the prediction, or F(c_in x, c_noise)
        under EDM. ShapeError unless it is a tensor of x's shape (a shape comparison: no device sync),
        since a broadcastable wrong shape ([B, 1] for [B, 2]) would silently give wrong samples."""
        return self.network_output(self.model, x, level, cond)

    def network_output(self, network: Callable[..., Tensor], x: Tensor, level: Level, cond: dict[str, Any],
                       who: str = "model") -> Tensor:
        """``network``'s output [B, ...] on this Denoiser's inputs at (x, level): x scaled as
        :meth:`network_input` says, the time input, ``cond``; checked as :meth:`raw` says."""
        scale, t_in = self.network_input(level)
        x_in = x if isinstance(scale, float) and scale == 1.0 else combine((scale, x))
        out = network(x_in, time_input(t_in, x), **cond)
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ShapeError(f"Denoiser: the {who}'s output must have the shape of its input x {list(x.shape)}, "
                             f"got {got} (a model with learn_sigma or a tuple output: return the prediction alone)")
        return out

    def coefficients(self, level: Level) -> tuple[Scalar, Scalar, Scalar, Scalar]:
        """(a_x0, b_x0, a_eps, b_eps) with x0 = a_x0 x + b_x0 raw and eps = a_eps x + b_eps raw;
        floats on a shared level. Under EDM preconditioning x0 = c_skip x + c_out F and
        eps = (x - alpha x0) / sigma."""
        if self.preconditioning != "edm":
            return level.values(("coefficients", self.prediction), P.coefficients_of(self.prediction))

        def edm(lv: Level) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            c_skip, c_out, _, _ = edm_scalings(lv, self.sigma_data)
            return c_skip, c_out, (1 - lv.alpha * c_skip) / lv.sigma, -lv.alpha * c_out / lv.sigma

        return level.values(("edm", self.sigma_data), edm)

    def to_x0_eps(self, raw: Tensor, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(x0, eps) [B, ...] from a network output ``raw`` at (x, level)."""
        if self.preconditioning != "edm":
            return P.to_x0_eps(self.prediction, raw, x, level)
        a_x0, b_x0, a_eps, b_eps = self.coefficients(level)
        return combine((a_x0, x), (b_x0, raw)), combine((a_eps, x), (b_eps, raw))

    def linear(self, x: Tensor, t: Tensor | float | Level, **cond: Any) -> Linear:
        """The fast path: (raw, coefficients), x0 and eps as linear maps of (x, raw), for samplers that
        fold the conversion into their update (w_x0 x0 + w_eps eps in two tensor operations)."""
        level = self.level(t, x)
        return self.raw(x, level, **cond), self.coefficients(level)

    def forward(self, x: Tensor, t: Tensor | float | Level, **cond: Any) -> tuple[Tensor, Tensor]:
        """(x0, eps) estimates [B, ...] at x [B, ...] and t (a float, [], [B] or a Level)."""
        level = self.level(t, x)
        return self.to_x0_eps(self.raw(x, level, **cond), x, level)

    def target(self, x0: Tensor, eps: Tensor, x: Tensor, level: Level) -> Tensor:
        """What ``raw`` should output for the truth (x0, eps) [B, ...] at x: the regression target
        (under EDM, F's target (x0 - c_skip x) / c_out)."""
        if self.preconditioning == "edm":
            a_x0, b_x0, _, _ = self.coefficients(level)
            return combine((1 / b_x0, x0), (-a_x0 / b_x0, x))
        return P.from_x0_eps(self.prediction, x0, eps, level)

    def x0_sensitivity(self, level: Level) -> Scalar:
        """d x0 / d raw (= b_x0): an error e in ``raw`` is an error (this) * e in x0."""
        return self.coefficients(level)[1]

    def extra_repr(self) -> str:
        pre = f", preconditioning={self.preconditioning}" if self.preconditioning else ""
        return f"process={self.process}, prediction={self.prediction}{pre}"


class BridgeDenoiser(Denoiser):
    """A Denoiser with a second network for the score of its marginals: SF2M's pair (v_theta, s_theta)
    (Tong et al. 2024, "Simulation-free Schrödinger bridges via score and flow matching", Sec. 3 and
    Algorithm 1; torchcfm's SF2M example). ``model`` gives the probability-flow field, read as (x0, eps)
    like any Denoiser's, so every ODE sampler integrates it; ``score_model`` outputs

        s_theta(x, t) = (g^2 / 2) grad_x log p_t(x)    [B, ...],

    the score term of the SDE drift u + (g^2 / 2) grad log p_t, as SF2M's score loss
    |lambda(t) s_theta + eps|^2 trains it. The ``bridge_sde`` sampler reads :meth:`score` and ``g``.

    Args:
        model: the flow network ``model(x [B, ...], t_in [B], **cond) -> [B, ...]`` (``prediction``).
        score_model: the score network, with the same inputs (x unscaled); None: :meth:`score` raises.
        process, prediction, model_time: as for :class:`Denoiser`.
        g: the SDE's diffusion coefficient s_theta was trained for (> 0; the bridge's sigma).
    """

    def __init__(self, model: Callable[..., Tensor], score_model: Callable[..., Tensor] | None, process: Process,
                 g: float, prediction: P.PredictionType = "velocity",
                 model_time: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(model, process, prediction, model_time=model_time)
        if not g > 0:
            raise ValueError(f"BridgeDenoiser: g must be > 0, got {g}")
        self.score_model, self.g = score_model, g

    def score_output(self, x: Tensor, t: Tensor | float | Level, **cond: Any) -> Tensor:
        """The score network's output s_theta [B, ...] at x [B, ...] and t: (g^2 / 2) grad log p_t(x)."""
        if self.score_model is None:
            raise ValueError("BridgeDenoiser: no score model was given; its SDE (sampler bridge_sde) needs one, "
                             "or sample the probability-flow ODE with a deterministic sampler (flow_euler, heun)")
        return self.network_output(self.score_model, x, self.level(t, x), cond, who="score model")

    def score(self, x: Tensor, t: Tensor | float | Level, **cond: Any) -> Tensor:
        """grad_x log p_t(x) [B, ...] = (2 / g^2) s_theta(x, t)."""
        return combine((2 / self.g**2, self.score_output(x, t, **cond)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, g={self.g:g}"


def level_at(process: Process, t: Tensor | float | Level, x: Tensor) -> Level:
    """The level of ``process`` at t (a float, [], [B] or a Level): float64; per-sample levels on x's device."""
    level = t if isinstance(t, Level) else process.level(t)
    return level if level.shared else level.to(device=x.device)


def time_input(value: Scalar, x: Tensor) -> Tensor:
    """A network's time input [B] on x's device, in x's floating dtype, from a float or a [] / [B] tensor."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if isinstance(value, float):
        return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)
    return value.to(device=x.device, dtype=dtype).expand(x.shape[0])


def linear_path(denoiser: Any) -> Callable[..., Linear] | None:
    """The linear fast path a denoiser declares, bound to it, or None. It is looked up on the class:
    a wrapper that forwards attribute access (``__getattr__``) to an inner Denoiser does not get the
    inner one's path, and a Denoiser subclass that overrides ``forward`` alone has none. A wrapper
    keeps the fast path by defining ``linear`` itself (with the same meaning) or turns it off with
    ``linear = None``."""
    cls = type(denoiser)
    fn = getattr(cls, "linear", None)
    return fn.__get__(denoiser) if fn is not None and getattr(cls, "fast_path", True) else None
