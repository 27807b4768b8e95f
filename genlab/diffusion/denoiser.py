"""The Denoiser: a model callable joined with a process and a parameterisation.

Any ``model(x_in, t_in, **cond) -> out`` works: an ``nn.Module`` or a plain function (an analytic
score, a lookup table). The Denoiser answers ``(x0, eps)`` for any (x_t, t), so samplers,
guidance and objectives never see what the network predicts.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from . import predictions as P
from .processes import Level, Process


class Denoiser(nn.Module):
    """model + process + prediction type (+ EDM preconditioning) -> (x0, eps).

    Args:
        model: ``model(x_in [B, ...], t_in [B], **cond) -> [B, ...]``.
        process: the noise process x_t = alpha x0 + sigma eps.
        prediction: what ``model`` outputs: eps, x0, v, score or velocity (ignored with EDM
            preconditioning, where the output is Karras et al.'s F).
        preconditioning: ``"edm"``: D = c_skip x^ + c_out F(c_in x^, c_noise) on x^ = x / alpha,
            sigma = sigma / alpha (Karras et al. 2022, Eq. 7 and Table 1).
        sigma_data: the data std for EDM preconditioning.
        model_time: maps process time t to the network's time input; default
            ``process.model_time``. Pass ``lambda t: t`` to give an analytic model t itself.
    """

    def __init__(self, model: Callable[..., Tensor], process: Process, prediction: P.PredictionType = "eps",
                 preconditioning: Literal["edm"] | None = None, sigma_data: float = 0.5,
                 model_time: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if prediction not in P.PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {', '.join(P.PREDICTIONS)}")
        if preconditioning not in (None, "edm"):
            raise ValueError(f"unknown preconditioning {preconditioning!r}; expected 'edm' or None")
        self.model, self.process, self.prediction = model, process, prediction
        self.preconditioning, self.sigma_data = preconditioning, sigma_data
        self.model_time = model_time or process.model_time

    def level(self, t: Tensor | Level, x: Tensor) -> Level:
        """The level at t, cast to x's dtype and device; t: scalar, [B] or a Level."""
        level = t if isinstance(t, Level) else self.process.level(torch.as_tensor(t, dtype=torch.float64))
        return level.to(dtype=x.dtype, device=x.device)

    def edm_scalings(self, level: Level) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma = sigma / alpha (Karras et al. 2022, Table 1)."""
        s, sd = level.sigma_edm, self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / torch.sqrt(s**2 + sd**2)
        c_in = 1 / torch.sqrt(s**2 + sd**2)
        return c_skip, c_out, c_in, torch.log(s) / 4

    def _time_input(self, t: Tensor, x: Tensor) -> Tensor:
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def raw(self, x: Tensor, level: Level, **cond: Any) -> Tensor:
        """The network's output at (x, level): the prediction, or F under EDM preconditioning."""
        if self.preconditioning == "edm":
            _, _, c_in, c_noise = self.edm_scalings(level)
            x_in = P.broadcast(c_in / level.alpha, x) * x
            return self.model(x_in, self._time_input(c_noise, x), **cond)
        t_in = level.memo(("model_time", self.model_time), lambda lv: self.model_time(lv.t))
        return self.model(x, self._time_input(t_in, x), **cond)

    def coefficients(self, level: Level) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(a_x0, b_x0, a_eps, b_eps) with x0 = a_x0 x + b_x0 raw and eps = a_eps x + b_eps raw;
        floats on a grid shared by the batch. Under EDM preconditioning x0 = (c_skip / alpha) x +
        c_out F and eps = (x - alpha x0) / sigma."""
        if self.preconditioning != "edm":
            return level.values(("coefficients", self.prediction), P.coefficients_of(self.prediction))

        def edm(lv: Level) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            c_skip, c_out, _, _ = self.edm_scalings(lv)
            return c_skip / lv.alpha, c_out, (1 - c_skip) / lv.sigma, -lv.alpha * c_out / lv.sigma

        return level.values(("edm", self.sigma_data), edm)

    def to_x0_eps(self, raw: Tensor, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(x0, eps) from a network output ``raw`` at (x, level)."""
        if self.preconditioning != "edm":
            return P.to_x0_eps(self.prediction, raw, x, level)
        a_x0, b_x0, a_eps, b_eps = self.coefficients(level)
        return P.combine((a_x0, x), (b_x0, raw)), P.combine((a_eps, x), (b_eps, raw))

    def linear(self, x: Tensor, t: Tensor | Level, **cond: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(raw, coefficients): x0 and eps as linear maps of (x, raw), for samplers that fold the
        conversion into their update (w_x0 x0 + w_eps eps in two tensor operations)."""
        level = self.level(t, x)
        return self.raw(x, level, **cond), self.coefficients(level)

    def forward(self, x: Tensor, t: Tensor | Level, **cond: Any) -> tuple[Tensor, Tensor]:
        """(x0, eps) estimates [B, ...] at x [B, ...] and t (scalar, [B] or a Level)."""
        level = self.level(t, x)
        return self.to_x0_eps(self.raw(x, level, **cond), x, level)

    def target(self, x0: Tensor, eps: Tensor, x: Tensor, level: Level) -> Tensor:
        """What ``raw`` should output for the truth (x0, eps): the regression target."""
        if self.preconditioning == "edm":
            c_skip, c_out, _, _ = self.edm_scalings(level)
            return (x0 - P.broadcast(c_skip / level.alpha, x) * x) / P.broadcast(c_out, x)
        return P.from_x0_eps(self.prediction, x0, eps, level)

    def x0_sensitivity(self, level: Level) -> Tensor:
        """d x0 / d raw (= b_x0): an error e in ``raw`` is an error (this) * e in x0."""
        return self.coefficients(level)[1]

    def extra_repr(self) -> str:
        pre = f", preconditioning={self.preconditioning}" if self.preconditioning else ""
        return f"process={self.process}, prediction={self.prediction}{pre}"


