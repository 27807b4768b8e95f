"""Probability-flow ODE and likelihood against exact answers: a Gaussian mixture's analytic log-density
(at every noise level) and its exact ODE solution (scipy, tight tolerance), plus hand-computed
bits/dim and the uniform-dequantisation convention."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.core import build
from genlab.core.errors import ConfigError
from genlab.diffusion import DDIM, EDM, VE, VP, RectifiedFlow, UniformLogSNR
from genlab.diffusion.likelihood import DiffusionLikelihood
from genlab.diffusion.ode import ODESampler, reaches_data
from genlab.metrics.likelihood import (Likelihood, bits_per_dim, bits_per_dim_of, dequantize, normal_log_prob,
                                       quantize)
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution

F64 = torch.float64
MIX2 = GaussianMixture.ring(k=6, radius=2.0, std=0.5)
MIX12 = GaussianMixture.random(12, 3, generator=torch.Generator().manual_seed(0), scale=0.5)
BOUND = 0.01  # nats per dimension (the bound); the tests assert it with a 5x margin


def held_out(mixture: GaussianMixture, n: int, seed: int = 123) -> torch.Tensor:
    return mixture.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def exact_setup(mixture: GaussianMixture, process, prediction: str, **kwargs) -> tuple[DiffusionLikelihood, object]:
    """A likelihood with the mixture's exact denoiser and its exact marginal at t_end as the prior,
    and the analytic log p_{t_start}(x) it must reproduce."""
    like = DiffusionLikelihood(exact_denoiser(mixture, process, prediction), **kwargs)
    ends = process.level(torch.tensor([like.t_start, like.t_end], dtype=F64))
    like.prior = lambda x: mixture.log_prob_t(x, ends.alpha[1], ends.sigma[1])
    return like, lambda x: mixture.log_prob_t(x, ends.alpha[0], ends.sigma[0])


@pytest.mark.parametrize("process, prediction", [(VP(), "eps"), (VE(), "x0"), (EDM(), "v"),
                                                 (RectifiedFlow(), "velocity")], ids=["vp", "ve", "edm", "rf"])
def test_exact_divergence_matches_analytic_log_density_2d(process, prediction):
    like, analytic = exact_setup(MIX2, process, prediction)
    x = held_out(MIX2, 32)
    err = (like.log_prob(x) - analytic(x)).abs().max().item() / 2
    assert err < BOUND / 5, f"{process}: {err:.2e} nats/dim"


@pytest.fixture(scope="module")
def exact12():
    """D = 12, rectified flow with velocity prediction: the exact-divergence likelihood and the truth."""
    like, analytic = exact_setup(MIX12, RectifiedFlow(), "velocity")
    x = held_out(MIX12, 16)
    return like, x, like.estimate(x), analytic(x)


def test_exact_divergence_matches_analytic_log_density_12d(exact12):
    _, x, est, truth = exact12
    assert (est.stderr == 0).all()
    assert (est.log_prob - truth).abs().max().item() / 12 < BOUND / 5


def test_exact_divergence_12d_edm():
    like, analytic = exact_setup(MIX12, EDM(), "eps")
    x = held_out(MIX12, 8, seed=7)
    assert (like.log_prob(x) - analytic(x)).abs().max().item() / 12 < BOUND / 5


def test_flow_matching_log_prob_of_the_data_with_its_own_prior():
    """From t = 0 (the data) to t = 1 (alpha = 0, where N(0, I) is the exact marginal) the default
    prior is exact, so rectified flow's log_prob is log p_data itself."""
    like = DiffusionLikelihood(exact_denoiser(MIX2, RectifiedFlow(), "velocity"), t_start=0.0)
    x = held_out(MIX2, 32, seed=5)
    assert (like.log_prob(x) - MIX2.log_prob(x)).abs().max().item() / 2 < BOUND / 5


def test_hutchinson_agrees_with_exact_within_its_standard_error(exact12):
    like, x, exact, _ = exact12
    stderr = {}
    for probe in ("rademacher", "gaussian"):
        for n in (8, 32):
            hutch = DiffusionLikelihood(like.denoiser, "hutchinson", probe, n, prior=like.prior)
            est = hutch.estimate(x, generator=torch.Generator().manual_seed(2))
            z = (est.log_prob - exact.log_prob) / est.stderr
            # z is t-distributed with n - 1 degrees of freedom: rms about 1, no outliers, no bias
            assert 0.5 < z.square().mean().sqrt().item() < 1.6, (probe, n, z)
            assert z.abs().max().item() < 4.5, (probe, n, z)
            assert abs(z.mean().item()) < 3 / math.sqrt(len(z)) * 1.6, (probe, n, z)
            stderr[probe, n] = est.stderr.mean().item()
        assert 0.35 < stderr[probe, 32] / stderr[probe, 8] < 0.7, stderr  # 1 / sqrt(4) = 0.5
    assert stderr["rademacher", 32] < stderr["gaussian", 32], stderr  # Rademacher has the lower variance


@pytest.mark.parametrize("process, prediction, t_start, t_end", [
    (VP(), "eps", 1.0, 0.0), (EDM(), "eps", 80.0, 0.0), (VE(), "eps", 1.0, 1e-5),
    (RectifiedFlow(), "velocity", 0.99, 0.0)], ids=["vp", "edm", "ve", "rf"])
def test_adaptive_ode_sampler_matches_exact_solution(process, prediction, t_start, t_end):
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = exact_ode_solution(MIX2, process, x, t_start, t_end)
    sampler = ODESampler(rtol=1e-7, atol=1e-7)
    out = sampler.solve(exact_denoiser(MIX2, process, prediction), x, times=torch.tensor([t_start, t_end]),
                        progress=False)
    assert (out.x - ref).abs().max().item() < 1e-5
    assert 20 < out.nfe < 400


def test_ode_sampler_starts_at_alpha_zero():
    """Rectified flow from t = 1 exactly (alpha = 0): for Gaussian data N(m, S) the PF-ODE keeps
    z = (alpha^2 S + sigma^2 I)^(-1/2) (x_t - alpha m) fixed, so x_t = alpha m + (alpha^2 S + sigma^2 I)^(1/2) x_1."""
    gauss = GaussianMixture(torch.ones(1), torch.tensor([[1.0, -0.5]]), torch.tensor([[[0.5, 0.2], [0.2, 0.3]]]))
    process = RectifiedFlow()
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = 0.3
    a, s = 1 - t, t
    evals, evecs = torch.linalg.eigh(a**2 * gauss.covs[0] + s**2 * torch.eye(2, dtype=F64))
    expected = a * gauss.means[0] + x1 @ (evecs @ torch.diag(evals.sqrt()) @ evecs.T)
    for prediction in ("velocity", "v"):
        out = ODESampler(rtol=1e-8, atol=1e-8).sample(exact_denoiser(gauss, process, prediction), x1,
                                                      times=torch.tensor([1.0, t]), progress=False)
        assert (out - expected).abs().max().item() < 1e-6, prediction


def test_ve_step_into_the_data_solves_to_sigma_min_then_denoises():
    """VE's sigma jumps from sigma_min to 0 at t = 0: no model query exists in between."""
    process = VE()
    assert not reaches_data(process) and reaches_data(VP()) and reaches_data(EDM()) and reaches_data(RectifiedFlow())
    x = MIX2.sample(32, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = x + process.sigma(torch.tensor(process.t_min, dtype=F64)) * torch.randn_like(x)
    out = ODESampler(rtol=1e-9, atol=1e-9).sample(exact_denoiser(MIX2, process), x,
                                                  times=torch.tensor([process.t_min, 0.0]), progress=False)
    floor = 1e-12 * process.t_max
    expected = MIX2.x0(exact_ode_solution(MIX2, process, x, process.t_min, floor), 1.0, process.sigma_min)
    assert (out - expected).abs().max().item() < 1e-7


ORDER_MIX = GaussianMixture.random(4, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def order_problem():
    """test_samplers_exact.py's problem: VP, 4-D mixture, t = 1 to 0.2 on a log-SNR grid."""
    process = VP()
    x = process.prior((64, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = UniformLogSNR(t_min=0.2, final="min")
    return exact_denoiser(ORDER_MIX, process), x, grid, exact_ode_solution(ORDER_MIX, process, x, 1.0, 0.2)


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun2", 2), ("heun3", 3), ("rk4", 4)])
def test_fixed_step_methods_converge_at_their_order(order_problem, method, order):
    den, x, grid, ref = order_problem
    errs = []
    for steps in (10, 20, 40):
        out = ODESampler(steps, grid, method=method).solve(den, x, progress=False)
        assert out.nfe == steps * ODESampler(method=method).nfe_per_step
        errs.append((out.x - ref).square().mean().sqrt().item())
    observed = math.log2(errs[1] / errs[2])
    assert abs(observed - order) < 0.3, (method, errs, observed)


def test_euler_is_ddim():
    process = VP()
    den = exact_denoiser(MIX2, process)
    x = process.prior((16, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    ddim = DDIM(12).sample(den, x, progress=False)
    euler = ODESampler(12, "uniform", method="euler").sample(den, x, progress=False)
    assert (ddim - euler).abs().max().item() < 1e-12


def test_per_sample_times_match_shared_grids():
    process = EDM()
    den = exact_denoiser(MIX2, process)
    x = process.prior((2, 2), generator=torch.Generator().manual_seed(4), dtype=F64)
    grids = [torch.tensor([80.0, 5.0, 1.0, 0.0], dtype=F64), torch.tensor([40.0, 10.0, 0.3, 0.01], dtype=F64)]
    sampler = ODESampler(method="rk4")
    together = sampler.sample(den, x, times=torch.stack(grids, 1), progress=False)
    for b, grid in enumerate(grids):
        alone = sampler.sample(den, x[b : b + 1], times=grid, progress=False)
        assert (together[b] - alone[0]).abs().max().item() < 1e-10


def test_ode_sampler_from_config_and_bad_input():
    sampler = build("sampler", {"type": "ode", "method": "rk4", "steps": 8})
    assert isinstance(sampler, ODESampler) and sampler.steps == 8 and sampler.nfe_per_step == 4
    assert build("sampler", "ode").steps == 1  # adaptive: one segment [t_max, 0] by default
    with pytest.raises((ConfigError, ValueError), match="rk45|dopri5"):
        build("sampler", {"type": "ode", "method": "rk45"})
    with pytest.raises(ValueError, match="rtol"):
        ODESampler(rtol=0.0)


def test_likelihood_bad_input():
    den = exact_denoiser(MIX2, VP())
    with pytest.raises(ValueError, match="divergence"):
        DiffusionLikelihood(den, divergence="trace")
    with pytest.raises(ValueError, match="probe"):
        DiffusionLikelihood(den, "hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="n_probes"):
        DiffusionLikelihood(den, "hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="t_start"):
        DiffusionLikelihood(den, t_start=0.5, t_end=0.2)
    with pytest.raises(ValueError, match="sigma jumps"):
        DiffusionLikelihood(exact_denoiser(MIX2, VE()), t_start=0.0)
    one = DiffusionLikelihood(den, "hutchinson", n_probes=1, method="euler", steps=4)
    assert torch.isnan(one.estimate(held_out(MIX2, 2)).stderr).all()  # one probe: no standard error


# ----- bits per dimension and dequantisation ---------------------------------------------------------


class Uniform:
    """The uniform density on [lo, hi)^D."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:1], -x[0].numel() * math.log(self.hi - self.lo), dtype=x.dtype)


class Analytic:
    def __init__(self, mixture: GaussianMixture) -> None:
        self.mixture = mixture

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.log_prob(x)


def test_bits_per_dim_by_hand():
    assert isinstance(Uniform(0, 1), Likelihood) and isinstance(DiffusionLikelihood(exact_denoiser(MIX2, VP())),
                                                                 Likelihood)
    # N(0, I) in 3 dims at 0: log p = -1.5 log(2 pi), so 0.5 log2(2 pi) = 1.3257 bits per dim
    lp = normal_log_prob(torch.zeros(1, 3, dtype=F64))
    assert lp.item() == pytest.approx(-1.5 * math.log(2 * math.pi))
    assert bits_per_dim(lp, 3).item() == pytest.approx(0.5 * math.log2(2 * math.pi))
    assert normal_log_prob(torch.full((1, 2), 2.0, dtype=F64), 2.0).item() == pytest.approx(
        -1.0 - 2 * math.log(2) - math.log(2 * math.pi))
    # the uniform density on the data range gives every one of 256 levels probability 1/256: 8 bits
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0)):
        x = lo + (hi - lo) * torch.randint(0, 256, (5, 3, 4, 4), generator=torch.Generator().manual_seed(0)) / 255
        assert torch.allclose(bits_per_dim_of(Uniform(lo, hi), x.double(), data_range=(lo, hi)),
                              torch.full((5,), 8.0, dtype=F64))
    x = torch.randint(0, 16, (4, 2), generator=torch.Generator().manual_seed(0)) / 15 * 2 - 1
    assert torch.allclose(bits_per_dim_of(Uniform(-1, 1), x.double(), bins=16), torch.full((4,), 4.0, dtype=F64))


def test_dequantised_bound_against_the_exact_discrete_probability():
    """For a Gaussian in 1-D the probability of each bin is a difference of normal CDFs; the
    dequantised bound is above its bits (Jensen) and within 0.01 bits of it for a smooth density."""
    bins, std = 256, 0.3
    k = torch.arange(60, 200, 7, dtype=F64)
    x = (k / (bins - 1) * 2 - 1)[:, None]
    width = 2 / bins
    normal = torch.distributions.Normal(torch.zeros((), dtype=F64), std)
    lo = -1 + k * width
    exact_bits = -torch.log(normal.cdf(lo + width) - normal.cdf(lo)) / math.log(2)

    class Gauss:
        def log_prob(self, y):
            return normal_log_prob(y, std)

    bound = bits_per_dim_of(Gauss(), x, samples=64, generator=torch.Generator().manual_seed(0))
    assert (bound - exact_bits).abs().max().item() < 0.01
    assert (bound - exact_bits).mean().item() > -1e-3


def test_dequantize_ranges_and_checks():
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (64, 3, 8, 8), generator=g)
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0)):
        x = (lo + (hi - lo) * k / 255).float()
        y = dequantize(x, generator=g, data_range=(lo, hi))
        assert y.dtype == torch.float32 and y.min() >= lo and y.max() < hi
        bin_index = ((y.double() - lo) / ((hi - lo) / 256)).floor()
        assert (bin_index == k).all()  # value k lands in bin k
        u = (y.double() - lo) / ((hi - lo) / 256) - k
        assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    images = k / 127.5 - 1  # genlab's image convention
    assert torch.allclose(quantize(images + 0.001), images, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not on the 256 levels"):
        dequantize(images + 0.002)
    with pytest.raises(ValueError, match="outside data_range"):
        dequantize(images, data_range=(0.0, 1.0))


def test_bits_per_dim_of_a_flow_matching_model_matches_the_analytic_density():
    """Discrete 2-D data in [-1, 1]: the PF-ODE likelihood of the exact model and the analytic
    density give the same dequantised bits/dim (same draws of u)."""
    mixture = GaussianMixture.ring(k=4, radius=0.5, std=0.15)
    x = quantize(mixture.sample(16, generator=torch.Generator().manual_seed(0), dtype=F64))
    like = DiffusionLikelihood(exact_denoiser(mixture, RectifiedFlow(), "velocity"), t_start=0.0)
    ode = bits_per_dim_of(like, x, generator=torch.Generator().manual_seed(1))
    analytic = bits_per_dim_of(Analytic(mixture), x, generator=torch.Generator().manual_seed(1))
    assert (ode - analytic).abs().max().item() < BOUND / 5 / math.log(2)
    assert 7.0 < analytic.mean().item() < 9.0  # sanity: about log2(256) - entropy-ish offset


def test_drift_is_the_probability_flow_ode_of_level_sde():
    """In x and t, the (y, r) drift is Song et al.'s f x + g^2 / (2 sigma) eps (Eq. 13 with Level.sde):
    x = c y with c = alpha + sigma gives dx/dt = c' y + c (dr/dt) (eps - x0)."""
    from genlab.diffusion.ode import ProbabilityFlow, path_time

    for process, prediction in ((VP(), "eps"), (VE(), "x0"), (RectifiedFlow(), "velocity")):
        den = exact_denoiser(MIX2, process, prediction)
        t = torch.tensor(0.4, dtype=F64)
        level, h = process.level(t), 1e-6
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        f, g2 = level.sde
        x0, eps = den(x, level)
        song = f * x + g2 / (2 * level.sigma) * eps
        flow = ProbabilityFlow(den, level, process.level(t - h))  # tau = 1 is a step of -h in t
        c = level.alpha + level.sigma
        dc_dt = level.d_alpha + level.d_sigma
        dr_dt = (path_time(process.level(t + h)) - path_time(process.level(t - h))) / (2 * h)
        ours = dc_dt * x / c + c * dr_dt * flow(torch.tensor(0.0, dtype=F64), x / c) / flow.dr
        assert (ours - song).abs().max().item() < 1e-6 * (1 + song.abs().max().item()), process
