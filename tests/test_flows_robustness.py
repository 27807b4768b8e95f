"""Numerical robustness of the flows: the spline coupling at, just inside and just outside its interval
(nflows issue 87: the bound itself, identity tails, no NaN, inverse(forward(x)) = x), training steps
under float16 / bfloat16 autocast on CPU with finite losses and gradients and float32 log-determinants
(glasflow issue 65), and actnorm's data-dependent initialisation from a batch of one."""

from __future__ import annotations

import pytest
import torch

from genlab.models.flows import ActNorm, Flow, GlowStep, SplineCoupling, Squeeze, Unsqueeze, rq_knots, rq_spline
from genlab.objectives import BuildContext, FlowLikelihood

from test_flows import _perturbed

BOUND = 2.0


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).eps
    edge = [BOUND, BOUND * (1 - tiny), BOUND * (1 + tiny), BOUND * (1 + 1e-7), 3 * BOUND, 1e6]
    return torch.tensor(edge + [-v for v in edge] + [0.0], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spline_coupling_at_and_beyond_the_bound(dtype: torch.dtype) -> None:
    """Every changed value at an edge case, the kept ones random: finite everywhere, exact round trip,
    and the identity (log-derivative 0) at and outside +-B."""
    t = _perturbed(SplineCoupling(2, bins=6, bound=BOUND, hidden=8, parity=0), scale=1.0).to(dtype)
    v = _edge_values(dtype)
    x = torch.stack([torch.linspace(-1, 1, len(v), dtype=dtype), v], 1).requires_grad_(True)
    z, logdet = t(x)
    grad, = torch.autograd.grad((z.sum() + logdet.sum()), x)
    assert bool(z.isfinite().all() and logdet.isfinite().all() and grad.isfinite().all())
    outside = v.abs() >= BOUND
    torch.testing.assert_close(z[outside, 1], v[outside], atol=0, rtol=0)
    assert float(logdet[outside].detach().abs().max()) == 0.0
    x_back, inv = t.inverse(z)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(x_back, x.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(inv, -logdet.detach(), atol=tol, rtol=0)


def test_spline_inverse_at_the_knots() -> None:
    """y exactly at the knots y^k (the bin edges of the inverse): x^k back, no NaN."""
    g = torch.Generator().manual_seed(0)
    params = 2 * torch.randn(1, 17, generator=g, dtype=torch.float64)
    xk, yk, _ = rq_knots(params, BOUND)
    x, ladj = rq_spline(yk[0], params.expand(len(yk[0]), -1), BOUND, inverse=True)
    assert bool(ladj.isfinite().all())
    torch.testing.assert_close(x, xk[0], atol=1e-12, rtol=0)


def _glow_flow() -> Flow:
    return Flow([1, 4, 4], [Squeeze(), ActNorm(4), GlowStep(4, hidden=8), GlowStep(4, hidden=8), Unsqueeze()])


def _spline_flow() -> Flow:
    return Flow([2], [SplineCoupling(2, bins=8, bound=3.0, hidden=16, parity=p) for p in (0, 1, 0)])


@pytest.mark.parametrize("make", [_glow_flow, _spline_flow], ids=["glow_step", "spline_coupling"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_steps(make, dtype: torch.dtype) -> None:
    """Three optimizer steps under CPU autocast: finite losses and gradients, float32 log-determinants, and
    the loss within 2% of the float32 loss of the same weights."""
    torch.manual_seed(0)
    flow = make()
    obj = FlowLikelihood(units="nats")
    obj.build(BuildContext(model=flow, data_shape=flow.shape))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn((32, *flow.shape), generator=g)
        with torch.autocast("cpu", dtype=dtype):
            loss, _ = obj.loss({"model": flow}, {"x": x}, g)
            h, logdets = x, []
            for t in flow.chain.transforms:  # every step's log-determinant, half-precision inputs included
                h, logdet = t(h)
                logdets.append(logdet)
        loss.backward()
        assert h.dtype != torch.float32 or make is _spline_flow  # autocast did lower the Glow steps
        assert bool(loss.isfinite()) and all(ld.dtype == torch.float32 for ld in logdets)
        assert all(bool(p.grad.isfinite().all()) for p in flow.parameters() if p.grad is not None)
        with torch.no_grad():
            exact = -flow.log_prob(x).mean()
        assert abs(float(loss.detach()) - float(exact)) < 0.02 * abs(float(exact)), (float(loss), float(exact))
        opt.step()
        opt.zero_grad()


def test_actnorm_init_from_a_batch_of_one() -> None:
    """One vector: no spread to measure, so the scale stays 1 (not 1 / eps) and the input is only centred;
    one image: the statistics over its positions, zero mean and unit variance per channel."""
    norm = ActNorm(3)
    z, logdet = norm(torch.tensor([[1.0, -2.0, 5.0]]))
    assert bool(z.isfinite().all() and logdet.isfinite().all())
    torch.testing.assert_close(norm.log_scale.detach(), torch.zeros(3))
    torch.testing.assert_close(z, torch.zeros(1, 3))
    norm = ActNorm(2).double()
    x = 3 + 2 * torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z, _ = norm(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    flat = ActNorm(1)  # a constant channel: centred, not scaled by 1 / eps
    z, _ = flat(torch.full((4, 1, 2, 2), 0.5))
    assert float(flat.log_scale.detach()) == 0.0 and float(z.detach().abs().max()) == 0.0
