"""Dequantization of discrete data (Ho et al. 2019, Flow++, Sec. 3.1): the bound with the bin-count term is
exact for densities constant on the bins, gives the bits/dim of a known discrete distribution exactly,
stays below the exact log P(x) of a Gaussian (its bins integrated in closed form), and the variational
dequantizer's bound beats the uniform one after a short training; the flow_likelihood objective's
``dequantization`` option and sample levels."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.metrics.likelihood import bits_per_dim, bits_per_dim_of
from genlab.models.flows import ActNorm, AffineCoupling, Flow, Squeeze, Unsqueeze
from genlab.models.flows.dequantization import (UniformDequantization, VariationalDequantization,
                                                dequantized_log_likelihood)
from genlab.objectives import BuildContext, FlowLikelihood

LEVELS = 17  # sklearn's digits: 0..16, as x / 8 - 1 in [-1, 1]
MEAN, STD = 0.02, 0.06  # a Gaussian p of y, varying strongly within a bin of width 2 / 17


def _levels_x(k: torch.Tensor) -> torch.Tensor:
    """Level indices k -> the data's values k / 8 - 1 (17 levels on [-1, 1])."""
    return k.double() / 8 - 1


def _histogram_log_prob(probs: torch.Tensor, deq: UniformDequantization):
    """The density of y constant on every bin: P_k / w on level k's bin (one table per value)."""
    lo, w = deq.data_range[0], math.exp(deq.log_bin_width)

    def log_prob(y: torch.Tensor) -> torch.Tensor:
        k = ((y - lo) / w).floor().long().clamp(0, probs.shape[-1] - 1)
        return (probs.log().expand(*y.shape, -1).gather(-1, k[..., None])[..., 0] - math.log(w)).flatten(1).sum(1)
    return log_prob


def test_uniform_bound_is_exact_for_bin_constant_densities() -> None:
    """A density constant on each bin: the bound equals log P(x) for every draw of u, bin-count term included
    (dropping the -D log(bins / (hi - lo)) term would be off by D log(17 / 2) nats)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, LEVELS, generator=g, dtype=torch.float64), -1)  # per value, independent
    deq = UniformDequantization(LEVELS, (-1.0, 1.0))
    k = torch.randint(0, LEVELS, (64, 3), generator=g)
    exact = probs.log().gather(1, k.T).T.sum(1)
    bound = dequantized_log_likelihood(_histogram_log_prob(probs, deq), deq, _levels_x(k), g)
    torch.testing.assert_close(bound, exact, atol=1e-10, rtol=0)


def test_bits_per_dim_of_uniform_discrete_data() -> None:
    """17 equally likely levels per value: exactly log2(17) bits/dim, through the objective's bound."""
    deq = UniformDequantization(LEVELS, (-1.0, 1.0))
    x = _levels_x(torch.randint(0, LEVELS, (32, 1, 2, 2), generator=torch.Generator().manual_seed(1)))
    log_p = dequantized_log_likelihood(lambda y: torch.full((len(y),), -4 * math.log(2.0), dtype=y.dtype), deq, x)
    torch.testing.assert_close(bits_per_dim(log_p, 4), torch.full((32,), math.log2(LEVELS), dtype=torch.float64))


def _gaussian_flow(dims: int = 2) -> Flow:
    """N(m, s^2 I) as a flow (an actnorm): its bins' probabilities are products of normal CDF differences."""
    flow = Flow([dims], [ActNorm(dims)]).double().eval()
    with torch.no_grad():
        flow.chain.transforms[0].log_scale.fill_(-math.log(STD))  # narrow against a bin of 2 / 17
        flow.chain.transforms[0].bias.fill_(-MEAN / STD)  # off the bins' centres
    return flow


def _gaussian_log_P(x: torch.Tensor, deq: UniformDequantization) -> torch.Tensor:
    """Exact log P(x) of N(MEAN, STD^2 I) integrated over each value's bin."""
    lo, w = deq.data_range[0], math.exp(deq.log_bin_width)
    k = torch.round((x - lo) / 2 * (LEVELS - 1))
    normal = torch.distributions.Normal(torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64))
    a, b = lo + k * w, lo + (k + 1) * w
    return (normal.cdf(b) - normal.cdf(a)).log().sum(1)


def test_uniform_bound_below_exact_log_P_and_equals_bits_per_dim_of() -> None:
    flow, deq = _gaussian_flow(), UniformDequantization(LEVELS, (-1.0, 1.0))
    x = _levels_x(torch.tensor([[8, 8], [9, 7], [8, 9]]))
    g = torch.Generator().manual_seed(2)
    bound = dequantized_log_likelihood(flow.log_prob, deq, x.repeat(4000, 1), g).view(4000, 3).mean(0)
    exact = _gaussian_log_P(x, deq)
    assert bool((bound < exact).all()), (bound, exact)
    assert float((exact - bound).detach().max()) < 2.0  # Jensen's gap of a density that varies within the bins
    # the shared metric helper draws u alike (float64) and gives the same bits/dim
    ours = bits_per_dim(dequantized_log_likelihood(flow.log_prob, deq, x, torch.Generator().manual_seed(3)), 2)
    theirs = bits_per_dim_of(flow, x, bins=LEVELS, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs)


def test_variational_bound_beats_uniform_after_short_training() -> None:
    """With p fixed (a Gaussian narrower than a bin), training q(u | x) alone lifts the average bound above
    the uniform one (measured: by 0.57 nats) and keeps it below the exact log P(x) (a valid bound)."""
    torch.manual_seed(0)
    flow, uni = _gaussian_flow(), UniformDequantization(LEVELS, (-1.0, 1.0))
    var = VariationalDequantization.default((2,), steps=2, hidden=16, bins=LEVELS).double()
    x = _levels_x(torch.tensor([[8, 8], [9, 7], [8, 9], [7, 9]])).repeat(64, 1)
    opt = torch.optim.Adam(var.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    for _ in range(150):
        loss = -dequantized_log_likelihood(flow.log_prob, var, x, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xs = x[:4].repeat(2000, 1)
        v = dequantized_log_likelihood(flow.log_prob, var, xs, g).view(2000, 4).mean(0)
        u = dequantized_log_likelihood(flow.log_prob, uni, xs, g).view(2000, 4).mean(0)
        iw = dequantized_log_likelihood(flow.log_prob, var, xs[:4], g, samples=2000)
    exact = _gaussian_log_P(x[:4], uni)
    assert float(v.mean()) > float(u.mean()) + 0.2, (v, u)  # the data's average bound, what training raises
    assert bool((v < exact).all()), (v, exact)
    # one importance-weighted estimate is random (below log P in expectation): within 0.05 nats of it
    assert float((iw - exact).abs().max()) < 0.05, (iw, exact)
    assert bool((iw >= v - 1e-3).all())  # the importance-weighted bound is the tighter one


def _digit_like(n: int = 8) -> torch.Tensor:
    return _levels_x(torch.randint(0, LEVELS, (n, 1, 4, 4), generator=torch.Generator().manual_seed(5))).float()


def _image_flow() -> Flow:
    return Flow([1, 4, 4], [AffineCoupling([1, 4, 4], hidden=4), Squeeze(), ActNorm(4), Unsqueeze()])


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_objective_dequantization(kind: str) -> None:
    flow, x = _image_flow(), _digit_like()
    obj = FlowLikelihood(dequantization=kind, levels=LEVELS, dequantizer_steps=1, dequantizer_hidden=4)
    obj.build(BuildContext(model=flow, data_shape=(1, 4, 4)))
    assert ("dequantizer" in obj.modules()) == (kind == "variational")
    assert obj.optimizers() == {"model": tuple(obj.modules())}
    loss, logs = obj.loss(obj.modules(), {"x": x}, torch.Generator().manual_seed(0))
    y, log_q = obj.dequantizer(x, torch.Generator().manual_seed(0))
    expected = -(flow.log_prob(y) - log_q + 16 * math.log(2 / LEVELS)).mean() / (16 * math.log(2))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for m in obj.modules().values() for p in m.parameters())
    held = obj.heldout_likelihood(obj.modules(), x, None, torch.Generator().manual_seed(0), batch_size=3)
    assert held["heldout_bits_per_dim"] == pytest.approx(float(loss.detach()), rel=1e-5)
    s = obj.sample(obj.modules(), 5, torch.Generator().manual_seed(0))  # samples on the data's 17 levels
    torch.testing.assert_close(s, _levels_x(torch.round((s.double() + 1) * 8)).float())


def test_objective_refuses_data_off_its_levels() -> None:
    obj = FlowLikelihood(dequantization="uniform", levels=256)
    obj.build(BuildContext(model=_image_flow(), data_shape=(1, 4, 4)))
    with pytest.raises(ValueError, match="not on the 256 levels"):
        obj.loss(obj.modules(), {"x": _digit_like().clamp(-0.5, 0.5) + 0.01}, torch.Generator())
    with pytest.raises(ValueError, match="data_range must be"):
        FlowLikelihood(data_range=(1.0, -1.0))
