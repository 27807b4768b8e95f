"""Flow-matching paths (genlab.objectives.paths) against torchcfm as the oracle.

Time mapping: genlab's t = 0 is the data (x1), t = 1 the source (x0); torchcfm's tau = 0 is the source
and tau = 1 the data. For the same x0, x1, eps: x_t(genlab, t) = xt(torchcfm, tau = 1 - t) and
u_t(genlab) = -u_tau(torchcfm), since d/dt = -d/dtau. ``TAU = 1 - T`` below is that mapping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher,
                                                SchrodingerBridgeConditionalFlowMatcher,
                                                VariancePreservingConditionalFlowMatcher)

from genlab.core.errors import ConfigError
from genlab.core.registry import build, registered
from genlab.diffusion import RectifiedFlow
from genlab.objectives.couplings import ExactOT, Sinkhorn, plan
from genlab.objectives.paths import CondOT, SchrodingerBridge, VariancePreserving
from genlab.testing.devices import DeviceAudit, generator_on

B = 64


def inputs(shape: tuple[int, ...], seed: int = 0, dtype=torch.float64):
    """Source x0, data x1 [B, *shape], genlab times t [B] in [0.02, 0.98] and noise eps."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *shape, generator=g, dtype=dtype)
    x1 = 2 + 0.5 * torch.randn(B, *shape, generator=g, dtype=dtype)
    t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
    return x0, x1, t, torch.randn(B, *shape, generator=g, dtype=dtype)


def torchcfm_time(t: torch.Tensor) -> torch.Tensor:
    """tau = 1 - t: torchcfm's time (0: source, 1: data) of genlab's t (0: data, 1: source)."""
    return 1 - t


SHAPES = [(2,), (10,), (1, 4, 4)]
CASES = [  # (genlab path, torchcfm matcher)
    (CondOT(0.0), ConditionalFlowMatcher(0.0)),
    (CondOT(0.3), ConditionalFlowMatcher(0.3)),
    (VariancePreserving(0.0), VariancePreservingConditionalFlowMatcher(0.0)),
    (VariancePreserving(0.2), VariancePreservingConditionalFlowMatcher(0.2)),
    (SchrodingerBridge(1.0), SchrodingerBridgeConditionalFlowMatcher(1.0)),
    (SchrodingerBridge(0.5), SchrodingerBridgeConditionalFlowMatcher(0.5)),
]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("path,matcher", CASES, ids=lambda v: repr(v))
def test_path_equals_torchcfm(path, matcher, shape):
    x0, x1, t, eps = inputs(shape)
    tau = torchcfm_time(t)
    xt = matcher.sample_xt(x0, x1, tau, eps)
    ut = matcher.compute_conditional_flow(x0, x1, tau, xt)
    ours = path.sample(x0, x1, t, eps)
    assert close(ours.x_t, xt) and close(ours.velocity, -ut)
    assert ours.eps is eps


@pytest.mark.parametrize("path,matcher", CASES, ids=lambda v: repr(v))
def test_path_equals_torchcfm_sample_location_and_conditional_flow(path, matcher):
    """torchcfm's public entry point (its noise from torch's global RNG, returned and handed to genlab)."""
    x0, x1, t, _ = inputs((1, 4, 4), seed=1)
    torch.manual_seed(0)
    # SB-CFM's own method re-pairs by its OT plan first (tested below): here its path alone, through the
    # base class's method (which calls SB-CFM's compute_sigma_t and compute_conditional_flow)
    tau, xt, ut, eps = ConditionalFlowMatcher.sample_location_and_conditional_flow(
        matcher, x0, x1, torchcfm_time(t), return_noise=True)
    ours = path.sample(x0, x1, t, eps)
    assert close(ours.x_t, xt) and close(ours.velocity, -ut)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_ot_cfm_equals_torchcfm_exact_ot_matcher(sigma):
    """ExactOptimalTransportConditionalFlowMatcher: its plan (POT's emd) equals genlab's exact_ot plan;
    replaying its pairs (numpy's global RNG, seeded) through genlab's path gives its x_t and u_t."""
    x0, x1, t, _ = inputs((2,), seed=2)
    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma)
    ours_plan = plan(x0, x1, ExactOT()).numpy()
    assert np.array_equal(matcher.ot_sampler.get_map(x0, x1), ours_plan)  # 1/64 is exact in binary
    np.random.seed(3), torch.manual_seed(4)
    _, xt, ut, eps = matcher.sample_location_and_conditional_flow(x0, x1, torchcfm_time(t), return_noise=True)
    np.random.seed(3)
    p = ours_plan.flatten() / ours_plan.sum()
    i, j = np.divmod(np.random.choice(B * B, p=p, size=B), B)  # torchcfm's draw (OTPlanSampler.sample_map)
    ours = CondOT(sigma).sample(x0[i], x1[j], t, eps)
    assert close(ours.x_t, xt) and close(ours.velocity, -ut)
    # genlab's own pairs (no replacement) have the plan's cost: B <P, M>
    pairs = ExactOT().pair(x0, x1)
    m = (torch.cdist(x0, x1) ** 2).numpy()
    assert abs((pairs.x0 - pairs.x1).square().sum().item() - B * (ours_plan * m).sum()) < 1e-9


@pytest.mark.parametrize("ot_method", ["exact", "sinkhorn"])
def test_sb_cfm_equals_torchcfm_schrodinger_bridge_matcher(ot_method):
    """SB-CFM: torchcfm's plan (POT's emd, or ot.sinkhorn with reg = 2 sigma^2) equals genlab's exact_ot /
    sinkhorn(reg = 2 sigma^2) plan, and its x_t and u_t given the pairs equal the schrodinger_bridge path's."""
    sigma = 1.0
    x0, x1, t, _ = inputs((2,), seed=3)
    x1 = x1 / 2  # costs of a few units: ot.sinkhorn (not log-domain) converges within its 1000 iterations
    matcher = SchrodingerBridgeConditionalFlowMatcher(sigma, ot_method=ot_method)
    coupling = ExactOT() if ot_method == "exact" else Sinkhorn(reg=2 * sigma**2, tolerance=1e-12)
    theirs_plan = matcher.ot_sampler.get_map(x0, x1)
    ours_plan = plan(x0, x1, coupling).numpy()
    np.testing.assert_allclose(ours_plan, theirs_plan, rtol=1e-6, atol=1e-12)
    np.random.seed(5), torch.manual_seed(6)
    _, xt, ut, eps = matcher.sample_location_and_conditional_flow(x0, x1, torchcfm_time(t), return_noise=True)
    np.random.seed(5)
    p = theirs_plan.flatten() / theirs_plan.sum()
    i, j = np.divmod(np.random.choice(B * B, p=p, size=B), B)
    ours = SchrodingerBridge(sigma).sample(x0[i], x1[j], t, eps)
    assert close(ours.x_t, xt) and close(ours.velocity, -ut)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_sb_score_and_lambda_equal_torchcfm(sigma):
    x0, x1, t, eps = inputs((1, 4, 4), seed=4)
    tau = torchcfm_time(t)
    matcher = SchrodingerBridgeConditionalFlowMatcher(sigma)
    path = SchrodingerBridge(sigma)
    xt = path.sample(x0, x1, t, eps).x_t
    mu, s = matcher.compute_mu_t(x0, x1, tau), matcher.compute_sigma_t(tau)
    score = path.score(t, eps)
    assert close(score, -(xt - mu) / s.reshape(-1, 1, 1, 1) ** 2)  # grad log N(xt; mu_t, s_t^2 I)
    mean, std = path.mean_std(x0, x1, t)
    assert close(mean, mu) and close(std, s)
    weight = path.score_weight(t)
    assert close(weight, matcher.compute_lambda(tau))  # lambda is symmetric in t <-> 1 - t
    # torchcfm's SF2M score loss |lambda s + eps|^2 vanishes at s = (sigma^2 / 2) score
    assert close(weight.reshape(-1, 1, 1, 1) * (sigma**2 / 2) * score, -eps)


@pytest.mark.parametrize("path", [CondOT(0.0), CondOT(0.3), VariancePreserving(0.0), VariancePreserving(0.2),
                                  SchrodingerBridge(1.0), SchrodingerBridge(0.3)], ids=repr)
def test_velocity_is_the_time_derivative_of_x_t_and_the_ends_are_data_and_source(path):
    """u_t = d x_t / dt in genlab's time, by central differences (independently of torchcfm); x_t is the
    data at t = 0 and the source at t = 1, where the path's noise vanishes."""
    x0, x1, t, eps = inputs((3,), seed=5)
    h = 1e-6
    finite = (path.sample(x0, x1, t + h, eps).x_t - path.sample(x0, x1, t - h, eps).x_t) / (2 * h)
    assert close(path.sample(x0, x1, t, eps).velocity, finite, 1e-7)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    pair = path.sample(x0[:2], x1[:2], ends, eps[:2]).x_t
    noise = path.mean_std(x0[:2], x1[:2], ends)[1].reshape(2, 1) * eps[:2]
    assert close(pair[0] - noise[0], x1[0], 1e-12) and close(pair[1] - noise[1], x0[1], 1e-12)


def test_cond_ot_without_noise_is_genlabs_rectified_flow():
    """alpha = 1 - t on the data x1, sigma = t on the noise x0; the velocity d alpha x1 + d sigma x0."""
    x0, x1, t, eps = inputs((2,), seed=6)
    level = RectifiedFlow().level(t)
    ours = CondOT().sample(x0, x1, t, eps)
    assert close(ours.x_t, level.alpha[:, None] * x1 + level.sigma[:, None] * x0, 1e-14)
    assert close(ours.velocity, level.d_alpha[:, None] * x1 + level.d_sigma[:, None] * x0, 1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["cond_ot", "variance_preserving", "schrodinger_bridge"])
def test_paths_keep_the_samples_dtype_and_draw_eps_from_the_generator(name, dtype):
    path = build("path", name)
    x0, x1, t, _ = inputs((1, 2, 2), dtype=dtype)
    out = path.sample(x0, x1, t, generator=torch.Generator().manual_seed(7))
    assert all((v.dtype, v.device, v.shape) == (dtype, x1.device, x1.shape) for v in out)
    assert torch.equal(out.eps, torch.randn(x1.shape, generator=torch.Generator().manual_seed(7), dtype=dtype))
    assert path.score(t, out.eps).dtype == dtype
    again = path.sample(x0, x1, t.float(), out.eps)  # float32 times: coefficients still in float64
    assert close(again.x_t.double(), out.x_t.double(), 1e-6)


@pytest.mark.parametrize("name", ["cond_ot", "variance_preserving", "schrodinger_bridge"])
def test_paths_run_on_the_meta_device(name):
    path = build("path", name)
    x0, x1 = torch.empty(5, 1, 3, 3, device="meta"), torch.empty(5, 1, 3, 3, device="meta")
    t = torch.empty(5, device="meta", dtype=torch.float64)
    with DeviceAudit() as audit:
        out = path.sample(x0, x1, t, generator=generator_on("meta"))
        score = path.score(t, out.eps)
    assert all(v.device.type == "meta" and v.shape == (5, 1, 3, 3) for v in (*out, score)) and audit.draws == 1


def test_registered_paths_and_bad_values():
    assert registered("path")["path"] == ["cond_ot", "schrodinger_bridge", "variance_preserving"]
    assert build("path", {"type": "schrodinger_bridge", "sigma": 0.5}).sigma == 0.5
    with pytest.raises(ValueError, match="SchrodingerBridge: sigma must be > 0, got 0.0"):
        SchrodingerBridge(0.0)
    with pytest.raises(ValueError, match="CondOT: sigma must be >= 0, got -0.1"):
        CondOT(-0.1)
    with pytest.raises(ConfigError, match="path.sigma: expected float >= 0, got float -1.0"):
        build("path", {"type": "variance_preserving", "sigma": -1.0})
    x0, x1, t, eps = inputs((2,))
    with pytest.raises(ValueError, match=r"CondOT: x0 \(source\) and x1 \(data\) must have one shape, got \[64, 3\]"):
        CondOT().sample(torch.zeros(B, 3), x1, t, eps)
    with pytest.raises(ValueError, match=r"CondOT: t must have shape \[64\] \(one time per row\) or \[\], got \[63\]"):
        CondOT().sample(x0, x1, t[1:], eps)
    with pytest.raises(ValueError, match=r"CondOT: eps must have the shape of x1, \[64, 2\], got \[64, 1\]"):
        CondOT().sample(x0, x1, t, eps[:, :1])
