"""Exact oracle: samplers on a Gaussian mixture, whose eps is known in closed form for every
process, against the exact probability-flow ODE solution (scipy, tight tolerance)."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.diffusion import (DDIM, DDPM, EDM, PREDICTIONS, VE, VP, DiscreteVP, DPMSolverPP, Euler, FlowEuler,
                              Heun, Karras, RectifiedFlow, SubVP, UniformTime)
from genlab.metrics import sliced_wasserstein
from genlab.testing import GaussianMixture, exact_denoiser
from genlab.testing.convergence import observed_orders
from genlab.testing.convergence import ode_problem as ode_setup

MIX = GaussianMixture.ring(std=0.5)
# convergence orders are measured between 10 and 40 steps on a 4-D mixture, from t = 1 to 0.2
ORDER_MIX = GaussianMixture.random(4, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ode_problem():
    return ode_setup(ORDER_MIX, 0.2, n=64)


@pytest.mark.parametrize("name, make, order", [
    ("ddim", lambda n, g: DDIM(n, g), 1),
    ("euler", lambda n, g: Euler(n, g), 1),
    ("flow_euler", lambda n, g: FlowEuler(n, g), 1),
    ("heun", lambda n, g: Heun(n, g), 2),
    ("dpm_solver_pp_2m", lambda n, g: DPMSolverPP(n, g, order=2, lower_order_final=False), 2),
    ("dpm_solver_pp_3m", lambda n, g: DPMSolverPP(n, g, order=3, lower_order_final=False), 3),
])
def test_ode_samplers_converge_at_their_order(ode_problem, name, make, order):
    orders, errs = observed_orders(make, *ode_problem)
    assert all(abs(o - order) < 0.4 for o in orders), f"{name}: errors {errs}, observed orders {orders}"


def test_reference_3m_coefficient_is_only_second_order():
    """diffusers' / the reference code's 3M D2 weight is half the Taylor one: order 2, not 3."""
    problem = ode_setup(MIX, 0.01, n=256)
    ref_orders, ref_errs = observed_orders(
        lambda n, g: DPMSolverPP(n, g, order=3, lower_order_final=False, third_order="reference"), *problem,
        steps=(20, 40, 80))
    _, errs = observed_orders(lambda n, g: DPMSolverPP(n, g, order=3, lower_order_final=False), *problem,
                              steps=(20, 40, 80))
    assert abs(ref_orders[-1] - 2) < 0.3
    assert errs[-1] < ref_errs[-1] / 3


@pytest.mark.parametrize("sampler", [DDPM(200), DDIM(200, eta=1.0)], ids=["ddpm", "ddim_eta1"])
def test_stochastic_samplers_match_mixture_moments(sampler):
    process, n = VP(), 6000
    x = sampler.sample(exact_denoiser(MIX, process), shape=(n, 2), generator=torch.Generator().manual_seed(3),
                       progress=False).double()
    mean, cov = MIX.mean(), MIX.covariance()
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean + 0.01).all(), (x.mean(0), mean)
    var = torch.diagonal(cov)
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((x.T.cov() - cov).abs() < 4 * se_cov + 0.02).all(), (x.T.cov(), cov)


def test_flow_euler_is_ddim_on_rectified_flow():
    process = RectifiedFlow()
    den = exact_denoiser(MIX, process, "velocity")
    x = process.prior((128, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = FlowEuler(25).sample(den, x.clone(), progress=False)
    b = DDIM(25).sample(den, x.clone(), progress=False)
    assert (a - b).abs().max().item() < 1e-6
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("process", [VP(), EDM(), VE()], ids=["vp", "edm", "ve"])
def test_euler_without_churn_is_ddim(process):
    den = exact_denoiser(MIX, process)
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = Karras()
    assert torch.allclose(Euler(12, grid).sample(den, x.clone(), progress=False),
                          DDIM(12, grid).sample(den, x.clone(), progress=False), atol=1e-10)


PROCESSES = {"vp": VP(), "ddpm": DiscreteVP(), "sub_vp": SubVP(), "ve": VE(), "edm": EDM(),
             "rectified_flow": RectifiedFlow()}
SAMPLERS = {"ddim": lambda: DDIM(30), "ddpm": lambda: DDPM(100), "euler": lambda: Euler(30, "karras"),
            "euler_churn": lambda: Euler(30, "karras", s_churn=10), "heun": lambda: Heun(15, "karras"),
            "dpm_solver_pp": lambda: DPMSolverPP(20), "dpm_solver_pp_3m": lambda: DPMSolverPP(20, order=3),
            "flow_euler": lambda: FlowEuler(200)}


@pytest.mark.parametrize("pname", PROCESSES)
@pytest.mark.parametrize("sname", SAMPLERS)
def test_every_sampler_on_every_process(pname, sname):
    process, sampler = PROCESSES[pname], SAMPLERS[sname]()
    if isinstance(process, RectifiedFlow) and not isinstance(sampler.grid, UniformTime):
        sampler.grid.t_max = 0.995
    if isinstance(process, EDM) and isinstance(sampler.grid, UniformTime):
        sampler.grid = Karras()  # uniform steps in sigma over [0.002, 80] are not a sensible EDM grid
    out = sampler.sample(exact_denoiser(MIX, process, "x0"), shape=(1000, 2),
                         generator=torch.Generator().manual_seed(4), progress=False)
    data = MIX.sample(4000, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(out).all()
    assert sliced_wasserstein(out.float(), data.float(), generator=torch.Generator().manual_seed(0)) < 0.2


@pytest.mark.parametrize("pname", PROCESSES)
@pytest.mark.parametrize("make", [lambda: DPMSolverPP(8, order=3), lambda: Heun(6, "karras"), lambda: FlowEuler(8)],
                         ids=["dpm_solver_pp", "heun", "flow_euler"])
def test_every_prediction_type_gives_the_same_samples(pname, make):
    process, sampler = PROCESSES[pname], make()  # a fresh sampler: the test changes its grid
    if isinstance(process, RectifiedFlow):
        sampler.grid.t_max = 0.995  # eps and score carry no information about x0 at alpha = 0
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    outs = {p: sampler.sample(exact_denoiser(MIX, process, p), x.clone(), progress=False) for p in PREDICTIONS}
    for p, out in outs.items():
        assert (out - outs["eps"]).abs().max().item() < 1e-6, p


@pytest.mark.parametrize("make", [lambda: DPMSolverPP(10, order=3), lambda: Heun(8, "karras", s_churn=5),
                                  lambda: DDPM(20), lambda: FlowEuler(10)],
                         ids=["dpm_solver_pp", "heun_churn", "ddpm", "flow_euler"])
def test_per_sample_times_equal_separate_runs(make):
    """A [N + 1, B] time grid runs each sample on its own grid in one batch (deterministic samplers:
    equal to separate runs; stochastic ones: equal to the shared-grid path when the columns agree)."""
    process, sampler = VP(), make()
    den = exact_denoiser(MIX, process)
    x = process.prior((3, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    t_maxes = [1.0, 0.7, 0.4]
    grids = [sampler.grid.__class__(**({"t_max": t} if hasattr(sampler.grid, "t_max") else {}))(process, 10)
             if not isinstance(sampler.grid, Karras) else Karras()(process, 8) * t / 1.0 for t in t_maxes]
    times = torch.stack(grids, dim=1)
    joint = sampler.sample(den, x.clone(), times=times, progress=False, generator=torch.Generator().manual_seed(8))
    if sampler.stochastic:
        # noise is drawn for the whole batch, so runs of one sample differ; instead, the per-sample
        # path with equal columns must reproduce the shared-grid path, noise included
        shared = sampler.sample(den, x.clone(), times=grids[0], progress=False,
                                generator=torch.Generator().manual_seed(8))
        columns = sampler.sample(den, x.clone(), times=grids[0][:, None].expand(-1, 3), progress=False,
                                 generator=torch.Generator().manual_seed(8))
        assert torch.allclose(columns, shared, atol=1e-10)
    else:
        for i in range(3):
            alone = sampler.sample(den, x[i:i + 1].clone(), times=times[:, i], progress=False)
            assert torch.allclose(joint[i:i + 1], alone, atol=1e-10)
    assert torch.isfinite(joint).all()


@pytest.mark.parametrize("s_churn, gamma", [(1e9, math.sqrt(2) - 1), (0.8, 0.1)], ids=["capped", "s_churn/N"])
def test_churn_raises_sigma_by_gamma_capped_at_sqrt2_minus_1(s_churn, gamma):
    """Algorithm 2 of Karras et al.: the first model call is at sigma_hat = sigma (1 + gamma) with
    gamma = min(S_churn / N, sqrt(2) - 1) (N = 8 steps from sigma 10, inside EDM's range)."""
    process, seen = EDM(), []
    inner = exact_denoiser(MIX, process)

    def recording(x, t, **cond):
        seen.append(float(inner.level(t, x).sigma_edm))
        return inner(x, t, **cond)

    recording.process = process
    Euler(8, Karras(sigma_max=10.0), s_churn=s_churn).sample(recording, shape=(4, 2), progress=False,
                                                          generator=torch.Generator().manual_seed(0))
    assert seen[0] == pytest.approx(10.0 * (1 + gamma), rel=1e-9)
