"""Ancestral Euler and Restart sampling against their peers and the exact Gaussian-mixture oracle.

Peers: diffusers' EulerAncestralDiscreteScheduler step by step (float64, the same generator),
k-diffusion's get_ancestral_step formula, and a transcription of the Restart reference code
(Newbeeer/diffusion_restart_sampling, ``restart_sampler``). Exact: moments and a two-sample
energy-distance check against the mixture, calibrated by data-vs-data draws and shown to fail
for samplers that are known to be off.
"""

from __future__ import annotations

import math

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.core.registry import build
from genlab.diffusion import DDIM, EDM, VP, Euler, EulerAncestral, Heun, Karras, Restart
from genlab.diffusion.samplers import RestartInterval, ancestral_sigmas
from genlab.diffusion.samplers.restart import PAPER_CIFAR10
from genlab.testing import GaussianMixture, exact_denoiser

MIX = GaussianMixture.ring(std=0.5)  # 8 components at radius 2: overlapping, not sharp
N = 4000  # samples per moment check: SE(mean) = 1.5 / sqrt(N) = 0.024, SE(var) = 2.25 sqrt(2 / N) = 0.05
M = 2000  # samples per energy distance (pairwise distances cost M^2)


# ----- ancestral Euler: peers ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_euler_ancestral_matches_diffusers_with_shared_noise(schedule):
    """diffusers draws randn(sample.shape, generator, dtype) once per step after the model call, as
    Sampler.noise does, so the same seed gives the same noise (diffusers also draws at the last step,
    where sigma_up = 0 and genlab draws nothing; nothing follows it)."""
    diffusers = pytest.importorskip("diffusers")
    peer = pytest.importorskip("test_samplers_diffusers")  # its float64 loop and nonlinear model
    from genlab.testing.peers import set_timesteps_float64

    sched = diffusers.EulerAncestralDiscreteScheduler(beta_schedule=schedule, timestep_spacing="linspace")
    set_timesteps_float64(sched, 12)
    theirs = peer.run_diffusers(sched, peer.X, generator=torch.Generator().manual_seed(11), scaled=True)
    times = torch.cat([(sched.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    ours = peer.run_genlab(EulerAncestral(12), sched, peer.X, times, torch.Generator().manual_seed(11))
    peer.assert_steps_close(ours, theirs)
    assert (ours[5] - peer.X).abs().max() > 0.1  # the comparison is not of unchanged samples


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 3.0])
def test_ancestral_sigmas_are_k_diffusion_get_ancestral_step(eta):
    """k-diffusion's formula in Karras' sigma s = sigma / alpha, times alpha_next (eta = 3 hits the min)."""
    process = VP()
    levels = process.level(Karras()(process, 10))
    s = levels.sigma_edm
    for i in range(10):
        lv, nx = levels[i], levels[i + 1]
        s_up = min(float(s[i + 1]), eta * math.sqrt(float(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)))
        s_down = math.sqrt(float(s[i + 1]) ** 2 - s_up**2)
        down, up = ancestral_sigmas(lv, nx, eta)
        assert math.isclose(float(up), s_up * float(nx.alpha), rel_tol=1e-10, abs_tol=1e-14)
        assert math.isclose(float(down), s_down * float(nx.alpha), rel_tol=1e-10, abs_tol=1e-14)


@pytest.mark.parametrize("process", [VP(), EDM()], ids=["vp", "edm"])
def test_euler_ancestral_limits_are_euler_and_ddpm(process):
    """eta = 0 is Euler (no noise drawn); eta = 1 is DDIM's eta = 1 (DDPM's posterior) noise for noise."""
    den = exact_denoiser(MIX, process)
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = lambda s: s.sample(den, x.clone(), progress=False, generator=torch.Generator().manual_seed(9))  # noqa: E731
    assert torch.allclose(run(EulerAncestral(12, eta=0.0)), run(Euler(12)), atol=1e-12)
    ancestral, ddim = run(EulerAncestral(12, eta=1.0)), run(DDIM(12, "karras", eta=1.0))
    assert torch.allclose(ancestral, ddim, atol=1e-10)
    assert (ancestral - run(Euler(12))).abs().max() > 0.1


def per_sample_setup(sigma_maxes: tuple[float, ...]):
    """Three start points on VP, one Karras grid (8 steps) per sample, and a runner with a fixed seed."""
    process = VP()
    den = exact_denoiser(MIX, process)
    x = process.prior((3, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grids = [Karras(sigma_max=s)(process, 8) for s in sigma_maxes]

    def run(sampler, times, x):
        return sampler.sample(den, x.clone(), times=times, progress=False, generator=torch.Generator().manual_seed(8))

    return x, grids, torch.stack(grids, dim=1), run


def test_euler_ancestral_per_sample_times():
    x, grids, times, run = per_sample_setup((100.0, 10.0, 2.0))
    # eta = 0: each column is its own run
    joint = run(EulerAncestral(eta=0.0), times, x)
    for i in range(3):
        assert torch.allclose(joint[i:i + 1], run(EulerAncestral(eta=0.0), times[:, i], x[i:i + 1]), atol=1e-12)
    # eta = 0.7: equal columns reproduce the shared grid, noise included
    shared = run(EulerAncestral(eta=0.7), grids[0], x)
    columns = run(EulerAncestral(eta=0.7), grids[0][:, None].expand(-1, 3), x)
    assert torch.allclose(columns, shared, atol=1e-12)
    assert torch.isfinite(run(EulerAncestral(eta=0.7), times, x)).all()


# ----- the exact mixture: moments and a two-sample check -------------------------------------------

def mean_distance(x, y=None):
    return torch.pdist(x).mean() if y is None else torch.cdist(x, y).mean()


@pytest.fixture(scope="module")
def energy_check():
    """Energy distance to M exact draws, and a threshold from M-vs-M data draws: mean + 5 sd of 5."""
    data = MIX.sample(M, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    within = mean_distance(data)

    def energy(x):
        x = x[:M].double()
        return float(2 * mean_distance(x, data) - mean_distance(x) - within)

    null = torch.tensor([energy(MIX.sample(M, generator=torch.Generator().manual_seed(100 + i),
                                           dtype=torch.float64)) for i in range(5)])
    return energy, float(null.mean() + 5 * null.std())


def moment_errors(x):
    """|mean error| / SE and |covariance error| / SE (largest entries) against the mixture."""
    x, n = x.double(), x.shape[0]
    mean, cov = MIX.mean(), MIX.covariance()
    var = torch.diagonal(cov)
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    return float(((x.mean(0) - mean).abs() / (var / n).sqrt()).max()), float(((x.T.cov() - cov).abs() / se_cov).max())


def draw(sampler, process, n=N, seed=3):
    return sampler.sample(exact_denoiser(MIX, process), shape=(n, 2), generator=torch.Generator().manual_seed(seed),
                          progress=False)


def test_euler_ancestral_samples_the_mixture(energy_check):
    """200 Karras steps on VP: the moments within 4 standard errors and the energy distance within the
    data-vs-data threshold. Ancestral Euler is first order: at 200 steps its variance is ~2% low (measured
    with 20000 samples), well inside 4 SE; at 30 steps it is 10% low and the energy check fails."""
    energy, threshold = energy_check
    x = draw(EulerAncestral(200), VP())
    z_mean, z_cov = moment_errors(x)
    assert z_mean < 4 and z_cov < 4, (z_mean, z_cov)
    assert energy(x) < threshold, (energy(x), threshold)
    coarse = draw(EulerAncestral(30), VP(), n=M)
    assert energy(coarse) > threshold, (energy(coarse), threshold)


# ----- Restart -------------------------------------------------------------------------------------

RESTART_10 = [{"sigma_min": 0.1, "sigma_max": 2.0, "steps": 6, "repeats": 4}]


def test_restart_samples_the_mixture_where_heun_at_equal_steps_does_not(energy_check):
    """10 main Heun steps on EDM over-disperse this mixture (variance 2.88 vs 2.25, ~13 SE); restarts
    in [0.1, 2] (NFE 67 vs 19) bring the moments within 4 SE and pass the energy check that Heun fails."""
    energy, threshold = energy_check
    restart, heun = draw(Restart(10, restarts=RESTART_10), EDM()), draw(Heun(10), EDM())
    z_restart, z_heun = moment_errors(restart), moment_errors(heun)
    assert max(z_restart) < 4 and z_heun[1] > 8, (z_restart, z_heun)
    assert energy(restart) < threshold < energy(heun) / 5, (energy(restart), threshold, energy(heun))


def test_restart_without_repeats_is_heun():
    process = EDM()
    den = exact_denoiser(MIX, process)
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    heun = Heun(12).sample(den, x.clone(), progress=False)
    for restarts in ([{"sigma_min": 0.1, "sigma_max": 2.0, "steps": 3, "repeats": 0}], []):
        out = Restart(12, restarts=restarts).sample(den, x.clone(), progress=False,
                                                   generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, heun)


def reference_restart(model, x, steps, restart_info, generator, restart_gamma=0.05, s_min=0.01, s_max=1.0,
                      s_noise=1.003, rho=7.0, sigma_min=0.002, sigma_max=80.0):
    """``restart_sampler`` of the reference code (benchmarks/generate_restart.py) with S_churn = 0, where
    its noise draws multiplied by zero (main steps, restart steps outside [S_min, S_max]) are left out;
    model(x, sigma) -> x0. Returns (x, number of model calls)."""
    def karras(s_max, s_min, n):
        ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
        return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho

    t = torch.cat([karras(sigma_max, sigma_min, steps), torch.zeros(1, dtype=torch.float64)])
    restart_list = {int(torch.argmin((t - v[2]).abs())): v for v in restart_info.values()}
    nfe = 0

    def heun(x, t_cur, t_next, second, gamma=0.0):
        nonlocal nfe
        if gamma > 0 and s_min <= t_cur <= s_max:
            t_hat = t_cur + gamma * t_cur
            x, t_cur = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * torch.randn(x.shape, generator=generator,
                                                                                  dtype=x.dtype), t_hat
        d_cur = (x - model(x, t_cur)) / t_cur
        x_next, nfe = x + (t_next - t_cur) * d_cur, nfe + 1
        if second:
            d_prime = (x_next - model(x_next, t_next)) / t_next
            x_next, nfe = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime), nfe + 1
        return x_next

    for i in range(steps):
        x = heun(x, t[i], t[i + 1], i < steps - 1)
        if i + 1 in restart_list:
            n_points, repeats, _, t_max = restart_list[i + 1]
            new_t = karras(t_max, t[i + 1], n_points)
            for _ in range(repeats):
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = x + noise * (new_t[0] ** 2 - new_t[-1] ** 2).sqrt() * s_noise
                for j in range(n_points - 1):
                    x = heun(x, new_t[j], new_t[j + 1], True, restart_gamma)
    return x, nfe


# the paper's ImageNet-64 command in the reference README (36 main steps, S_min 0.01, S_max 1, S_noise
# 1.003, restart_gamma 0.05 by default; NFE 203)
IMAGENET = {"0": [4, 1, 19.35, 40.79], "1": [4, 1, 1.09, 1.92], "2": [4, 5, 0.59, 1.09], "3": [4, 5, 0.30, 0.59],
            "4": [6, 6, 0.06, 0.30]}


@pytest.mark.parametrize("restart_gamma", [0.0, 0.05])
def test_restart_matches_the_reference_code(restart_gamma):
    process = EDM()
    den = exact_denoiser(MIX, process)
    x = 80.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = []

    def model(x, sigma):
        calls.append(1)
        return den(x, sigma)[0]

    theirs, their_nfe = reference_restart(model, x.clone(), 36, IMAGENET, torch.Generator().manual_seed(6),
                                          restart_gamma=restart_gamma)
    calls.clear()
    sampler = Restart(36, restarts=IMAGENET, restart_churn=restart_gamma, s_tmin=0.01, s_tmax=1.0, s_noise=1.003)
    counting = exact_denoiser(MIX, process)
    counting.model = lambda x, t, f=counting.model: calls.append(1) or f(x, t)
    ours = sampler.sample(counting, x.clone(), progress=False, generator=torch.Generator().manual_seed(6))
    assert (ours - theirs).abs().max() < 1e-10
    assert len(calls) == their_nfe == sampler.nfe() == 203


def test_restart_maps_through_alpha():
    """The same restarts on VP (alpha < 1) and on EDM give the same samples: x / alpha is what moves."""
    x_edm = EDM().prior((32, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = Karras(sigma_min=0.002, sigma_max=80.0)
    out = {}
    for process in (EDM(), VP()):
        t0 = grid(process, 12)[0]
        x = x_edm * process.level(t0).alpha
        out[type(process).__name__] = Restart(12, grid, restarts=RESTART_10).sample(
            exact_denoiser(MIX, process), x, progress=False, generator=torch.Generator().manual_seed(6))
    assert (out["VP"] - out["EDM"]).abs().max() < 1e-8


def test_restart_per_sample_times():
    """Per-sample grids snap sigma_min to each sample's own grid point. With s_noise = 0 the restarts
    are deterministic, so the joint run equals separate runs; with noise, equal columns equal the shared grid."""
    x, grids, times, run = per_sample_setup((100.0, 20.0, 5.0))
    small = [{"sigma_min": 0.1, "sigma_max": 2.0, "steps": 2, "repeats": 2}]
    quiet = Restart(8, restarts=small, s_noise=0.0)
    joint = run(quiet, times, x)
    for i in range(3):
        assert torch.allclose(joint[i:i + 1], run(quiet, times[:, i], x[i:i + 1]), atol=1e-12)
    assert (joint - run(Heun(8), times, x)).abs().max() > 1e-3  # the restarts did run
    noisy = Restart(8, restarts=small)
    assert torch.allclose(run(noisy, grids[0][:, None].expand(-1, 3), x), run(noisy, grids[0], x), atol=1e-12)


def test_restart_config_forms_and_errors():
    paper = build("sampler", {"type": "restart", "steps": 18, "restarts": {"0": [3, 2, 0.06, 0.30]}})
    listed = build("sampler", {"type": "restart", "restarts": [{"sigma_min": 0.06, "sigma_max": 0.3, "steps": 2,
                                                                 "repeats": 2}]})
    assert paper.restarts == listed.restarts == Restart().restarts == PAPER_CIFAR10
    assert Restart().nfe() == 43 and Restart().nfe(20) == 47  # 18 steps, NFE 43, as the reference code counts
    assert Restart(restarts=[RestartInterval(0.1, 1.0, steps=3, repeats=4)]).nfe(10) == 19 + 24
    with pytest.raises(ConfigError, match="repeat: unknown key; did you mean 'repeats'"):
        Restart(restarts=[{"sigma_min": 0.1, "sigma_max": 1.0, "repeat": 2}])
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        Restart(restarts=[{"sigma_min": 1.0, "sigma_max": 0.5}])
    with pytest.raises(ConfigError, match="steps >= 1"):
        Restart(restarts={"0": [1, 2, 0.06, 0.3]})  # one grid point is no step
    with pytest.raises(ConfigError, match=r"\[N_restart, K, t_min, t_max\]"):
        Restart(restarts={"0": [3, 2, 0.06]})
    with pytest.raises(ConfigError, match="restarts"):
        build("sampler", {"type": "restart", "restarts": 3})
    with pytest.raises(ValueError, match="eta must be >= 0"):
        EulerAncestral(eta=-1.0)
