"""Universal guidance named in a config (``guidance: {type: universal, loss: {...}}``, namespace
``guidance_loss``): the built-in masked L2 against its closed-form gradient through the exact denoiser of a
Gaussian, the box mask, the digits-classifier loss, and a run's config / ``genlab sample`` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.adapters.gradient_guidance import UniversalGuidance
from genlab.adapters.guidance_losses import DigitsClassifierLoss, MaskedL2
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.core.registry import build
from genlab.diffusion import VP
from genlab.testing import GaussianMixture, exact_denoiser
from genlab.training import Experiment

DIGITS = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")


def test_masked_l2_guidance_is_its_closed_form_on_a_gaussian() -> None:
    """Data N(mu, c^2 I) under VP: x0_hat(x_t) = mu + k (x_t - alpha mu), k = alpha c^2 / (alpha^2 c^2 + sigma^2),
    so f = -(1/2) |m (x0_hat - v)|^2 has grad_x f = -k m (x0_hat - v), and eps_g = eps - s sigma grad_x f."""
    d, c, s = 6, 0.7, 0.4
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, d, generator=g, dtype=torch.float64)
    gauss = GaussianMixture(torch.ones(1), mu, c**2 * torch.eye(d, dtype=torch.float64)[None])
    denoiser = exact_denoiser(gauss, VP(), "eps")
    mask, target = (torch.arange(d) < 4).double(), torch.randn(d, generator=g, dtype=torch.float64)
    guided = UniversalGuidance(MaskedL2(mask=mask, target=target), scale=s).wrap(denoiser)
    x, t = torch.randn(5, d, generator=g, dtype=torch.float64), torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    level = denoiser.level(t, x)
    alpha, sigma = level.alpha[:, None], level.sigma[:, None]
    k = alpha * c**2 / (alpha**2 * c**2 + sigma**2)
    x0 = mu + k * (x - alpha * mu)
    grad = -k * mask * (x0 - target)
    x0_u, eps_u = denoiser(x, t)
    torch.testing.assert_close(x0_u, x0, rtol=0, atol=1e-10)  # the oracle is the closed form
    x0_g, eps_g = guided(x, t)
    torch.testing.assert_close(eps_g, eps_u - s * sigma * grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(x0_g, x0_u + s * sigma**2 / alpha * grad, rtol=0, atol=1e-10)


def test_the_box_mask_and_bad_boxes() -> None:
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = MaskedL2(value=-1.0, box=(0.0, 0.5, 0.25, 1.0))
    top_right = torch.zeros(4, 4, dtype=torch.float64)
    top_right[:2, 1:] = 1
    torch.testing.assert_close(loss(x0), ((x0 + 1).square() * top_right).sum((1, 2, 3)) / 2)
    x = x0.clone().requires_grad_(True)
    torch.testing.assert_close(torch.autograd.grad(loss(x).sum(), x)[0], top_right * (x0 + 1))
    with pytest.raises(ValueError, match=r"masked_l2: box \[top, bottom, left, right\] must have top < bottom"):
        MaskedL2(box=(0.5, 0.5, 0.0, 1.0))
    with pytest.raises(ConfigError, match="guidance.loss.box"):
        build("guidance", {"type": "universal", "loss": {"type": "masked_l2", "box": [0, 2, 0, 1]}})


def test_digits_classifier_loss_is_minus_the_log_probability() -> None:
    loss = DigitsClassifierLoss(label=None, steps=20)
    loss.build(lambda path: None)
    x0 = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.tensor([3, 7, -1])
    logp = torch.log_softmax(loss.classifier(x0), -1)
    torch.testing.assert_close(loss(x0, class_labels=labels), torch.stack([-logp[0, 3], -logp[1, 7], logp[2, 0] * 0]))
    fixed = DigitsClassifierLoss(label=3, steps=20)
    fixed.classifier = loss.classifier
    torch.testing.assert_close(fixed(x0), -logp[:, 3])
    with pytest.raises(ValueError, match="label must be a digit"):
        DigitsClassifierLoss(label=10)


def test_a_config_names_universal_guidance() -> None:
    exp = Experiment.from_config(load_config(DIGITS, [
        "model.channels=8", "model.norm_groups=4", "guidance.type=universal", "guidance.scale=2",
        "guidance.loss.type=digits_classifier", "guidance.loss.label=3", "guidance.loss.steps=20"]))
    assert isinstance(exp.guidance, UniversalGuidance) and exp.guidance.loss.classifier is not None  # built
    assert repr(exp.guidance) == "UniversalGuidance(scale=2, loss=digits_classifier)"
    with pytest.raises(ConfigError, match="guidance.loss.type"):
        Experiment.from_config(load_config(DIGITS, ["guidance.type=universal", "guidance.loss.type=nope"]))


def test_a_classifier_runs_loss(tmp_path) -> None:
    """Loss ``classifier``: -log p(y | x0) of a noisy_classifier run's classifier at t_min, built from the run."""
    from genlab.adapters.gradient_guidance import noisy_logits
    from genlab.training import Trainer

    config = str(Path(DIGITS).parent / "guidance" / "classifier_digits.yaml")
    tiny = ["model.channels=8", "model.norm_groups=4", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1"]
    with Trainer(Experiment.from_config(load_config(config, tiny)), tmp_path / "clf", progress=False) as t:
        t.fit()
    exp = Experiment.from_config(load_config(DIGITS, [
        "model.channels=8", "model.norm_groups=4", "guidance.type=universal",
        "guidance.loss.type=classifier", f"guidance.loss.run={tmp_path / 'clf'}"]))
    loss = exp.guidance.loss
    x0, labels = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1, torch.tensor([1, 5, -1])
    level = loss.process.level(torch.full((3,), loss.process.t_min))
    logp = torch.log_softmax(noisy_logits(loss.classifier, loss.process, x0, level), -1)
    torch.testing.assert_close(loss(x0, class_labels=labels), torch.stack([-logp[0, 1], -logp[1, 5], logp[2, 0] * 0]))
