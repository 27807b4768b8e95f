"""Objectives and the Denoiser's parameterisations: EDM preconditioning, weightings, targets."""

from __future__ import annotations

import pytest
import torch

from genlab.diffusion import EDM, PREDICTIONS, VP, Denoiser, DenoisingObjective, FlowMatchingObjective, RectifiedFlow
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
