"""Processes: diffusers' tables, closed forms, inverses, derivatives and SDE coefficients."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.diffusion import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow, SubVP
from genlab.diffusion.grids import DDPMGrid, Karras, UniformLogSNR, UniformTime

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("schedule, theirs, b0, b1", [("linear", "linear", 1e-4, 0.02),
                                                      ("scaled_linear", "scaled_linear", 0.00085, 0.012),
                                                      ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_discrete_table_matches_diffusers(schedule, theirs, b0, b1, zero_snr):
    ref = diffusers.DDPMScheduler(beta_schedule=theirs, beta_start=b0, beta_end=b1, rescale_betas_zero_snr=zero_snr)
    ours = VP(schedule, b0, b1, zero_terminal_snr=zero_snr).discrete(1000)
    expected = ref.alphas_cumprod.double()
    if zero_snr:
        expected[-1] = 2.0**-24  # diffusers' samplers raise the exact zero to this floor too
    assert (ours.alphas_cumprod - expected).abs().max().item() < 1e-6
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    assert torch.allclose(ours.level(t).alpha ** 2, ours.alphas_cumprod, atol=1e-14)


PROCESSES = [VP(), VP("cosine"), VP("sigmoid"), VP("scaled_linear", 0.00085, 0.012), SubVP(), DiscreteVP(),
             VE(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_log_snr_inverse_and_clean_data_at_zero(process):
    t = torch.linspace(process.t_min, process.t_max * 0.99, 50, dtype=torch.float64)
    assert torch.allclose(process.t_of_log_snr(process.log_snr(t)), t, atol=1e-9, rtol=1e-9)
    zero = process.level(torch.zeros((), dtype=torch.float64))
    assert zero.alpha.item() == pytest.approx(1.0) and zero.sigma.item() == 0.0
    assert (process.log_snr(t).diff() < 0).all()  # noise increases with t


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_derivatives_match_finite_differences(process):
    t = torch.linspace(process.t_min + 1e-3, process.t_max * 0.98, 40, dtype=torch.float64)
    t = t + 0.37 / 1000 if isinstance(process, DiscreteVP) else t  # stay off the table's knots
    h = 1e-6 * max(1.0, process.t_max)
    lv = process.level(t)
    fd_alpha = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    fd_sigma = (process.sigma(t + h) - process.sigma(t - h)) / (2 * h)
    assert torch.allclose(lv.d_alpha, fd_alpha, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lv.d_sigma, fd_sigma, rtol=1e-5, atol=1e-6)


def test_sde_coefficients_closed_forms():
    t = torch.linspace(0.01, 1, 20, dtype=torch.float64)
    beta = 0.1 + t * (20 - 0.1)  # score_sde's VP: beta_min 0.1, beta_max 20
    f, g2 = VP().sde(t)
    assert torch.allclose(f, -beta / 2) and torch.allclose(g2, beta)
    f, g2 = SubVP().sde(t)
    integral = 0.1 * t + 0.5 * (20 - 0.1) * t**2
    assert torch.allclose(g2, beta * (1 - torch.exp(-2 * integral)))
    ve = VE(0.01, 50.0)
    f, g2 = ve.sde(t)
    sigma = 0.01 * (50 / 0.01) ** t
    assert torch.allclose(f, torch.zeros_like(t)) and torch.allclose(g2, 2 * sigma**2 * math.log(50 / 0.01))


def test_grids():
    vp = VP()
    g = UniformLogSNR()(vp, 10)
    lam = vp.log_snr(g[:-1])
    assert len(g) == 11 and g[-1] == 0 and torch.allclose(lam.diff(), lam.diff()[0].expand(9))
    sig = EDM().level(Karras()(EDM(), 5)[:-1]).sigma_edm
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. Eq. 5
    assert torch.allclose(sig, expected)
    u = UniformTime(final="min")(RectifiedFlow(), 4)
    assert torch.allclose(u, torch.linspace(1, 1e-3, 5, dtype=torch.float64))
    ref = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(7)
    ours = DDPMGrid("leading", offset=1)(DiscreteVP(), 7)
    assert torch.allclose(ours[:-1] * 1000 - 1, ref.timesteps.double())


def test_prior_matches_diffusers_init_noise():
    """x_T's std is sqrt(alpha^2 + sigma^2): diffusers' init_noise_sigma * alpha for the same table
    (diffusers uses sqrt(1 + sigma_max^2) with "leading" spacing, and sigma_max with the others)."""
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing="leading")
    sched.set_timesteps(10)
    process = DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist())
    alpha_max = process.level((sched.timesteps[0].double() + 1) / 1000).alpha.item()
    assert process.prior_std() == pytest.approx(float(sched.init_noise_sigma) * alpha_max, rel=1e-6)


@pytest.mark.parametrize("process", [VP("linear"), VP("cosine"), SubVP("linear"), SubVP("cosine"),
                                     VP("linear", beta_start=1e-3, beta_end=0.03)], ids=repr)
def test_closed_form_t_of_log_snr_equals_bisection(process):
    t = torch.linspace(0.001, 0.99, 300, dtype=torch.float64)  # the cosine schedule is floored above ~0.995
    lam = process.log_snr(t)
    closed, bisected = process.t_of_log_snr(lam), Process.t_of_log_snr(process, lam)
    assert torch.allclose(closed, bisected, atol=1e-12)
    assert torch.allclose(closed, t, atol=1e-12)


def test_log_snr_grid_ends_in_karras_sigma():
    process = DiscreteVP()
    times = UniformLogSNR(sigma_min=0.03, sigma_max=40.0)(process, 5)
    sigmas = process.level(times).sigma_edm
    assert torch.allclose(sigmas[[0, -2]], torch.tensor([40.0, 0.03], dtype=torch.float64), rtol=1e-9)
    assert sigmas[-1] == 0 and torch.allclose(process.level(times[:-1]).log_snr.diff().diff(),
                                              torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert float(UniformLogSNR(sigma_max=1e5)(EDM(), 3)[0]) == pytest.approx(EDM().t_max)  # beyond the range: t_max


def test_uniform_grid_with_time_shift():
    """SD3's shift t -> s t / (1 + (s - 1) t) on [0, t_max]: ends kept, s = 1 the plain grid, s < 1
    denser near the data; on a process with t_max = 80 (EDM) it acts on t / t_max."""
    rf = RectifiedFlow()
    assert torch.equal(UniformTime(shift=1.0, final="min", t_min=0.0)(rf, 4), UniformTime(final="min", t_min=0.0)(rf, 4))
    times = UniformTime(shift=0.5, final="min", t_min=0.0)(rf, 4)
    expected = torch.tensor([1.0, 0.6, 1 / 3, 1 / 7, 0.0], dtype=torch.float64)  # 0.5 u / (1 - 0.5 u), u = 1, .75, ...
    assert torch.allclose(times, expected, atol=1e-12)
    wide = EDM()
    u = UniformTime(final="min", t_min=0.0)(wide, 4) / wide.t_max
    shifted = UniformTime(shift=3.0, final="min", t_min=0.0)(wide, 4)
    assert torch.allclose(shifted, wide.t_max * 3 * u / (1 + 2 * u), atol=1e-12)
    with pytest.raises(ValueError, match="shift"):
        UniformTime(shift=0.0)


def test_log_snr_grid_with_snr_shift():
    """snr_shift = s: uniform in log(SNR + s), exact ends, wider steps above sigma ~ s^-1/2, the first
    one shrinking with more steps (no truncated start); s = 0 is the plain log-SNR grid."""
    process = DiscreteVP()
    assert torch.equal(UniformLogSNR(snr_shift=0.0)(process, 12), UniformLogSNR()(process, 12))
    times = UniformLogSNR(snr_shift=0.03, sigma_min=0.045)(process, 12)
    lam = process.level(times[:-1]).log_snr
    u = torch.log(lam.exp() + 0.03)
    assert torch.allclose(u.diff(), u.diff()[0].expand(11), rtol=1e-9)
    assert times[0] == process.t_max and times[-1] == 0
    assert float(process.level(times[-2]).sigma_edm) == pytest.approx(0.045, rel=1e-9)
    steps = lam.diff()
    assert steps[0] > 3 * steps[-1] > 0  # the first step, from sigma 157, is the widest in log-SNR
    jumps = []  # the first step's change in SNR (the scale on which x0_hat moves at high noise)
    for n in (50, 400):
        snr = process.level(UniformLogSNR(snr_shift=0.03)(process, n)[:2]).log_snr.exp()
        jumps.append(float(snr[1] - snr[0]))
    assert jumps[0] / jumps[1] > 7, jumps  # shrinks like 1 / n (8 for 8x the steps): no fixed first step
    with pytest.raises(ValueError, match="UniformLogSNR: snr_shift must be >= 0, got -1"):
        UniformLogSNR(snr_shift=-1)
