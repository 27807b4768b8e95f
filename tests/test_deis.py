"""DEIS (log-rho, orders 1-3) against diffusers' DEISMultistepScheduler step by step in float64, its
order on the exact mixture ODE, and every prediction type giving the same samples."""

from __future__ import annotations

import pytest
import torch

from genlab.diffusion import DEIS, PREDICTIONS, VP
from genlab.testing import GaussianMixture, exact_denoiser
from genlab.testing.convergence import observed_orders, ode_problem
from genlab.testing.peers import assert_steps_close, ddpm_times, run_diffusers, run_genlab, set_timesteps_float64

diffusers = pytest.importorskip("diffusers")
X = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(order, steps):
    """diffusers' DEIS ends at DDPM step 0 (t = 1 / T, its "sigma_last"), not at the data."""
    sched = set_timesteps_float64(diffusers.DEISMultistepScheduler(solver_order=order), steps)
    ab = sched.alphas_cumprod[0].item()
    sched.sigmas[-1] = ((1 - ab) / ab) ** 0.5  # sigma_last in float64
    times = torch.cat([ddpm_times(sched)[:-1], torch.tensor([1 / 1000], dtype=torch.float64)])
    assert_steps_close(run_genlab(DEIS(steps, order=order), sched, X, times), run_diffusers(sched, X), tol=1e-10)


@pytest.mark.parametrize("order", [2, 3])
def test_deis_converges_at_its_order(order):
    mixture = GaussianMixture.random(4, 3, generator=torch.Generator().manual_seed(0))
    orders, errs = observed_orders(lambda n, g: DEIS(n, g, order=order, lower_order_final=False),
                                   *ode_problem(mixture, 0.2, n=64), steps=(20, 40, 80))
    assert all(abs(o - order) < 0.4 for o in orders), (orders, errs)


def test_every_prediction_type_gives_the_same_samples():
    mix, process = GaussianMixture.ring(std=0.5), VP()
    x = process.prior((32, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = [DEIS(10, order=3).sample(exact_denoiser(mix, process, p), x.clone(), progress=False) for p in PREDICTIONS]
    assert max((o - outs[0]).abs().max().item() for o in outs) < 1e-8
