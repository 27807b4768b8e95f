"""Convergence orders of samplers against the exactly solved probability-flow ODE of a mixture."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from genlab.diffusion import VP, Process, Sampler, UniformLogSNR
from genlab.testing.gaussian_mixture import GaussianMixture
from genlab.testing.oracle import exact_denoiser, exact_ode_solution


def ode_problem(mixture: GaussianMixture, t_end: float, n: int = 128,
                process: Process | None = None) -> tuple[GaussianMixture, Process, Tensor, float, Tensor]:
    """(mixture, process, x [n, D] at t = 1, t_end, the exact ODE solution at t_end) on VP by default."""
    process = process or VP()
    x = process.prior((n, mixture.dim), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return mixture, process, x, t_end, exact_ode_solution(mixture, process, x, 1.0, t_end)


def observed_orders(make: Callable[[int, object], Sampler], mixture: GaussianMixture, process: Process, x: Tensor,
                    t_end: float, reference: Tensor, steps: Sequence[int] = (10, 20, 40)) -> tuple[list[float], list[float]]:
    """(orders, errors): RMS errors of ``make(n, grid)`` (uniform log-SNR grid from t = 1 to t_end) at each
    step count, and the observed orders log2(e_n / e_2n) between consecutive counts."""
    denoiser = exact_denoiser(mixture, process, "eps")
    grid = UniformLogSNR(t_min=t_end, final="min")
    errs = [(make(n, grid).sample(denoiser, x.clone(), progress=False) - reference).pow(2).mean().sqrt().item()
            for n in steps]
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)], errs
