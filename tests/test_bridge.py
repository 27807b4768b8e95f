"""Schrödinger-bridge CFM with its score (SF2M, Tong et al. 2024): objective ``cfm`` with path
``schrodinger_bridge`` trains the flow and a score network, sampler ``bridge_sde`` draws with Euler-Maruyama
on SF2M's SDE. Tested: the loss against torchcfm's SF2M example, the sampler against the exact bridge of a
point pair, the sampler on a plain diffusion Denoiser against a Gaussian mixture, training on 8 gaussians ->
moons, exact resume and ``genlab sample`` of the two-network run, and bad inputs.

Time mapping: genlab's t = 0 is the data (x1), t = 1 the source (x0); torchcfm's tau = 1 - t. A torchcfm flow
network v(x, tau) is the genlab model -v(x, 1 - t); its score network, s(x, tau) = (sigma^2 / 2) grad log p,
is the genlab score model unchanged (a score does not change sign with time).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchcfm.conditional_flow_matching import SchrodingerBridgeConditionalFlowMatcher
from torchcfm.models.models import MLP as TorchCFMMLP

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.diffusion import VP, BridgeDenoiser, BridgeSDE, DPMSolverPP, EulerMaruyama, FlowEuler, RectifiedFlow
from genlab.metrics import wasserstein2
from genlab.objectives import BuildContext, ConditionalFlowMatching
from genlab.objectives.paths import SchrodingerBridge
from genlab.testing import GaussianMixture, exact_denoiser
from genlab.testing.devices import DeviceAudit, generator_on
from genlab.training import Experiment, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flow_matching" / "sbcfm_moons.yaml"
F64 = torch.float64
B = 64


class TorchCFMNet(nn.Module):
    """A torchcfm network ``net(cat[x, tau])`` as a genlab model ``(x, 1000 t) -> sign * net(x, 1 - t)``:
    sign -1 for a flow (velocity), +1 for a score."""

    def __init__(self, net: nn.Module, sign: float) -> None:
        super().__init__()
        self.net, self.sign = net, sign

    def forward(self, x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        tau = 1 - t_model / 1000
        return self.sign * self.net(torch.cat([x, tau[:, None]], dim=1))


def bridge(sigma: float = 1.0, t_eps: float = 1e-3, sampler=None, source=None, model=None,
           process=None, **kwargs) -> ConditionalFlowMatching:
    """cfm with the Schrödinger bridge, built on rectified flow (2-D data)."""
    obj = ConditionalFlowMatching(path={"type": "schrodinger_bridge", "sigma": sigma, "t_eps": t_eps}, source=source,
                                  **kwargs)
    model = model if model is not None else TorchCFMNet(TorchCFMMLP(2, w=16, time_varying=True).double(), -1.0)
    score = TorchCFMNet(TorchCFMMLP(2, w=16, time_varying=True).double(), 1.0)
    obj.build(BuildContext(model=model, process=process or RectifiedFlow(), sampler=sampler or BridgeSDE(10),
                           data_shape=(2,), new_model=lambda: score))
    return obj


def data_batch(seed: int = 0, n: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": 2 + 0.5 * torch.randn(n, 2, generator=g, dtype=F64)}


# ---- the loss: torchcfm's SF2M example ----------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_the_sf2m_loss_equals_torchcfm(sigma):
    """For the objective's draws (x0, x1, t, eps), each term and the sum equal torchcfm's SF2M tutorial loop:
    xt, ut of SchrodingerBridgeConditionalFlowMatcher at tau = 1 - t, lambda_t = compute_lambda(tau),
    mean((vt - ut)^2) + mean((lambda_t st + eps)^2), with the same two networks. torchcfm adds 1e-8 to the
    denominators of ut and lambda; genlab does not (t lies in [t_eps, 1 - t_eps]): relative 1e-6."""
    obj = bridge(sigma)
    draw = obj.draw(data_batch(), torch.Generator().manual_seed(5))
    assert draw.t.min() >= 1e-3 and draw.t.max() <= 1 - 1e-3
    modules = obj.modules()
    assert set(modules) == {"model", "score"} and obj.ema_modules() == ("model", "score")
    assert obj.optimizers() == {"model": ("model", "score")}
    ours = obj.loss_terms(modules["model"], draw, modules["score"])

    matcher = SchrodingerBridgeConditionalFlowMatcher(sigma)
    tau = 1 - draw.t
    xt = matcher.sample_xt(draw.x0, draw.x1, tau, draw.eps)
    ut = matcher.compute_conditional_flow(draw.x0, draw.x1, tau, xt)
    lambda_t = matcher.compute_lambda(tau)
    vt = modules["model"].net(torch.cat([xt, tau[:, None]], dim=-1))
    st = modules["score"].net(torch.cat([xt, tau[:, None]], dim=-1))
    flow, score = torch.mean((vt - ut) ** 2), torch.mean((lambda_t[:, None] * st + draw.eps) ** 2)
    for got, want in ((ours["flow"], flow), (ours["score"], score), (obj.loss(modules, data_batch(),
                      torch.Generator().manual_seed(5)), flow + score)):
        assert abs(got.item() - want.item()) <= 1e-6 * want.item(), (got.item(), want.item())
    # the score loss's target: s_theta = -eps / lambda(t), torchcfm's minimiser
    target = -draw.eps / obj.path.score_weight(draw.t)[:, None]
    assert torch.allclose(target, -draw.eps / lambda_t[:, None], rtol=1e-6, atol=0)


def test_training_times_fill_the_bridge_inside_its_ends_and_the_networks_see_them_clamped():
    """t ~ U[t_eps, 1 - t_eps] (the process's t_min wins where it is larger); at sampling, the networks see
    their time clamped into that range: the first step, from t = 1, evaluates them at 1 - t_eps."""
    obj = bridge(t_eps=0.2)
    t = obj.draw(data_batch(n=4096), torch.Generator().manual_seed(0)).t
    assert 0.2 <= t.min() < 0.21 and 0.79 < t.max() <= 0.8
    t = bridge(t_eps=0.01, process=RectifiedFlow(t_min=0.3)).draw(data_batch(n=4096), torch.Generator()).t
    assert 0.3 <= t.min() < 0.31 and 0.98 < t.max() <= 0.99
    seen = []

    def spy(x, t_model):
        seen.append(t_model)
        return torch.zeros_like(x)

    obj = bridge(t_eps=0.2, sampler=BridgeSDE(4))
    obj.sample({"model": spy, "score": spy}, 3, torch.Generator().manual_seed(0))
    assert [float(t[0]) for t in seen] == pytest.approx([800, 800, 750, 750, 500, 500, 250, 250])


def test_the_mean_velocity_variance_over_the_training_times_is_as_documented():
    """SchrodingerBridge's docstring: mean over U[t_eps, 1 - t_eps] of u_t's noise variance sigma^2 (1 - 2t)^2 /
    (4 t (1 - t)) = sigma^2 ((1/2) ln((1 - t_eps) / t_eps) - (1 - 2 t_eps)) / (1 - 2 t_eps) = 2.46 sigma^2."""
    path, n = SchrodingerBridge(sigma=0.7), 2_000_000
    t = 1e-3 + (1 - 2e-3) * (torch.arange(n, dtype=F64) + 0.5) / n  # midpoint rule
    mean = path.coefficients(t).d_noise.square().mean().item()
    assert mean / 0.7**2 == pytest.approx(2.4603, abs=2e-4)


def test_the_loss_and_the_sampling_run_on_the_meta_device():
    """Device-generic: the two-network loss and the SDE sampling run on meta tensors (no CPU tensor mixed in,
    no value read on the host), every draw on its generator's device: the source, t and eps of the loss
    (3 draws), the source and the noise of 3 of the 4 steps (the last adds none)."""
    obj = bridge(0.5, sampler=BridgeSDE(4))
    modules = {name: module.float().to("meta") for name, module in obj.modules().items()}
    with DeviceAudit() as audit:
        loss = obj.loss(modules, {"x": torch.empty(8, 2, device="meta")}, generator_on("meta"))
    assert loss.device.type == "meta" and audit.draws == 3
    with DeviceAudit() as audit:
        out = obj.sample(modules, 5, generator_on("meta"))
    assert (out.device.type, out.dtype, out.shape) == ("meta", torch.float32, (5, 2)) and audit.draws == 4


# ---- the SDE sampler against the exact bridge of a point pair -------------------------------------------------

X0, X1 = torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([-1.0, 0.5], dtype=F64)


def exact_pair_fields(sigma: float):
    """The exact flow and score-model output of the Brownian bridge from X0 (source, t = 1) to X1 (data, t = 0),
    whose marginal is N(mu_t, sigma^2 t (1 - t) I), mu_t = (1 - t) X1 + t X0: with r = x - mu_t,
    v(x, t) = X0 - X1 + (1 - 2t) / (2 t (1 - t)) r (the conditional velocity: a single pair) and
    s_theta = (sigma^2 / 2) grad log p_t = -r / (2 t (1 - t)). Both take genlab's model time 1000 t."""

    def parts(x, t_model):
        t = (t_model / 1000)[:, None]
        return x - ((1 - t) * X1 + t * X0), t * (1 - t)

    def velocity(x, t_model):
        r, tt = parts(x, t_model)
        return X0 - X1 + (1 - 2 * (t_model / 1000)[:, None]) / (2 * tt) * r

    def score(x, t_model):
        r, tt = parts(x, t_model)
        return -r / (2 * tt)

    return velocity, score


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_the_sde_sampler_follows_the_exact_bridge_of_a_point_pair(sigma):
    """Started at X0, 40,000 paths of 100 steps with the exact fields. (1) They end at X1: with the exact
    field the drift v - s at t is (X1 - x) / t in the papers' time, so the last step (from t = h, no noise)
    lands on X1 up to rounding: 1e-9. (2) At t = 1/2 their mean is mu_1/2 and their variance is Euler-
    Maruyama's, V_{k+1} = V_k (t_{k+1} / t_k)^2 + sigma^2 h (the drift's x-coefficient is 1 - h / t_k, and the
    first step's clamped time leaves V_1 = sigma^2 h: x starts at one point), which is within 1.6% of the
    bridge's sigma^2 t (1 - t) = sigma^2 / 4 at h = 0.01. Statistical tolerance: the variance averaged over
    the 2 coordinates has relative standard error sqrt(2 / (2 n)) = 0.5%; 2.5% is 5 standard errors; the mean
    1e-2 sigma is 4 standard errors (sqrt(V / n) = 0.0025 sigma). Measured: end 2e-16 from X1, variance 1.0162
    sigma^2 / 4 (Euler-Maruyama's 1.0151), mean 0.0024 sigma off. A score term scaled by 2 in the sampler
    ends 0.22 sigma from X1 with the variance at 0.51 sigma^2 / 4."""
    n, steps = 40_000, 100
    obj = bridge(sigma, sampler=BridgeSDE(steps))
    velocity, score = exact_pair_fields(sigma)
    denoiser = obj.denoiser(velocity, score=score)
    assert isinstance(denoiser, BridgeDenoiser) and denoiser.g == sigma
    middle = {}

    def record(info):
        if float(info.level_next.t) == 0.5:
            middle["x"] = info.x.clone()

    out = obj.context.sampler.sample(denoiser, x=X0.expand(n, 2).clone(), generator=torch.Generator().manual_seed(3),
                                     callback=record, progress=False)
    assert (out - X1).abs().max().item() < 1e-9
    times = torch.linspace(1, 0, steps + 1, dtype=F64)
    v = 0.0
    for t, t_next in zip(times[:50], times[1:51]):
        v = v * float(t_next / t) ** 2 + sigma**2 * float(t - t_next)
    assert v == pytest.approx(sigma**2 / 4, rel=0.016)  # measured 1.51% above
    x = middle["x"]
    assert (x.mean(0) - (X0 + X1) / 2).abs().max().item() < 1e-2 * sigma
    assert x.var(0).mean().item() == pytest.approx(v, rel=0.025)


def test_g_zero_is_flow_euler_on_the_same_denoiser():
    """g = 0: the score term vanishes with the noise; the step is Euler on dx/dt = v, as flow_euler."""
    obj = bridge(0.7)
    velocity, score = exact_pair_fields(0.7)
    denoiser = obj.denoiser(velocity, score=score)
    x = X0 + 0.1 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    a = BridgeSDE(20, g=0.0).sample(denoiser, x=x, progress=False)
    b = FlowEuler(20, {"type": "uniform", "t_min": 0.0, "final": "min"}).sample(denoiser, x=x, progress=False)
    assert not BridgeSDE(3, g=0.0).stochastic and BridgeSDE(3).stochastic
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


# ---- the SDE sampler on a plain diffusion Denoiser: score -eps / sigma -----------------------------------------

@pytest.mark.parametrize("g", [0.5, 2.0])
def test_on_a_diffusion_denoiser_the_sde_samples_the_data_with_any_g(g):
    """A Denoiser without a score network: grad log p_t = -eps / sigma of its own marginals. With the exact
    eps of a Gaussian mixture (a ring of 8, std 0.5) on VP, 200 steps from the prior reach the mixture for
    any g: the mean of 8,000 samples within 0.05 of the mixture's (3 standard errors, sqrt(2.25 / 8000) =
    0.017), their covariance within 0.1 of its 2.25 I (2.8 standard errors for a Gaussian, 2.25 sqrt(2 / 8000)
    = 0.036), and W2 of 1,500 of them to as many mixture draws within 0.05 of two mixture draws' W2 (0.19).
    Measured: mean 0.013 / 0.009, covariance 0.036 / 0.039, W2 0.17 / 0.16 for g = 0.5 / 2. A score term
    scaled by 2 in the sampler misses the covariance by 0.18 / 0.23."""
    mix = GaussianMixture.ring(std=0.5)
    den = exact_denoiser(mix, VP(), "eps")
    out = BridgeSDE(200, g=g).sample(den, shape=(8000, 2), generator=torch.Generator().manual_seed(1),
                                     dtype=F64, progress=False)
    assert (out.mean(0) - mix.mean()).abs().max().item() < 0.05
    assert (torch.cov(out.T) - mix.covariance()).abs().max().item() < 0.1
    data = mix.sample(3000, generator=torch.Generator().manual_seed(2))
    assert wasserstein2(out[:1500], data[:1500]) < wasserstein2(data[1500:], data[:1500]) + 0.05


# ---- training on 8 gaussians -> moons ----------------------------------------------------------------------

SHORT = ["train.steps=300", "train.batch_size=128", "train.checkpoint_every=100000", "objective.source.n=5000",
         "data.n=5000"]


def trained_w2(tmp: Path, overrides: list[str], points: int = 1000) -> dict[str, float]:
    """Train the config with ``overrides``; exact W2 of ``points`` samples of the SDE (and of the
    probability-flow ODE, flow_euler, 100 steps) to as many held-out moons, and of two held-out draws."""
    exp = Experiment.from_config(load_config(CONFIG, overrides))
    with Trainer(exp, tmp / "run", progress=False) as tr:
        tr.fit()
        modules = tr.sampling_modules()
    held = exp.heldout(points)
    out = {"data": wasserstein2(exp.heldout(points, draw=1), held)}
    for name, sampler in (("sde", exp.sampler), ("ode", FlowEuler(100, {"type": "uniform", "t_min": 0.0,
                                                                             "final": "min"}))):
        exp.objective.context.sampler = sampler
        out[name] = wasserstein2(exp.objective.sample(modules, points, torch.Generator().manual_seed(1234)), held)
    return out


def test_sb_cfm_sde_samples_reach_the_moons(tmp_path):
    """300 steps of the config with batches of 128 (sigma 0.5, sinkhorn reg 0.5): the SDE's 1,000 samples are
    within W2 0.30 of as many held-out moons (two held-out draws: 0.15; an untrained or mis-scaled score is
    far above: the score loss with -eps gives 0.52). Measured (seed 0): SDE 0.24, probability-flow ODE 0.37."""
    w2 = trained_w2(tmp_path, SHORT)
    print(w2)
    assert w2["sde"] < 0.30, w2


@pytest.mark.slow
def test_sb_cfm_config_reaches_the_moons(tmp_path):
    """The shipped config in full (5000 steps): the SDE's 2,000 samples within W2 0.22 of as many held-out moons
    (two held-out draws: 0.08), and nearer than the probability-flow ODE's. Measured (seed 0): SDE 0.170, ODE
    0.222 (``genlab train`` reports 0.172 on its own samples); 3.6 min of CPU time on one thread."""
    w2 = trained_w2(tmp_path, [], points=2000)
    print(w2)
    assert w2["sde"] < 0.22 and w2["sde"] < w2["ode"], w2


# ---- two networks through the command line: exact resume, genlab sample ---------------------------------------

TINY = ["train.steps=6", "train.checkpoint_every=2", "train.batch_size=16", "model.width=8", "data.n=200",
        "objective.source.n=200", "train.eval_samples=60", "train.log_every=1", "sampler.steps=10"]
FILES = ("model.safetensors", "ema.safetensors", "score.safetensors", "ema_score.safetensors")


def test_a_two_network_run_resumes_bit_identical_and_samples_with_both_ema_copies(capsys, tmp_path):
    """Both networks and their EMA copies are checkpointed; a run killed after step 2 and resumed ends with
    the same weights as the whole run; ``genlab sample`` loads both EMA copies: with the training's seed and
    number of samples it reports the training's own metrics (the score's trained weights would not)."""
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), *TINY, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    final = latest_checkpoint(run)
    assert all((final / f).is_file() for f in FILES)
    shutil.copytree(run, tmp_path / "split")
    for step in (4, 6):
        shutil.rmtree(tmp_path / "split" / "checkpoints" / f"step_{step:07d}")
    assert main(["train", str(CONFIG), *TINY, "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = latest_checkpoint(tmp_path / "split")
    for file in FILES:
        a, b = load_weights(final / file), load_weights(resumed / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    assert not torch.equal(load_weights(final / "score.safetensors")["net.0.weight"],
                           load_weights(final / "ema_score.safetensors")["net.0.weight"])

    assert main(["sample", str(run), "--n", "60", "--seed", "1234", "--out", str(tmp_path / "s")]) == 0
    assert "exact Wasserstein-2" in capsys.readouterr().out
    trained = json.loads((run / "samples.json").read_text())
    sampled = json.loads((tmp_path / "s" / "samples-bridge_sde-10steps-seed1234.json").read_text())
    assert sampled["wasserstein2"] == trained["wasserstein2"] and math.isfinite(sampled["wasserstein2"])


# ---- bad inputs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"process": VP()}, "use process: rectified_flow"),
    ({"sampler": EulerMaruyama(10)}, "samples with sampler bridge_sde"),
    ({"sampler": DPMSolverPP(3)}, None),  # deterministic: the probability-flow ODE
    ({"sampler": BridgeSDE(3, g=0.0)}, None),
])
def test_the_bridge_refuses_a_process_or_sampler_that_does_not_fit(kwargs, fragment):
    if fragment is None:
        bridge(**kwargs)
        return
    with pytest.raises(ValueError, match=fragment):
        bridge(**kwargs)


def test_bridge_sde_needs_the_bridge_and_a_score_network():
    obj = ConditionalFlowMatching(path="cond_ot")
    with pytest.raises(ValueError, match="needs the score of the marginals, which cfm learns only with path "
                                         "schrodinger_bridge"):
        obj.build(BuildContext(model=lambda x, t: x, process=RectifiedFlow(), sampler=BridgeSDE(4), data_shape=(2,)))
    obj.build(BuildContext(model=lambda x, t: x, process=RectifiedFlow(), sampler=BridgeSDE(4, g=0), data_shape=(2,)))
    denoiser = bridge().denoiser(lambda x, t: x)  # no score network
    with pytest.raises(ValueError, match="no score model was given"):
        BridgeSDE(4).sample(denoiser, x=torch.zeros(3, 2), progress=False)
    with pytest.raises(ValueError, match="g must be > 0"):
        BridgeDenoiser(lambda x, t: x, None, RectifiedFlow(), g=0.0)


@pytest.mark.parametrize("make, fragment", [
    (lambda: SchrodingerBridge(t_eps=0.5), "t_eps"),
    (lambda: SchrodingerBridge(t_eps=0.0), "t_eps"),
    (lambda: SchrodingerBridge(sigma=0.0), "sigma"),
    (lambda: BridgeSDE(g=-1.0), "g"),
    (lambda: RectifiedFlow().within(0.5, 0.5), r"need 0 <= t_min < t_max <= 1"),
    (lambda: bridge(t_eps=0.4, process=RectifiedFlow(t_min=0.7)), r"within\(0.7, 0.6\)"),
])
def test_bad_values_are_refused_with_the_field_named(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


@pytest.mark.parametrize("override, fragment", [
    ("objective.path.t_eps=0.5", "objective.path.t_eps: expected float > 0 and < 0.5, got float 0.5"),
    ("objective.path.t_eps=-1", "objective.path.t_eps: expected float > 0 and < 0.5, got int -1"),
    ("sampler.g=-1", "sampler.g: expected float >= 0 or None, got int -1"),
    ("process=trigonometric", "use process: rectified_flow"),
    ("sampler=ddpm", "samples with sampler bridge_sde (its SDE) or a deterministic sampler"),
    ("objective.path=cond_ot", "needs the score of the marginals"),
])
def test_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", "\\(").replace(")", "\\)")):
        Experiment.from_config(load_config(CONFIG, [override]))


def test_the_config_builds_with_both_networks():
    exp = Experiment.from_config(load_config(CONFIG))
    modules = exp.objective.modules()
    assert set(modules) == {"model", "score"} and modules["score"] is not exp.model
    assert type(modules["score"]) is type(exp.model)
    assert not torch.equal(modules["score"].net[0].weight, exp.model.net[0].weight)  # a fresh initialisation
