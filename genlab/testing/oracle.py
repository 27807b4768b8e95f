"""Exact references for sampler tests: the mixture's denoiser in any parameterisation, and the
probability-flow ODE solved to tight tolerance with scipy."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from genlab.diffusion.denoiser import Denoiser
from genlab.diffusion.predictions import PredictionType, from_x0_eps
from genlab.diffusion.levels import Level
from genlab.diffusion.processes import Process
from genlab.testing.gaussian_mixture import GaussianMixture


def exact_denoiser(mixture: GaussianMixture, process: Process, prediction: PredictionType = "eps") -> Denoiser:
    """A :class:`Denoiser` whose model is a plain function returning the mixture's exact
    ``prediction`` at (x, t); the model is given the process time t itself."""

    levels: dict[float, Level] = {}  # a shared time's level (alpha, sigma and their derivatives), computed once

    def model(x: Tensor, t: Tensor) -> Tensor:
        if t.ndim and bool((t == t[0]).all()):
            t = t[0]  # one shared noise level: one factorisation per component, not one per sample
        if t.ndim or t.requires_grad:
            level = process.level(t.double())
        else:
            if float(t) not in levels:
                if len(levels) > 4096:
                    levels.clear()
                levels[float(t)] = process.level(t.double())
            level = levels[float(t)]
        level = level.to(dtype=x.dtype)
        x0, eps = mixture.x0_eps(x, level.alpha, level.sigma)
        return from_x0_eps(prediction, x0, eps, level)

    return Denoiser(model, process, prediction, model_time=lambda t: t)


def exact_class_denoiser(mixture: GaussianMixture, process: Process, prediction: PredictionType = "eps") -> Denoiser:
    """The class-conditional model of the mixture as a :class:`Denoiser`: class k is component k
    (p(x0 | c = k) = N(mu_k, Sigma_k)) and the null class -1 (or no labels) the whole mixture
    (p(x0) = sum_k w_k N(mu_k, Sigma_k)), so ``model(x [B, D], t, class_labels [B])`` returns each sample's
    exact ``prediction`` and classifier-free guidance of it has a closed form. The model is given t itself."""
    parts = {-1: exact_denoiser(mixture, process, prediction).model}
    for k in range(mixture.k):
        component = GaussianMixture(torch.ones(1), mixture.means[k:k + 1], mixture.covs[k:k + 1])
        parts[k] = exact_denoiser(component, process, prediction).model

    def model(x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        labels = torch.full((len(x),), -1, device=x.device) if class_labels is None else class_labels
        t = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t
        out = torch.empty_like(x)
        for k in labels.unique().tolist():
            where = labels == k
            out[where] = parts[k](x[where], t[where])
        return out

    return Denoiser(model, process, prediction, model_time=lambda t: t)


def exact_ode_solution(mixture: GaussianMixture, process: Process, x: Tensor, t_start: float, t_end: float,
                       rtol: float = 1e-11, atol: float = 1e-11) -> Tensor:
    """Solve the probability-flow ODE from x [B, D] at t_start to t_end (> 0 or 0).

    In x^ = x / alpha and s = sigma / alpha the ODE is dx^/ds = eps(x^, s) for every process
    (Karras et al. 2022, Eq. 4 with s(t) = t); it is integrated in log s with DOP853.
    """
    from scipy.integrate import solve_ivp

    ends = process.level(torch.tensor([t_start, t_end], dtype=torch.float64))
    s0, s1 = (float(v) for v in ends.sigma_edm)
    shape = x.shape
    xhat = (x.double() / ends.alpha[0]).reshape(-1).numpy()
    log_end = np.log(s1) if s1 > 0 else None

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        s = float(np.exp(u)) if log_end is not None else u
        eps = mixture.eps(torch.from_numpy(y).reshape(shape), 1.0, s).reshape(-1).numpy()
        return s * eps if log_end is not None else eps

    span = (np.log(s0), log_end) if log_end is not None else (s0, 0.0)
    sol = solve_ivp(rhs, span, xhat, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(x.dtype) * ends.alpha[1].to(x.dtype)
