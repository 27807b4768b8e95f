"""Peers as oracles for genlab's flows: the rational-quadratic spline equals zuko's
``MonotonicRQSTransform`` (same unconstrained parameters), and a Glow step (actnorm, 1x1 conv, coupling)
equals normflows' ``GlowBlock`` with the weights copied over."""

from __future__ import annotations

import pytest
import torch

from genlab.models.flows import GlowStep, rq_spline

from test_flows import _perturbed, _spline_params, _x


def test_spline_equals_zuko() -> None:
    zuko = pytest.importorskip("zuko")
    bound, n = 3.0, 2000
    w, h, d = _spline_params(n, 7)
    x = torch.linspace(-1.3 * bound, 1.3 * bound, n, dtype=torch.float64)
    ref = zuko.transforms.MonotonicRQSTransform(w, h, d, bound=bound)
    y_ref, ladj_ref = ref.call_and_ladj(x)
    y, ladj = rq_spline(x, torch.cat([w, h, d], -1), bound)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-6, rtol=0)
    x_inv, inv_ladj = rq_spline(y_ref, torch.cat([w, h, d], -1), bound, inverse=True)
    torch.testing.assert_close(x_inv, ref.inv(y_ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(inv_ladj, -ladj_ref, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated")  # inside normflows' Invertible1x1Conv
@pytest.mark.parametrize("kind", ["affine", "additive"])
def test_glow_step_equals_normflows(kind: str) -> None:
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    ours = _perturbed(GlowStep(4, hidden=8, coupling=kind))
    ref = nf.flows.GlowBlock(4, 8, scale=kind == "affine", scale_map="sigmoid", split_mode="channel", leaky=0.0,
                             init_zeros=True, use_lu=True).double()
    coupling, conv, actnorm = ref.flows  # normflows runs z -> x; its inverse is actnorm, conv, coupling
    ours_norm, ours_conv, ours_coupling = ours.transforms
    with torch.no_grad():
        # actnorm: ours y = exp(l) x + b; normflows' inverse (x - t) exp(-s): s = -l, t = -b exp(-l)
        actnorm.s.copy_(-ours_norm.log_scale.view(1, -1, 1, 1))
        actnorm.t.copy_(-(ours_norm.bias * (-ours_norm.log_scale).exp()).view(1, -1, 1, 1))
        actnorm.data_dep_init_done = torch.tensor(1.0)
        for name in ("P", "L", "U"):
            getattr(conv, name).copy_(getattr(ours_conv, name))
        conv.log_S.copy_(ours_conv.log_s)
        conv.sign_S.copy_(ours_conv.sign_s)
        # coupling: ours (x_b + t) s (or x_b + t), normflows' inverse (x_b - t) s (or x_b - t): the shift
        # outputs (every other one; all of them for the additive coupling) change sign
        layers = [m for m in ours_coupling.net.net if isinstance(m, torch.nn.Conv2d)]
        ref_layers = [m for m in coupling.flows[1].param_map.net if isinstance(m, torch.nn.Conv2d)]
        sign = torch.ones(layers[-1].out_channels, dtype=torch.float64)
        sign[0::2 if kind == "affine" else 1] = -1
        for mine, theirs in zip(layers, ref_layers):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        ref_layers[-1].weight.mul_(sign.view(-1, 1, 1, 1))
        ref_layers[-1].bias.mul_(sign)
    x = _x((4, 3, 3))
    z, logdet = ours(x)
    z_ref, logdet_ref = ref.inverse(x)
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-10, rtol=0)
    x_ref, inv_ref = ref(z)
    torch.testing.assert_close(ours.inverse(z)[0], x_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.inverse(z)[1], inv_ref, atol=1e-10, rtol=0)
