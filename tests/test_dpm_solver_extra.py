"""SDE-DPM-Solver++ (2M / 3M SDE) and single-step DPM-Solver++ (2S / 3S).

Oracles: diffusers' schedulers step by step in float64 (the same model function, grid and, for the
SDE, the same noise from the same generator); the exact Gaussian-mixture ODE solution (orders) and
the mixture's moments (SDE samples); the exact integral of a smooth x0(lambda) (local order of the
shared update, on every side and for every eta).

diffusers' third-order SDE update is not an oracle: its D2 weight is alpha_s ((1 - e^-2h - 2h) /
(2h)^2 - 1/2), where the exponential-integrator derivation (and k-diffusion's sample_dpmpp_3m_sde)
gives + 1/2. The update then has local error O(h^2) on a smooth x0(lambda) instead of O(h^3); its
samples here leave genlab's at the third step. k-diffusion's 3M SDE is compared when installed.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genlab.core.errors import ConfigError  # noqa: E402
from genlab.core.registry import build  # noqa: E402
from genlab.diffusion import DDIM, VP, DPMSolverPP, DPMSolverPPSDE, DPMSolverSingle  # noqa: E402
from genlab.diffusion.samplers.dpm_solver import dpm_solver_pp_update  # noqa: E402
from genlab.diffusion.samplers.dpm_solver_single import stage_schedule  # noqa: E402
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution  # noqa: E402
from genlab.testing.convergence import observed_orders  # noqa: E402
from genlab.testing.peers import (assert_steps_close, ddpm_times, run_diffusers, run_genlab,  # noqa: E402
                                  set_timesteps_float64)

X = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
MIX = GaussianMixture.ring(std=0.5)
ORDER_MIX = GaussianMixture.random(4, 3, generator=torch.Generator().manual_seed(0))

# ----- diffusers, step by step ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [7, 10, 12])
@pytest.mark.parametrize("order", [2, 3])
def test_single_step_matches_diffusers(order, steps):
    sched = diffusers.DPMSolverSinglestepScheduler(solver_order=order, algorithm_type="dpmsolver++")
    set_timesteps_float64(sched, steps)
    theirs = run_diffusers(sched, X)
    ours = run_genlab(DPMSolverSingle(steps, order=order), sched, X, ddpm_times(sched))
    assert_steps_close(ours, theirs)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_stage_schedule_is_diffusers_order_list(order, final):
    sched = diffusers.DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=True,
                                                   final_sigmas_type=final)
    for steps in range(1, 31):
        ours = stage_schedule(steps, order)
        if final == "zero":  # the sampler makes the interval into sigma = 0 first order
            ours[-1] = 1
        assert ours == sched.get_order_list(steps), steps


@pytest.fixture
def float64_noise(monkeypatch):
    """diffusers' multistep scheduler draws its noise itself, randn of the sample's shape from the
    generator each step, in float32; let it draw in float64, otherwise unchanged."""
    module = diffusers.schedulers.scheduling_dpmsolver_multistep
    randn = module.randn_tensor
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: randn(shape, **{**kw, "dtype": torch.float64}))


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2])
def test_sde_matches_diffusers_with_shared_noise(float64_noise, order, solver_type, steps):
    """The same generator seed for both: diffusers draws one randn(x.shape) per step, as genlab does."""
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=order, algorithm_type="sde-dpmsolver++",
                                                  solver_type=solver_type)
    set_timesteps_float64(sched, steps)
    theirs = run_diffusers(sched, X, generator=torch.Generator().manual_seed(3))
    ours = run_genlab(DPMSolverPPSDE(steps, order=order, solver_type=solver_type), sched, X,
                      ddpm_times(sched), generator=torch.Generator().manual_seed(3))
    assert_steps_close(ours, theirs)
    deterministic = run_genlab(DPMSolverPP(steps, order=order, solver_type=solver_type), sched, X,
                               ddpm_times(sched))
    assert (ours[-1] - deterministic[-1]).abs().max() > 0.1  # the noise matters


def test_sde_matches_diffusers_in_float32():
    """Unpatched diffusers (float32 noise and arithmetic) and genlab in float32, same seed."""
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(12)
    x = X.float()
    theirs = run_diffusers(sched, x, generator=torch.Generator().manual_seed(5))
    ours = run_genlab(DPMSolverPPSDE(12), sched, x, ddpm_times(sched), generator=torch.Generator().manual_seed(5))
    scale = max(t.abs().max().item() for t in theirs)  # about 200: float32 rounding, relative 3e-6
    assert_steps_close(ours, theirs, tol=1e-5 * scale)
    other = run_genlab(DPMSolverPPSDE(12), sched, x, ddpm_times(sched), generator=torch.Generator().manual_seed(6))
    assert (other[-1] - theirs[-1]).abs().max().item() > 100 * 1e-5 * scale  # another seed is far off


@pytest.mark.parametrize("order", [2, 3])
def test_multistep_heun_matches_diffusers(order):
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=order, solver_type="heun")
    set_timesteps_float64(sched, 10)
    theirs = run_diffusers(sched, X)
    sampler = DPMSolverPP(10, order=order, solver_type="heun", third_order="reference")
    assert_steps_close(run_genlab(sampler, sched, X, ddpm_times(sched)), theirs)


def test_first_order_sde_is_ddpm_posterior_step():
    """With one x0 estimate, SDE-DPM-Solver++ is DDIM with eta = 1 (the same noise draws)."""
    process = VP()
    den = exact_denoiser(MIX, process)
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = DPMSolverPPSDE(15, "uniform", order=1).sample(den, x.clone(), generator=torch.Generator().manual_seed(2),
                                                        progress=False)
    b = DDIM(15, eta=1.0).sample(den, x.clone(), generator=torch.Generator().manual_seed(2), progress=False)
    assert (a - b).abs().max().item() < 1e-12


# ----- the shared update against an exact integral ------------------------------------------------


C, LAM0 = 0.7, 0.3  # x0(lambda) = exp(C lambda); the update starts at lambda = LAM0


def level_at(lam: float):
    process = VP()
    return process.level(process.t_of_log_snr(torch.tensor(2 * lam, dtype=torch.float64)))


def update_error(offsets, h, eta, **kw):
    """|update - exact| for x0(lambda) = exp(C lambda) known at LAM0 + r h (r in ``offsets``), x = 0:
    the exact value is alpha_s int_0^h k e^(-k (h - u)) x0(LAM0 + u) du, k = 1 + eta."""
    points = [(level_at(LAM0 + r * h), torch.tensor([math.exp(C * (LAM0 + r * h))], dtype=torch.float64)) for r in offsets]
    out = dpm_solver_pp_update(torch.zeros(1, dtype=torch.float64), points, level_at(LAM0 + h), eta=eta, **kw)
    k = 1 + eta
    exact = level_at(LAM0 + h).alpha.item() * k * math.exp(C * LAM0) * (math.exp(C * h) - math.exp(-k * h)) / (k + C)
    return abs(out.item() - exact)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("offsets, kw, local", [
    ([0], {}, 2),
    ([0, -1], {"solver_type": "midpoint"}, 3),  # 2M
    ([0, -1.5], {"solver_type": "heun"}, 3),
    ([0, 0.5], {"solver_type": "midpoint"}, 3),  # 2S, stage ahead
    ([0, 2 / 3], {"solver_type": "heun"}, 4),  # 3S: the line through r = 0 and 2/3, integrated exactly
    ([0, -1, -2], {"third_order": "taylor"}, 4),  # 3M
    ([0, -1, -2], {"third_order": "reference"}, 3),  # 3M as the reference code and diffusers' ODE
], ids=["1", "2m_midpoint", "2m_heun", "2s", "3s", "3m_taylor", "3m_reference"])
def test_update_local_order(offsets, kw, local, eta):
    errs = [update_error(offsets, h, eta, **kw) for h in (0.2, 0.1, 0.05)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(o - local) < 0.3 for o in orders), (errs, orders)


# ----- the exact mixture --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ode_problem():
    """16 points of the 4-D mixture from t = 1 to 0.2 and their exact ODE solution (tolerance 1e-9,
    far below the smallest solver error here, 2e-6); on one thread, as the tests run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    process = VP()
    x = process.prior((16, ORDER_MIX.dim), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact_ode_solution(ORDER_MIX, process, x, 1.0, 0.2, rtol=1e-9, atol=1e-9)
    torch.set_num_threads(threads)
    return ORDER_MIX, process, x, 0.2, ref


@pytest.mark.parametrize("order, steps", [(2, (48, 96, 192)), (3, (96, 192, 384))])
def test_single_step_converges_at_its_order(ode_problem, order, steps):
    """2S / 3S with steps (= model evaluations) divisible by the order: no shortened last step.
    Below about 50 evaluations this mixture is pre-asymptotic for them (3S: 2.0, 1.9 between 12, 24
    and 48); the observed orders here are 1.90, 1.94 (2S) and 2.86, 2.94 (3S)."""
    make = lambda n, g: DPMSolverSingle(n, g, order=order, lower_order_final=False)  # noqa: E731
    orders, errs = observed_orders(make, *ode_problem, steps=steps)
    assert all(abs(o - order) < 0.4 for o in orders), (errs, orders)


@pytest.mark.parametrize("order", [2, 3])
def test_sde_samples_match_mixture_moments(order):
    """Mean and covariance of 20000 samples within 4 standard errors (plus 0.01 / 0.02 for the
    discretisation) of the ring mixture's."""
    process, n = VP(), 20000
    x = DPMSolverPPSDE(40, order=order).sample(exact_denoiser(MIX, process), shape=(n, 2), progress=False,
                                               generator=torch.Generator().manual_seed(3)).double()
    mean, cov = MIX.mean(), MIX.covariance()
    var = torch.diagonal(cov)
    assert ((x.mean(0) - mean).abs() < 4 * (var / n).sqrt() + 0.01).all(), (x.mean(0), mean)
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((x.T.cov() - cov).abs() < 4 * se_cov + 0.02).all(), (x.T.cov(), cov)


def test_single_step_per_sample_times_equal_separate_runs():
    process = VP()
    den = exact_denoiser(MIX, process)
    sampler = DPMSolverSingle(9, order=3)
    x = process.prior((3, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grids = [sampler.grid.__class__(t_max=t)(process, 9) for t in (1.0, 0.7, 0.4)]
    joint = sampler.sample(den, x.clone(), times=torch.stack(grids, dim=1), progress=False)
    for i in range(3):
        alone = sampler.sample(den, x[i:i + 1].clone(), times=grids[i], progress=False)
        assert torch.allclose(joint[i:i + 1], alone, atol=1e-10)


# ----- config and errors --------------------------------------------------------------------------


def test_built_from_config():
    sde = build("sampler", {"type": "dpm_solver_pp_sde", "order": 3, "steps": 12})
    assert isinstance(sde, DPMSolverPPSDE) and sde.eta == 1.0 and sde.order == 3
    single = build("sampler", {"type": "dpm_solver_single", "order": 3})
    assert isinstance(single, DPMSolverSingle) and single.nfe_per_step == 1
    with pytest.raises(ConfigError, match="solver_type"):
        build("sampler", {"type": "dpm_solver_pp", "solver_type": "rk4"})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        DPMSolverSingle(order=4)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DPMSolverPP(eta=-0.5)
    with pytest.raises(ValueError, match="1, 2 or 3 x0 estimates, got 4"):
        lv = level_at(0.0)
        dpm_solver_pp_update(torch.zeros(1), [(lv, torch.zeros(1))] * 4, level_at(1.0))


def test_3m_sde_matches_k_diffusion():
    """k-diffusion's sample_dpmpp_3m_sde is 3M SDE with the reference D2 weight, the exact-linear
    ("heun") second step, and no lowering of the final orders."""
    sampling = pytest.importorskip("k_diffusion.sampling")
    process = VP()
    den = exact_denoiser(MIX, process)
    sampler = DPMSolverPPSDE(12, order=3, solver_type="heun", third_order="reference", lower_order_final=False)
    levels = process.level(sampler.timesteps(process))
    sigmas = torch.cat([levels.sigma_edm[:-1], torch.zeros(1, dtype=torch.float64)])
    x = process.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(x_scaled, sigma):  # k-diffusion's x / alpha and sigma / alpha
        level = process.level(process.t_of_sigma_edm(sigma[:1].double())[0])
        return den(x_scaled * level.alpha, level)[0]

    g = torch.Generator().manual_seed(5)
    theirs = sampling.sample_dpmpp_3m_sde(model, x / levels.alpha[0], sigmas, disable=True,
                                          noise_sampler=lambda s, s_next: torch.randn(x.shape, generator=g,
                                                                                      dtype=x.dtype))
    ours = sampler.sample(den, x.clone(), generator=torch.Generator().manual_seed(5), progress=False)
    assert (theirs - ours).abs().max().item() < 1e-10
