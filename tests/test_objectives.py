"""Objectives and the Denoiser's parameterisations: EDM preconditioning, weightings, targets."""

from __future__ import annotations

import pytest
import torch

from genlab.core.registry import build
from genlab.diffusion import EDM, PREDICTIONS, VP, Denoiser, DiscreteVP, RectifiedFlow
from genlab.objectives import DenoisingObjective, FlowMatchingObjective
from genlab.diffusion.predictions import from_x0_eps
from genlab.testing import GaussianMixture

MIX = GaussianMixture.ring(std=0.3)


def consistent_model(process, prediction, x0_hat):
    """A model whose implied x0 is x0_hat(x) for every prediction type (so x0 errors agree)."""

    def model(x, t_in):
        level = process.level(t_in.double() / 1000).to(dtype=x.dtype)  # model_time = 1000 t on VP
        a, s = (v.reshape(-1, 1) for v in (level.alpha, level.sigma))
        x0 = x0_hat(x)
        return from_x0_eps(prediction, x0, (x - a * x0) / s, level)

    return model


@pytest.mark.parametrize("weighting", ["snr", "min_snr", "edm"])
def test_weightings_mean_the_same_under_every_prediction(weighting):
    """A weighting is defined on the x0 error, so the loss is the same whatever the network predicts."""
    process = VP()
    x0 = MIX.sample(256, generator=torch.Generator().manual_seed(0))
    losses = {}
    for p in PREDICTIONS:
        model = consistent_model(process, p, lambda x: 0.7 * x)
        obj = DenoisingObjective(prediction=p, weighting=weighting)
        losses[p] = obj(obj.denoiser(model, process), x0, generator=torch.Generator().manual_seed(1)).item()
    assert all(abs(v - losses["x0"]) < 1e-6 * abs(losses["x0"]) for v in losses.values()), losses


def test_snr_weighting_is_eps_mse_and_constant_is_raw_mse():
    process = VP()
    x0 = MIX.sample(128, generator=torch.Generator().manual_seed(0))
    model = consistent_model(process, "eps", lambda x: 0.5 * x)
    eps_const = DenoisingObjective("eps", weighting="constant")
    eps_snr = DenoisingObjective("eps", weighting="snr")
    a = eps_const(eps_const.denoiser(model, process), x0, generator=torch.Generator().manual_seed(1))
    b = eps_snr(eps_snr.denoiser(model, process), x0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, rtol=1e-6)


def test_min_snr_weights_for_eps_are_min_snr_over_snr():
    """Hang et al. 2023, Eq. 8: for eps prediction the weight is min(SNR, gamma) / SNR."""
    process = VP()
    obj = DenoisingObjective("eps", weighting="min_snr", min_snr_gamma=5.0)
    den = obj.denoiser(lambda x, t: x, process)
    level = process.level(torch.linspace(0.01, 0.99, 50, dtype=torch.float64))
    snr = (level.alpha / level.sigma) ** 2
    weight = obj.x0_weight(level) * den.x0_sensitivity(level) ** 2
    assert torch.allclose(weight, snr.clamp(max=5.0) / snr)


def test_edm_preconditioning_matches_karras_table_1():
    process = EDM()
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    seen = {}

    def F(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.ones_like(x_in)

    den = Denoiser(F, process, preconditioning="edm", sigma_data=0.5)
    x = torch.randn(4, 2, dtype=torch.float64)
    x0, eps = den(x, sigma)
    sd = 0.5
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    assert torch.allclose(seen["x_in"], c_in[:, None] * x)
    assert torch.allclose(seen["c_noise"], sigma.log() / 4)
    assert torch.allclose(x0, c_skip[:, None] * x + c_out[:, None])
    assert torch.allclose(x, x0 + sigma[:, None] * eps)


def test_edm_weighting_makes_the_loss_plain_mse_on_F():
    """lambda(sigma) c_out^2 = 1 (Karras et al. 2022, Eq. 8 with Table 1)."""
    process = EDM()
    obj = DenoisingObjective(preconditioning="edm", t_distribution="log_normal", weighting="edm")
    den = obj.denoiser(lambda x, t: x, process)
    level = process.level(torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64))
    assert torch.allclose(obj.x0_weight(level) * den.x0_sensitivity(level) ** 2, torch.ones(3, dtype=torch.float64))


def test_perfect_model_attains_the_irreducible_loss_only():
    """Training on the mixture: the exact eps gives a lower loss than a perturbed one, and the
    flow-matching target is the path velocity eps - x0 on rectified flow."""
    process = RectifiedFlow()
    x0 = MIX.sample(20000, generator=torch.Generator().manual_seed(0))
    obj = FlowMatchingObjective()

    def exact(x, t_in):
        level = process.level(t_in.double() / 1000).to(dtype=x.dtype)
        x0h, epsh = MIX.x0_eps(x, level.alpha, level.sigma)
        return epsh - x0h

    good = obj(obj.denoiser(exact, process), x0, generator=torch.Generator().manual_seed(1))
    bad = obj(obj.denoiser(lambda x, t: exact(x, t) + 0.1, process), x0, generator=torch.Generator().manual_seed(1))
    assert good < bad and abs((bad - good).item() - 0.01) < 4e-3  # |0.1|^2 offset; the cross term averages out


@pytest.mark.parametrize("process", [VP(), DiscreteVP()], ids=["vp", "ddpm"])
def test_edm_preconditioning_off_alpha_one_matches_a_hand_computation(process):
    """Where alpha != 1, EDM preconditioning acts on Karras' scaled sample x / alpha at s = sigma / alpha:
    the network sees c_in(s) x / alpha and ln(s) / 4, and x0 = c_skip(s) x / alpha + c_out(s) F
    (Karras et al. 2022, Eq. 7 and Table 1), on the plain path, the fast path and the target alike."""
    sd, seen = 0.5, {}

    def F(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.tanh(x_in) + 0.1 * c_noise[:, None]

    den = Denoiser(F, process, preconditioning="edm", sigma_data=sd)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.3, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)):
        ts = torch.as_tensor(t, dtype=torch.float64).expand(3).tolist()
        s = torch.tensor([process.level(v).sigma_edm.item() for v in ts], dtype=torch.float64)[:, None]
        alpha = (1 + s**2).rsqrt()  # variance preserving: alpha^2 + sigma^2 = 1
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        x0, eps = den(x, t)
        assert torch.allclose(seen["x_in"], c_in * x / alpha, rtol=1e-12)
        assert torch.allclose(seen["c_noise"], s[:, 0].log() / 4, rtol=1e-12)
        expected = c_skip * x / alpha + c_out * F(c_in * x / alpha, s[:, 0].log() / 4)
        assert torch.allclose(x0, expected, rtol=1e-12)
        assert torch.allclose(x, alpha * x0 + alpha * s * eps, rtol=1e-12)  # sigma = alpha s
        raw, (a_x0, b_x0, _, _) = den.linear(x, t)
        a_x0, b_x0 = (torch.as_tensor(c, dtype=torch.float64).reshape(-1, 1) for c in (a_x0, b_x0))
        assert torch.allclose(a_x0 * x + b_x0 * raw, expected, rtol=1e-12)
        level = den.level(t, x)
        assert torch.allclose(den.target(expected, eps, x, level), raw, rtol=1e-10)


def test_edm_preconditioning_refuses_a_model_time():
    with pytest.raises(ValueError, match="model_time cannot be used with preconditioning='edm'"):
        Denoiser(lambda x, t: x, VP(), preconditioning="edm", model_time=lambda t: t)


N_DRAWS = 200_000


def test_logit_normal_times_have_the_requested_moments():
    """logit((t - t_min) / (t_max - t_min)) ~ N(mean, std^2) (Esser et al. 2024, Eq. 19)."""
    process, dist = RectifiedFlow(), build("time_distribution", {"type": "logit_normal", "mean": 0.5, "std": 1.3})
    t = dist.sample(process, N_DRAWS, torch.Generator().manual_seed(0))
    u = (t - process.t_min) / (process.t_max - process.t_min)
    z = torch.log(u) - torch.log1p(-u)
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() / 1.3 - 1) < 0.01


@pytest.mark.parametrize("process", [EDM(), VP()], ids=["edm", "vp"])
def test_log_normal_times_have_the_requested_quantiles(process):
    """ln(sigma / alpha) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1); quartiles, which the
    clipping to the process's range (0.2% of draws on VP) does not move."""
    dist = build("time_distribution", {"type": "log_normal", "p_mean": -1.2, "p_std": 1.2})
    log_sigma = process.level(dist.sample(process, N_DRAWS, torch.Generator().manual_seed(0))).sigma_edm.log()
    quartiles = torch.quantile(log_sigma[:100_000], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    expected = torch.tensor([-1.2 - 0.6745 * 1.2, -1.2, -1.2 + 0.6745 * 1.2], dtype=torch.float64)
    assert (quartiles - expected).abs().max() < 0.02, quartiles


def test_uniform_times_cover_the_process_range():
    process = VP()
    t = build("time_distribution", "uniform").sample(process, N_DRAWS, torch.Generator().manual_seed(0))
    assert t.min() >= process.t_min and t.max() <= process.t_max
    assert abs(t.mean().item() - (process.t_min + process.t_max) / 2) < 0.005
