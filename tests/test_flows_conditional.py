"""Conditional flows: couplings, spline couplings, Glow couplings and MADE flows conditioned on class labels
or a context tensor through their conditioner networks; Glow's learned prior on the factored-out half.
Exact inverses and log-determinants against autograd Jacobians with cond, and a class-conditional 2-D flow
that learns two different class densities (exact Gaussian-mixture densities as the oracle)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from genlab.models.flows import (IAF, MAF, ActNorm, AdditiveCoupling, AffineCoupling, FactorOut, Flow, FlowChain,
                                 FlowTransform, GlowCoupling, GlowStep, SplineAutoregressive, SplineCoupling, Squeeze,
                                 Unsqueeze)
from genlab.testing.gaussian_mixture import GaussianMixture

from test_flows import _perturbed, _x

LABELS = torch.tensor([2, 0, 1])


def _ctx(*shape: int) -> torch.Tensor:
    return torch.randn((3, *shape), generator=torch.Generator().manual_seed(5), dtype=torch.float64)


# (make, item shape, cond, another cond)
CASES: dict[str, tuple[Callable[[], FlowTransform], tuple[int, ...], torch.Tensor, torch.Tensor]] = {
    "affine_vec_labels": (lambda: AffineCoupling([4], hidden=8, num_classes=3), (4,), LABELS, LABELS.flip(0)),
    "affine_img_context_image": (lambda: AffineCoupling([2, 4, 4], "checkerboard", 1, hidden=4, context=3),
                                 (2, 4, 4), _ctx(3, 4, 4), -_ctx(3, 4, 4)),
    "additive_img_context_vector": (lambda: AdditiveCoupling([2, 2, 2], "channel", 0, hidden=4, context=2),
                                    (2, 2, 2), _ctx(2), -_ctx(2)),
    "glow_coupling_labels": (lambda: GlowCoupling(3, hidden=4, num_classes=3), (3, 2, 2), LABELS, LABELS.flip(0)),
    "glow_step_context": (lambda: GlowStep(2, hidden=4, context=1), (2, 2, 2), _ctx(1, 2, 2), -_ctx(1, 2, 2)),
    "spline_coupling_labels": (lambda: SplineCoupling(4, bins=5, bound=2.0, hidden=8, num_classes=3), (4,), LABELS,
                               LABELS.flip(0)),
    "spline_coupling_context": (lambda: SplineCoupling(3, bins=4, bound=2.0, hidden=8, parity=1, context=2), (3,),
                                _ctx(2), -_ctx(2)),
    "spline_coupling_kept_spline": (lambda: SplineCoupling(4, bins=5, bound=2.0, hidden=8, num_classes=3,
                                                           kept_spline=True), (4,), LABELS, LABELS.flip(0)),
    "maf_labels": (lambda: MAF(3, hidden=8, num_classes=3), (3,), LABELS, LABELS.flip(0)),
    "iaf_context": (lambda: IAF(3, hidden=8, reverse=True, context=2), (3,), _ctx(2), -_ctx(2)),
    "spline_autoregressive_labels": (lambda: SplineAutoregressive(3, bins=4, bound=2.0, hidden=8, num_classes=3),
                                     (3,), LABELS, LABELS.flip(0)),
    "glow_multiscale_learned_prior": (lambda: FlowChain([
        Squeeze(), GlowStep(4, hidden=4, num_classes=3),
        FactorOut([Squeeze(), GlowStep(8, hidden=4, num_classes=3), Unsqueeze()], prior="learned", channels=4),
        Unsqueeze()]), (1, 4, 4), LABELS, LABELS.flip(0)),
}


@pytest.mark.parametrize("name", CASES)
def test_inverse_and_logdet_with_cond(name: str) -> None:
    make, shape, cond, other = CASES[name]
    t, x = _perturbed(make()), _x(shape)
    z, logdet = t(x, cond)
    x_back, inv_logdet = t.inverse(z, cond)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-10, rtol=0)
    for i in range(len(x)):  # log|det dz/dx| per sample, cond held fixed
        c = cond[i:i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: t(v[None], c)[0].flatten(), x[i])
        jac = jac.reshape(x[i].numel(), x[i].numel())
        assert abs(float(torch.linalg.slogdet(jac).logabsdet - logdet[i].detach())) < 1e-8, name
    z_other, _ = t(x, other)
    assert not torch.allclose(z_other, z), "the conditioner ignores cond"


def test_cond_errors_name_what_is_wanted() -> None:
    with pytest.raises(ValueError, match=r"class labels, a long tensor \[2\] in 0..2"):
        AffineCoupling([2], num_classes=3)(torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"context tensor \[2, 4\] or \[2, 4, 3, 3\]"):
        GlowCoupling(2, context=4)(torch.randn(2, 2, 3, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="not both"):
        SplineCoupling(2, context=2, num_classes=3)
    with pytest.raises(ValueError, match="set the flow's num_classes"):
        Flow([2], [AffineCoupling([2], num_classes=3)])
    with pytest.raises(ValueError, match="prior='learned' needs channels"):
        FactorOut([], prior="learned")
    with pytest.raises(ValueError, match=r"learned prior expects images \[B, 4, H, W\]"):
        FactorOut([], prior="learned", channels=4)(torch.randn(2, 4))


def test_context_flow_base_takes_the_context() -> None:
    """A flow whose transforms take a context tensor gets it as cond; its base stays N(0, I)."""
    flow = _perturbed(Flow([2], [AffineCoupling([2], hidden=4, context=3), MAF(2, hidden=4, context=3)]))
    x, c = _x((2,)), _ctx(3)
    z, logdet = flow(x, c)
    torch.testing.assert_close(flow.log_prob(x, c), -0.5 * z.square().sum(1) - math.log(2 * math.pi) + logdet)


def test_learned_prior_starts_standard_and_follows_temperature() -> None:
    """Zero-initialised, the learned prior is N(0, I) (FactorOut as without it); with weights, temperature 0
    puts the factored-out half at its conditional mean mu(h_2)."""
    inner = [AffineCoupling([2, 2, 2], "checkerboard", 0, hidden=4)]
    plain, learned = FactorOut(inner), FactorOut(inner, prior="learned", channels=4)
    x = _x((4, 2, 2)).float()
    torch.testing.assert_close(learned(x), plain(x))
    flow = _perturbed(Flow([4, 2, 2], [learned]))
    h2 = flow.sample(3, temperature=0.0)[:, 2:]
    mu = flow.chain.transforms[0].prior_net(h2)[:, :2]
    torch.testing.assert_close(flow.sample(3, temperature=0.0)[:, :2], mu)


def _two_classes() -> tuple[GaussianMixture, GaussianMixture]:
    """Class 0: two modes along x; class 1: two modes along y (each has mean 0 and a different shape,
    so a class-conditional Gaussian base alone cannot tell them apart)."""
    cov = 0.05 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    return (GaussianMixture(w, torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64), cov),
            GaussianMixture(w, torch.tensor([[0.0, -1.0], [0.0, 1.0]], dtype=torch.float64), cov))


def test_class_conditional_couplings_learn_two_densities() -> None:
    """Spline couplings conditioned on the labels (base N(0, I): the prior is frozen at zero) reach the exact
    class densities' held-out NLL within 0.25 nats per class, and each class's points are likelier under
    their own label than the other's by more than 2 nats on average."""
    torch.manual_seed(0)
    mixtures = _two_classes()
    flow = Flow([2], [SplineCoupling(2, bins=8, bound=3.0, hidden=32, parity=p % 2, num_classes=2) for p in range(4)],
                num_classes=2)
    flow.prior.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        labels = torch.randint(0, 2, (256,), generator=g)
        x = torch.where(labels[:, None] == 0, *(mix.sample(256, generator=g, dtype=torch.float32) for mix in mixtures))
        loss = -flow.log_prob(x, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for k, mix in enumerate(mixtures):
            x = mix.sample(2000, generator=torch.Generator().manual_seed(10 + k))
            own = torch.full((2000,), k)
            nll = -flow.log_prob(x.float(), own).double().mean()
            true = -mix.log_prob(x).mean()
            assert float(nll - true) < 0.25, (k, float(nll), float(true))
            gap = (flow.log_prob(x.float(), own) - flow.log_prob(x.float(), 1 - own)).mean()
            assert float(gap) > 2.0, (k, float(gap))


def test_conditional_density_integrates_to_one_per_class() -> None:
    """For every label, the class-conditional density (conditioned couplings and base) integrates to 1."""
    flow = _perturbed(Flow([2], [AffineCoupling([2], hidden=8, num_classes=2), ActNorm(2),
                                 SplineCoupling(2, bins=4, bound=3.0, hidden=8, parity=1, num_classes=2),
                                 MAF(2, hidden=8, num_classes=2)], num_classes=2), scale=0.2)
    n, lim = 400, 9.0
    h = 2 * lim / n
    u = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    masses = []
    with torch.no_grad():
        for k in (0, 1):
            masses.append(float(flow.log_prob(grid, torch.full((len(grid),), k)).exp().sum() * h * h))
            assert abs(masses[-1] - 1) < 1e-3, (k, masses)
