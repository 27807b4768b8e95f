"""Consistency models' sampling side (Song et al. 2023, "Consistency Models"): the parameterisation of
App. C as a Denoiser (its boundary condition on every process, its scalings against the paper's
formulas) and multistep consistency sampling (Algorithm 1) with a perfect consistency model, the exact
probability-flow ODE solution of a Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.core.registry import build, registered
from genlab.diffusion import (EDM, VE, VP, ConsistencyDenoiser, ConsistencySampler, Denoiser, DiscreteVP,
                              RectifiedFlow, SubVP, consistency_scalings)
from genlab.diffusion.levels import Level, combine
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution
from genlab.testing.devices import DeviceAudit, generator_on

MIX = GaussianMixture.ring(std=0.5)
F64 = torch.float64


# ----- the paper's formulas, written out here (Song et al. 2023, App. C; Karras et al. 2022, Table 1) -----
def song_c_skip(s: float, sigma_data: float, sigma_min: float) -> float:
    return sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)


def song_c_out(s: float, sigma_data: float, sigma_min: float) -> float:
    return (s - sigma_min) * sigma_data / math.sqrt(sigma_data**2 + s**2)


def karras_c_in(s: float, sigma_data: float) -> float:
    return 1 / math.sqrt(s**2 + sigma_data**2)


def random_backbone(seed: int = 0):
    """A fixed random network F(x_in [B, 2], c_noise [B]) -> [B, 2]."""
    g = torch.Generator().manual_seed(seed)
    w, b, v = (torch.randn(2, 2, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64),
               torch.randn(2, 2, generator=g, dtype=F64))

    def backbone(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(x @ w.to(x) + t[:, None] * b.to(x)) @ v.to(x)

    return backbone


def process_level(process, t) -> Level:
    return process.level(torch.as_tensor(t, dtype=F64))


# ----- the parameterisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("pname", registered("process")["process"])
def test_the_consistency_function_is_the_identity_at_the_boundary_on_every_process(pname):
    """f(x, t_min) = x / alpha(t_min): the identity on x^ = x / alpha (c_skip = 1, c_out = 0 exactly), for
    a random backbone; on a shared level, per sample, through forward and through the fast path."""
    process = build("process", pname)
    den = ConsistencyDenoiser(random_backbone(), process, sigma_data=0.7)
    x = 3 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    level = process_level(process, process.t_min)
    assert den.sigma_min == float(level.sigma_edm)
    c_skip, c_out, _, _ = den.scalings(level)
    assert (c_skip, c_out) == (1.0, 0.0)
    alpha = float(level.alpha)
    per_sample = process_level(process, torch.full((16,), process.t_min, dtype=F64))
    for lv in (level, per_sample):
        x0, eps = den(x, lv)
        raw, (a_x0, b_x0, _, _) = den.linear(x, lv)
        fast = combine((a_x0, x), (b_x0, raw))
        for out in (x0, fast, den.consistency(x, lv)):
            assert (out - x / alpha).abs().max().item() <= 1e-12 * (x / alpha).abs().max().item()
        assert eps.abs().max().item() <= 1e-12
    # a boundary set by hand: Song et al.'s formulas are exactly (1, 0) there
    assert tuple(float(c) for c in consistency_scalings(torch.tensor(0.05, dtype=F64), 0.5, 0.05)[:2]) == (1.0, 0.0)


@pytest.mark.parametrize("process", [VP(), EDM(), VE(), DiscreteVP(), RectifiedFlow()],
                         ids=["vp", "edm", "ve", "ddpm", "rectified_flow"])
def test_scalings_and_outputs_match_song_et_al(process):
    """c_skip, c_out (App. C) and c_in (Karras et al.) at a few levels, and x0 = f and eps against a hand
    evaluation of c_skip x^ + c_out F(c_in x^, ln(s) / 4), with s = sigma / alpha and x^ = x / alpha."""
    sd, backbone = 0.7, random_backbone(2)
    den = ConsistencyDenoiser(backbone, process, sigma_data=sd)
    s_min = den.sigma_min
    x = 2 * torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    t_top = 0.9 if isinstance(process, RectifiedFlow) else process.t_max
    for t in (process.t_min * 1.5, process.t_min * 10, (process.t_min + t_top) / 3, t_top):
        level = process_level(process, t)
        alpha, sigma = (float(fn(torch.tensor(t, dtype=F64))) for fn in (process.alpha, process.sigma))
        s = sigma / alpha
        c_skip, c_out, c_in, c_noise = den.scalings(level)
        assert c_skip == pytest.approx(song_c_skip(s, sd, s_min), rel=1e-12, abs=1e-15)
        assert c_out == pytest.approx(song_c_out(s, sd, s_min), rel=1e-12, abs=1e-15)
        assert c_in == pytest.approx(karras_c_in(s, sd), rel=1e-12)
        assert c_noise == pytest.approx(math.log(s) / 4, rel=1e-12, abs=1e-15)
        x_hat = x / alpha
        f = song_c_skip(s, sd, s_min) * x_hat + song_c_out(s, sd, s_min) * backbone(
            karras_c_in(s, sd) * x_hat, torch.full((8,), math.log(s) / 4, dtype=F64))
        x0, eps = den(x, level)
        assert torch.allclose(x0, f, rtol=1e-10, atol=1e-12), t
        assert torch.allclose(alpha * x0 + sigma * eps, x, rtol=1e-10, atol=1e-12), t  # eps is the one x0 implies
        assert torch.allclose(den.target(f, eps, x, level), backbone(karras_c_in(s, sd) * x_hat, torch.full(
            (8,), math.log(s) / 4, dtype=F64)), rtol=1e-8, atol=1e-10), t


def test_the_boundary_can_be_set_and_bad_values_are_refused():
    den = ConsistencyDenoiser(random_backbone(), EDM(), sigma_min=0.01)
    assert den.sigma_min == 0.01 and ConsistencyDenoiser(random_backbone(), EDM()).sigma_min == 0.002
    c_skip, c_out, _, _ = den.scalings(EDM().level(0.01))
    assert (c_skip, c_out) == (1.0, 0.0)
    assert den.scalings(EDM().level(0.005))[:2] == (1.0, 0.0)  # below the boundary: the identity too
    for kwargs, message in [({"sigma_data": 0}, "sigma_data must be > 0, got 0"),
                            ({"sigma_data": -1.0}, "sigma_data must be > 0"),
                            ({"sigma_min": 0}, "sigma_min must be > 0, got 0"),
                            ({"sigma_min": math.nan}, "sigma_min must be > 0"),
                            ({"sigma_min": 80.0}, r"sigma_min \(80\) must be below the largest noise level")]:
        with pytest.raises(ValueError, match=message):
            ConsistencyDenoiser(random_backbone(), EDM(), **kwargs)
    with pytest.raises(ValueError, match="ConsistencySampler: sigma_min must be >= 0, got -1"):
        ConsistencySampler(sigma_min=-1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ConsistencySampler(steps=0)


# ----- a perfect consistency model: the exact probability-flow ODE solution ---------------------------
def perfect_consistency_model(mixture: GaussianMixture, process, sigma_data: float = 0.5) -> ConsistencyDenoiser:
    """A ConsistencyDenoiser whose f(x, t) is the probability-flow ODE's solution from t to the boundary
    sigma_min (in x^ = x / alpha and s = sigma / alpha the ODE is the same for every process, so it is
    solved on EDM's): its backbone is F = (f - c_skip x^) / c_out, with the paper's scalings."""
    s_min = float(process.level(process.t_min).sigma_edm)

    def backbone(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        s = float(torch.exp(4 * c_noise[0]))  # c_noise = ln(s) / 4, one level for the batch
        x_hat = x_in / karras_c_in(s, sigma_data)
        end = exact_ode_solution(mixture, EDM(), x_hat, s, s_min, rtol=1e-9, atol=1e-9)
        return (end - song_c_skip(s, sigma_data, s_min) * x_hat) / song_c_out(s, sigma_data, s_min)

    return ConsistencyDenoiser(backbone, process, sigma_data)


def assert_mixture_moments(x: torch.Tensor, mixture: GaussianMixture) -> None:
    """z-tests of the mean and covariance at 4 standard errors (as tests/test_samplers_exact.py)."""
    n, mean, cov = len(x), mixture.mean(), mixture.covariance()
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean + 0.01).all(), (x.mean(0), mean)
    var = torch.diagonal(cov)
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((x.T.cov() - cov).abs() < 4 * se_cov + 0.02).all(), (x.T.cov(), cov)


@pytest.mark.parametrize("pname, steps", [("vp", 1), ("vp", 2), ("vp", 4), ("edm", 2)])
def test_perfect_consistency_model_samples_the_mixture(pname, steps):
    """1-step and multistep consistency sampling with the exact ODE solution as f give the mixture's mean
    and covariance (up to its noise of std sigma_min ~ 0.01, far below the tolerance)."""
    process = {"vp": VP(), "edm": EDM()}[pname]
    den = perfect_consistency_model(MIX, process)
    x = ConsistencySampler(steps).sample(den, shape=(4000, 2), generator=torch.Generator().manual_seed(11),
                                         dtype=F64, progress=False)
    assert_mixture_moments(x, MIX)


def test_the_perfect_model_is_consistent():
    """Sanity of the oracle: f(x_t, t) = f(x_s, s) for x_s on x_t's ODE trajectory, and f is the ODE's end."""
    process = VP()
    den = perfect_consistency_model(MIX, process)
    x_t = process.prior((64, 2), generator=torch.Generator().manual_seed(12), dtype=F64)
    x_s = exact_ode_solution(MIX, process, x_t, 1.0, 0.3)
    f_t, f_s = den.consistency(x_t, 1.0), den.consistency(x_s, 0.3)
    assert (f_t - f_s).abs().max().item() < 1e-6
    end = exact_ode_solution(MIX, process, x_t, 1.0, process.t_min) / float(process.level(process.t_min).alpha)
    assert (f_t - end).abs().max().item() < 1e-6


# ----- the sampler ------------------------------------------------------------------------------------
def test_renoising_follows_algorithm_1_in_the_process_scale():
    """After the first evaluation x = alpha_1 (x0 + sqrt(s_1^2 - sigma_min^2) z) with z the generator's
    next normal draw (x0 is at noise level sigma_min already); without a boundary on the denoiser (a plain
    Denoiser) sigma_min = 0: x = alpha_1 x0 + sigma_1 z; the sampler's own sigma_min wins."""
    process = VP()
    times = torch.tensor([1.0, 0.4, 0.1, process.t_min], dtype=F64)
    x_T = process.prior((32, 2), generator=torch.Generator().manual_seed(13), dtype=F64)
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(14), dtype=F64)
    level = process_level(process, 0.4)
    alpha, sigma = float(level.alpha), float(level.sigma)
    for den, sampler, s_min in [
        (ConsistencyDenoiser(random_backbone(), process), ConsistencySampler(3), None),
        (Denoiser(random_backbone(), process, "v"), ConsistencySampler(3), 0.0),
        (ConsistencyDenoiser(random_backbone(), process), ConsistencySampler(3, sigma_min=0.2), 0.2),
    ]:
        s_min = den.sigma_min if s_min is None else s_min
        seen = []
        sampler.sample(den, x_T.clone(), times=times, generator=torch.Generator().manual_seed(14), progress=False,
                       callback=seen.append)
        expected = alpha * (seen[0].denoised + math.sqrt((sigma / alpha) ** 2 - s_min**2) * z)
        assert torch.allclose(seen[0].x, expected, rtol=1e-12, atol=1e-12)
        assert torch.allclose(seen[0].denoised, den(x_T, process_level(process, 1.0))[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_one_evaluation_per_step_and_the_last_step_returns_x0(steps):
    """nfe_per_step = 1: N backbone calls for N steps, N - 1 noise draws; the result is f at the last
    evaluation (no re-noising after it); stochastic: two generators give two samples once N >= 2."""
    process, calls = EDM(), []
    backbone = random_backbone()

    def counting(x, t):
        calls.append(float(t[0]))
        return backbone(x, t)

    den, sampler = ConsistencyDenoiser(counting, process), ConsistencySampler(steps)
    assert (sampler.nfe_per_step, sampler.stochastic, sampler.multistep) == (1, True, False)
    x_T = process.prior((8, 2), generator=torch.Generator().manual_seed(15), dtype=F64)
    seen = []
    out = sampler.sample(den, x_T.clone(), generator=torch.Generator().manual_seed(16), progress=False,
                         callback=seen.append)
    times = sampler.timesteps(process)
    assert calls == pytest.approx([math.log(float(t)) / 4 for t in times[:-1]], rel=1e-12)  # every time but the end
    assert torch.equal(out, seen[-1].denoised)
    meta = ConsistencyDenoiser(lambda x, t: 0.5 * x, process)  # a backbone that reads no values
    with DeviceAudit() as audit:
        sampler.sample(meta, shape=(8, 2), generator=generator_on("meta"), progress=False)
    assert audit.draws == 1 + steps - 1  # the prior, then one re-noising per step but the last
    other = sampler.sample(den, x_T.clone(), generator=torch.Generator().manual_seed(17), progress=False)
    assert torch.equal(out, other) == (steps == 1)


@pytest.mark.parametrize("pname", ["vp", "edm"])
def test_runs_on_the_meta_device_with_shared_and_per_sample_times(pname):
    process = {"vp": VP(), "edm": EDM()}[pname]
    den = ConsistencyDenoiser(lambda x, t: 0.5 * x + 1e-3 * t[:, None], process)
    sampler = ConsistencySampler(4)
    times = sampler.timesteps(process)
    for grid in (None, times[:, None].expand(-1, 3).clone()):
        with DeviceAudit():
            x = sampler.sample(den, shape=(3, 2), times=grid, generator=generator_on("meta"), progress=False)
        assert (x.device.type, x.dtype, x.shape) == ("meta", torch.float32, (3, 2))


class Forwarding:
    """A wrapper that forwards attribute access to its denoiser (as a guidance wrapper might): no fast path,
    the boundary sigma_min read through it."""

    def __init__(self, denoiser):
        self.inner = denoiser

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, **cond):
        return self.inner(x, t, **cond)


def test_per_sample_times_the_fast_path_and_a_wrapper_agree():
    """Per-sample times [N + 1, B] with equal columns give the shared grid's samples, noise included; a run
    with a callback (no fast path: x0 from forward) and one through a forwarding wrapper give those of a
    run without (x0 from linear)."""
    process = SubVP()
    den = ConsistencyDenoiser(random_backbone(4), process, sigma_min=0.05)  # a boundary the re-noising must see
    sampler = ConsistencySampler(5)
    x_T = process.prior((6, 2), generator=torch.Generator().manual_seed(18), dtype=F64)
    times = sampler.timesteps(process)

    def run(grid, callback=None, denoiser=den):
        return sampler.sample(denoiser, x_T.clone(), times=grid, generator=torch.Generator().manual_seed(19),
                              progress=False, callback=callback)

    shared = run(times)
    assert torch.allclose(run(times[:, None].expand(-1, 6)), shared, rtol=0, atol=1e-12)
    assert torch.allclose(run(times, callback=lambda info: None), shared, rtol=0, atol=1e-12)
    assert torch.allclose(run(times, denoiser=Forwarding(den)), shared, rtol=0, atol=1e-12)


def test_any_denoiser_and_the_registry():
    """The sampler needs only x0: on an exact mixture denoiser (x0 = E[x0 | x_t]) 1 step returns the
    mixture's mean; it is built from a config like every sampler, and its grid ends at t_min."""
    process = VP()
    sampler = build("sampler", {"type": "consistency", "steps": 3, "sigma_min": 0.0})
    assert isinstance(sampler, ConsistencySampler) and sampler.sigma_min == 0.0
    assert float(sampler.timesteps(process)[-1]) == pytest.approx(process.t_min, rel=1e-9)
    out = ConsistencySampler(1).sample(exact_denoiser(MIX, process, "eps"), shape=(64, 2), dtype=F64,
                                       generator=torch.Generator().manual_seed(20), progress=False)
    assert (out - MIX.mean()).abs().max().item() < 0.05  # x_T carries almost nothing of x0 at t_max
