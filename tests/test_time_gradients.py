"""Gradients of a sampling run with respect to its time grid (what learn_grid optimises) equal finite
differences, for every process and prediction type.

The model is a fixed function of (x, t), not an exact denoiser: an exact denoiser computes its output
from the same level as the Denoiser's conversion, so an error in the levels' t-derivatives cancels
there and would go unseen. (Before the fix, Process.derivatives detached t and the velocity
conversion on VP and sub-VP got no gradient through alpha'(t) and sigma'(t).)
"""

from __future__ import annotations

import pytest
import torch

from genlab.diffusion import (DDIM, EDM, PREDICTIONS, VE, VP, Denoiser, DiscreteVP, DPMSolverPP, Heun, RectifiedFlow,
                              SubVP)

CASES = {  # process, a grid [N + 1] ending at the data (inner times off DDPM's knots at i / T)
    "vp": (VP(), [1.0, 0.7, 0.45, 0.25, 0.0]),
    "sub_vp": (SubVP(), [1.0, 0.7, 0.45, 0.25, 0.0]),
    "ve": (VE(), [1.0, 0.7, 0.45, 0.25, 0.0]),
    "edm": (EDM(), [80.0, 20.0, 5.0, 1.0, 0.0]),
    "rectified_flow": (RectifiedFlow(), [0.95, 0.7, 0.45, 0.25, 0.0]),
    "ddpm": (DiscreteVP(), [0.9995, 0.7005, 0.4505, 0.2505, 0.0]),
}


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, time-dependent output of the size of a trained network's (t is the model time)."""
    return 0.3 * torch.tanh(0.7 * x) * (1 + 5e-4 * t[:, None]) + 0.1 * x


def finite_difference(f, times: torch.Tensor, i: int, rel: float = 1e-4) -> float:
    """d f / d times[i] by central differences, Richardson-extrapolated from steps h and h / 2."""

    def central(h: float) -> float:
        up, down = times.clone(), times.clone()
        up[i] += h
        down[i] -= h
        return float(f(up) - f(down)) / (2 * h)

    h = rel * float(times[i])
    return (4 * central(h / 2) - central(h)) / 3


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("pname", CASES)
def test_integrate_gradient_equals_finite_differences(pname, prediction):
    process, grid = CASES[pname]
    denoiser = Denoiser(model, process, prediction)
    x = process.prior((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = torch.tensor(grid, dtype=torch.float64)
    for sampler in (DDIM(4), DPMSolverPP(4), Heun(4)):
        def f(t):
            return (sampler.integrate(denoiser, x.clone(), times=t) * w).sum()

        leaf = times.clone().requires_grad_(True)
        grad = torch.autograd.grad(f(leaf), leaf)[0]
        for i in (1, 2, 3):
            fd = finite_difference(f, times, i)
            assert abs(float(grad[i]) - fd) <= 1e-5 * (abs(fd) + 1), (type(sampler).__name__, i, float(grad[i]), fd)
