"""Reverse-SDE predictors and the predictor-corrector sampler (Song et al. 2021), on the exact
Gaussian-mixture denoiser: sample moments and mean log-density against the mixture's (z-tests with
standard errors from the sample count); step by step against diffusers' ScoreSdeVe / ScoreSdeVp
schedulers; identities (every prediction type, per-sample times, PC without corrector = its predictor).

Why the mean log-density and not an energy-distance permutation test: on this mixture the energy test
with 1000 + 1000 samples did not reject a score scaled by 1.1 or 1.2 (p = 0.15, 0.12), while the
log-density z-test sees a 5% scale error at 10 SE."""

from __future__ import annotations

import functools

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.core.registry import build
from genlab.diffusion import (DDPM, EDM, PREDICTIONS, VE, VP, DiscreteVP, EulerMaruyama, ExplicitGrid, Karras,
                              PredictorCorrector, RectifiedFlow, ReverseDiffusion, SubVP, UniformTime)
from genlab.testing import GaussianMixture, exact_denoiser

# 3 components in 2-D, component stds 0.22-0.7 (not sharp): mean (-1.65, -0.79), cov [[8.72, -1.34], [-1.34, 3.17]]
MIX = GaussianMixture.random(2, 3, generator=torch.Generator().manual_seed(0))
N = 1000  # generated samples per test
STEPS = 250  # at 100 steps the mean log-density shows the O(1/steps) bias of reverse diffusion at 5 SE (n = 2000)
PROCESSES = {"vp": VP(), "ve": VE(), "sub_vp": SubVP()}
SAMPLERS = {
    "euler_maruyama": lambda: EulerMaruyama(STEPS),
    "reverse_diffusion": lambda: ReverseDiffusion(STEPS),
    "ancestral": lambda: PredictorCorrector(STEPS, predictor="ancestral", corrector="none"),
    "pc": lambda: PredictorCorrector(STEPS, predictor="reverse_diffusion", corrector="langevin"),
}


@functools.cache
def reference(sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """Moments of p_t = mixture * N(0, sigma^2 I) from 10^6 exact draws: mean and std of log p_t(x), and the
    std of the product moments (x_i - m_i)(x_j - m_j) [2, 2] (sigma = 0: the data)."""
    gen = torch.Generator().manual_seed(99)
    x = MIX.sample(10**6, generator=gen, dtype=torch.float64) + sigma * torch.randn(10**6, 2, generator=gen,
                                                                                    dtype=torch.float64)
    log_p, centred = MIX.log_prob_t(x, 1.0, sigma), x - MIX.mean()
    products = centred[:, :, None] * centred[:, None, :]
    return {"log_p": log_p.mean(), "log_p_std": log_p.std(), "products_std": products.std(0)}


def log_prob_z(x: torch.Tensor, sigma: float = 0.0) -> float:
    """The two-sample z statistic of the mean log-density: (mean log p_t(x) - E log p_t) / SE, SE = std(log p_t) /
    sqrt(n) = 1.106 / sqrt(n) for the data (0.035 at n = 1000; the reference's own SE is 30x smaller). It sees the
    sharpness of the samples: a score 5% too small gives z = -10 at n = 2000."""
    ref = reference(sigma)
    return ((MIX.log_prob_t(x.double(), 1.0, sigma).mean() - ref["log_p"]) / (ref["log_p_std"] / len(x) ** 0.5)).item()


def moment_z(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|sample mean - mean| and |sample cov - cov| of data samples in units of their standard errors:
    SE(mean_i) = sqrt(cov_ii / n) = (0.093, 0.056) at n = 1000; SE(cov_ij) = std((x_i - m_i)(x_j - m_j)) / sqrt(n)
    = (0.44, 0.17, 0.16) for (11, 12, 22) at n = 1000."""
    n, x = len(x), x.double()
    se_mean, se_cov = (MIX.covariance().diagonal() / n).sqrt(), reference()["products_std"] / n**0.5
    return (x.mean(0) - MIX.mean()).abs() / se_mean, (x.T.cov() - MIX.covariance()).abs() / se_cov


def run(sampler, process, denoiser=None, seed=1, n=N):
    denoiser = denoiser or exact_denoiser(MIX, process)
    return sampler.sample(denoiser, shape=(n, 2), generator=torch.Generator().manual_seed(seed), progress=False)


@pytest.mark.parametrize("pname", PROCESSES)
@pytest.mark.parametrize("sname", SAMPLERS)
def test_samples_match_the_mixture(pname, sname):
    """Mean, covariance and mean log-density of 1000 samples within 4 standard errors of the mixture's."""
    x = run(SAMPLERS[sname](), PROCESSES[pname])
    assert torch.isfinite(x).all()
    z_mean, z_cov = moment_z(x)
    z_log_p = log_prob_z(x)
    assert (z_mean < 4).all() and (z_cov < 4).all() and abs(z_log_p) < 4, (z_mean, z_cov, z_log_p)


OTHER_PROCESSES = {"ddpm": (DiscreteVP(), None), "edm": (EDM(), Karras()),
                   "rectified_flow": (RectifiedFlow(), UniformTime(t_max=0.995))}


@pytest.mark.parametrize("pname", OTHER_PROCESSES)
@pytest.mark.parametrize("make", [EulerMaruyama, ReverseDiffusion, PredictorCorrector], ids=["em", "rd", "pc"])
def test_other_processes(pname, make):
    """The same checks with 500 samples (SEs sqrt(2) times those above) and 200 steps, on the other processes
    and an x0-predicting denoiser: the samplers are written once, for every process."""
    process, grid = OTHER_PROCESSES[pname]
    x = run(make(200, grid), process, denoiser=exact_denoiser(MIX, process, "x0"), n=500)
    z_mean, z_cov = moment_z(x)
    z_log_p = log_prob_z(x)
    assert (z_mean < 4).all() and (z_cov < 4).all() and abs(z_log_p) < 4, (z_mean, z_cov, z_log_p)


class ScaledScore:
    """A wrong denoiser: the exact eps (and so the score) times ``scale``."""

    def __init__(self, process, scale):
        self.inner, self.process, self.scale = exact_denoiser(MIX, process), process, scale

    def __call__(self, x, t, **cond):
        x0, eps = self.inner(x, t, **cond)
        return x0, self.scale * eps


@pytest.mark.parametrize("scale", [0.9, 1.15])
def test_a_wrong_score_scale_fails_the_test(scale):
    """The test can fail: with the score 10% too small or 15% too large the samples are too wide or too sharp."""
    z = log_prob_z(run(ReverseDiffusion(STEPS), VP(), denoiser=ScaledScore(VP(), scale)))
    assert abs(z) > 4 and (z < 0) == (scale < 1), z  # -10.3 and +6.5; a correct sampler is within 2.7


def test_langevin_corrector_keeps_and_reaches_p_t():
    """The corrector alone (Song et al. 2021, Alg. 4 with alpha_i = 1; 150 steps at the VE level sigma = 1)
    keeps exact p_t samples in p_t (z = -0.5) and brings samples started 1.5x too wide (z = -89) into it (-0.7)."""
    process, sigma = VE(), 1.0
    level = process.level(process.t_of_sigma_edm(torch.tensor(sigma)))
    gen = torch.Generator().manual_seed(7)

    def p_t(n):
        return MIX.sample(n, generator=gen, dtype=torch.float64) + sigma * torch.randn(n, 2, generator=gen,
                                                                                       dtype=torch.float64)

    pc, den = PredictorCorrector(n_corrector_steps=150), exact_denoiser(MIX, process)
    wide = 1.5 * p_t(N)
    assert log_prob_z(wide, sigma) < -20
    for start in (p_t(N), wide):
        z = log_prob_z(pc.correct(pc.context(den, 1, gen), start, level, level), sigma)
        assert abs(z) < 4, z


@pytest.mark.parametrize("pname", PROCESSES)
@pytest.mark.parametrize("make", [lambda: PredictorCorrector(20), lambda: EulerMaruyama(20)], ids=["pc", "em"])
def test_every_prediction_type_gives_the_same_samples(pname, make):
    process = PROCESSES[pname]
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = {p: make().sample(exact_denoiser(MIX, process, p), x.clone(), generator=torch.Generator().manual_seed(3),
                             progress=False) for p in PREDICTIONS}
    for p, out in outs.items():
        assert (out - outs["eps"]).abs().max().item() < 1e-8, p


@pytest.mark.parametrize("make, independent_rows", [
    (lambda: PredictorCorrector(12), False), (lambda: PredictorCorrector(12, predictor="ancestral"), False),
    (lambda: EulerMaruyama(12), True), (lambda: ReverseDiffusion(12), True)], ids=["pc", "pc_ddpm", "em", "rd"])
def test_per_sample_times(make, independent_rows):
    """Times [N + 1, B] equal to the shared grid give the shared-grid samples (tensor vs float path); for the
    predictors alone (no batch-coupled Langevin step size) rows with another grid do not change the others."""
    process, b = VP(), 16
    den = exact_denoiser(MIX, process)
    x = process.prior((b, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = UniformTime()(process, 12)

    def sample(times):
        return make().sample(den, x.clone(), times=times, progress=False, generator=torch.Generator().manual_seed(3))

    shared = sample(grid)
    assert torch.allclose(sample(grid[:, None].expand(-1, b)), shared, atol=1e-10)
    if independent_rows:
        mixed = grid[:, None].repeat(1, b)
        mixed[1:-1, b // 2:] = UniformTime(t_max=0.9)(process, 12)[1:-1, None]
        out = sample(mixed)
        assert torch.allclose(out[: b // 2], shared[: b // 2], atol=1e-10)
        assert not torch.allclose(out[b // 2:], shared[b // 2:], atol=1e-3)


def test_pc_without_corrector_is_its_predictor_and_ancestral_is_ddpm():
    process = VE()
    den = exact_denoiser(MIX, process)
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def sample(s):
        return s.sample(den, x.clone(), generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(sample(PredictorCorrector(20, corrector="none")), sample(ReverseDiffusion(20)))
    ancestral = PredictorCorrector(20, predictor="ancestral", corrector="none")
    assert torch.equal(sample(ancestral), sample(DDPM(20, "uniform")))


def test_last_step_is_noise_free():
    """Into t = 0 the output is the denoiser's x0 (Tweedie's formula); into a last grid point t > 0 it is
    the step's mean (Song's denoise=True): the generator no longer matters there."""
    process = VP()
    den = exact_denoiser(MIX, process)
    for sampler in (EulerMaruyama(10), ReverseDiffusion(10), PredictorCorrector(10)):
        seen = []
        sampler.sample(den, shape=(32, 2), generator=torch.Generator().manual_seed(0), progress=False,
                       callback=seen.append)
        assert torch.equal(seen[-1].x, seen[-1].denoised)
    x = process.prior((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler in (EulerMaruyama(), ReverseDiffusion()):
        def sample(times, seed):
            return sampler.sample(den, x.clone(), times=torch.tensor(times), progress=False,
                                  generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample([0.2, 0.1], 1), sample([0.2, 0.1], 2))  # one step: the last, no noise
        assert not torch.allclose(sample([0.3, 0.2, 0.1], 1), sample([0.3, 0.2, 0.1], 2))  # noise before it


def test_config_nfe_and_errors():
    pc = build("sampler", {"type": "pc", "predictor": {"type": "euler_maruyama"}, "n_corrector_steps": 2, "steps": 10})
    assert isinstance(pc.predictor, EulerMaruyama) and pc.nfe_per_step == 3 and pc.snr == 0.16
    assert isinstance(build("sampler", {"type": "pc", "predictor": "ancestral"}).predictor, DDPM)
    assert build("sampler", {"type": "pc", "corrector": "none"}).nfe_per_step == 1
    assert isinstance(build("sampler", "reverse_diffusion"), ReverseDiffusion)
    with pytest.raises(ValueError, match="unknown corrector 'langevine'; expected 'langevin' or 'none'"):
        PredictorCorrector(corrector="langevine")
    with pytest.raises(ConfigError, match="sampler.corrector: expected one of 'langevin', 'none'"):
        build("sampler", {"type": "pc", "corrector": "ald"})
    with pytest.raises(ConfigError, match="unknown sampler 'reverse_difusion'.*did you mean 'reverse_diffusion'"):
        PredictorCorrector(predictor="reverse_difusion")
    with pytest.raises(ValueError, match="PredictorCorrector: snr must be > 0, got 0.0"):
        PredictorCorrector(snr=0.0)
    process = RectifiedFlow()
    with pytest.raises(ValueError, match="euler_maruyama: the SDE drift .* infinite"):
        run(EulerMaruyama(5), process, exact_denoiser(MIX, process, "velocity"), n=4)
    x = run(EulerMaruyama(50, UniformTime(t_max=0.995)), process, exact_denoiser(MIX, process, "velocity"), n=64)
    assert torch.isfinite(x).all()


def test_pc_matches_diffusers_score_sde_ve_step_by_step():
    """PC (reverse diffusion + Langevin) on VE against diffusers' ScoreSdeVeScheduler in the loop of its
    ScoreSdeVePipeline (corrector, then step_pred; the sample mean at the end), in float32 because
    diffusers draws the corrector's noise in float32. The model gets the discrete sigma of step_pred in
    the corrector too (the pipeline gives it the continuous one, 1e-4 apart)."""
    ScoreSdeVeScheduler = pytest.importorskip("diffusers").ScoreSdeVeScheduler

    steps, sigma_min, sigma_max = 20, 0.01, 50.0
    process = VE(sigma_min, sigma_max)
    sched = ScoreSdeVeScheduler(snr=0.16, sigma_min=sigma_min, sigma_max=sigma_max, correct_steps=1)
    sched.set_timesteps(steps)
    sched.set_sigmas(steps)
    x = sigma_max * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    gen, sample, theirs = torch.Generator().manual_seed(1), x.clone(), []
    for t in sched.timesteps:
        sigma = sched.discrete_sigmas[(t * (steps - 1)).long()].expand(len(x))
        sample = sched.step_correct(MIX.score(sample, 1.0, sigma), sample, generator=gen).prev_sample
        out = sched.step_pred(MIX.score(sample, 1.0, sigma), t, sample, generator=gen)
        sample = out.prev_sample
        theirs.append(out.prev_sample_mean if len(theirs) == steps - 1 else sample)

    times = torch.cat([torch.linspace(1, 0, steps, dtype=torch.float64)[:-1], torch.tensor([1e-30, 0.0])])
    ours = []
    PredictorCorrector(steps, ExplicitGrid(times.tolist())).sample(
        exact_denoiser(MIX, process, "score"), x.clone(), generator=torch.Generator().manual_seed(1), progress=False,
        callback=lambda info: ours.append(info.x))
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = ((a - b).abs() / (1 + b.abs())).max().item()
        assert err < 1e-4, f"step {i}: max relative |genlab - diffusers| = {err:.2e}"


def test_euler_maruyama_matches_diffusers_score_sde_vp_step_by_step():
    """Euler-Maruyama on VP against diffusers' (deprecated) ScoreSdeVpScheduler in float64, on its grid
    linspace(1, 1/N, N) (its dt is -1/N) with an eps model; all steps but our Tweedie one into t = 0."""
    ScoreSdeVpScheduler = pytest.importorskip("diffusers.schedulers.deprecated.scheduling_sde_vp").ScoreSdeVpScheduler

    steps, process = 25, VP()
    sched = ScoreSdeVpScheduler(beta_min=0.1, beta_max=20.0, sampling_eps=1 / steps)
    sched.set_timesteps(steps)
    times = torch.cat([torch.linspace(1, 1 / steps, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    gen, sample, theirs = torch.Generator().manual_seed(1), x.clone(), []
    for t in times[:-1]:
        level = process.level(t)
        sample, _ = sched.step_pred(MIX.eps(sample, level.alpha, level.sigma), sample, t.reshape(1), generator=gen)
        theirs.append(sample)
    ours = []
    EulerMaruyama(steps, ExplicitGrid(times.tolist())).sample(
        exact_denoiser(MIX, process), x.clone(), generator=torch.Generator().manual_seed(1), progress=False,
        callback=lambda info: ours.append(info.x))
    for i, (a, b) in enumerate(zip(ours[:-1], theirs[:-1])):
        err = (a - b).abs().max().item()
        assert err < 1e-12, f"step {i}: max |genlab - diffusers| = {err:.2e}"
