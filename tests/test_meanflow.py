"""MeanFlow (Geng et al. 2025): the identity u = v - (t - r) du/dt through the JVP, exact one- and few-step
sampling with the exact average velocity, the flow-matching limit, the adaptive weight, the two-time
backbones, the command line with exact resume, and (slow) one-step W2 against OT-CFM on 8 gaussians -> moons.

The exact model: data N(m, s^2 I) and a N(0, I) source on the straight path z_t = (1 - t) x + t eps have
Gaussian marginals N(mu_t, sig_t^2 I), mu_t = (1 - t) m, sig_t^2 = (1 - t)^2 s^2 + t^2, and the affine flow
map z_r = mu_r + (sig_r / sig_t) (z_t - mu_t); the average velocity is u = (z_t - z_r) / (t - r) and the
instantaneous one v = -m + (sig_t' / sig_t) (z - mu_t).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.diffusion import FlowEuler, MeanFlowSampler, RectifiedFlow
from genlab.metrics import wasserstein2
from genlab.models import DiT, MLP, ConcatMLP, UNet
from genlab.objectives import BuildContext, ConditionalFlowMatching, MeanFlow
from genlab.objectives.meanflow import mean_flow_times
from genlab.training import Experiment, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flow_matching" / "otcfm_moons.yaml"
F64 = torch.float64
GRID = {"type": "uniform", "t_min": 0.0, "final": "min"}  # linspace(1, 0, steps + 1)
M, S = torch.tensor([1.5, -0.5], dtype=F64), 0.4


def marginal(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mu_t [B, 2], sig_t [B, 1] and d sig_t / dt [B, 1] of the Gaussian example."""
    t = t[:, None]
    sig = ((1 - t) ** 2 * S**2 + t**2).sqrt()
    return (1 - t) * M, sig, (t - (1 - t) * S**2) / sig


def exact_velocity(z: Tensor, t: Tensor) -> Tensor:
    mu, sig, d_sig = marginal(t)
    return -M + d_sig / sig * (z - mu)


class ExactAverageVelocity(nn.Module):
    """u(z, r, t) of the Gaussian example as a two-time network on rectified flow's model time 1000 t."""

    takes_interval = True

    def forward(self, z: Tensor, t_in: Tensor, interval: Tensor | None = None) -> Tensor:
        t = t_in.to(F64) / 1000
        r = t - (torch.zeros_like(t) if interval is None else interval.to(F64).expand_as(t) / 1000)
        (mu_t, sig_t, _), (mu_r, sig_r, _) = marginal(t), marginal(r)
        z_r = mu_r + sig_r / sig_t * (z - mu_t)
        h = (t - r)[:, None]
        return torch.where(h == 0, exact_velocity(z, t), (z - z_r) / torch.where(h == 0, 1.0, h))


def built(objective: MeanFlow, model: nn.Module, steps: int = 1) -> MeanFlow:
    objective.build(BuildContext(model=model, process=RectifiedFlow(), data_shape=(2,),
                                 sampler=MeanFlowSampler(steps, grid=GRID)))
    return objective


def test_the_exact_average_velocity_satisfies_the_identity_through_the_jvp():
    """u = v - (t - r) du/dt (Eq. 6) with du/dt from the objective's JVP along (v, 1), in float64."""
    g = torch.Generator().manual_seed(0)
    objective = built(MeanFlow(), ExactAverageVelocity())
    t = torch.rand(64, generator=g, dtype=F64) * 0.9 + 0.05
    r = t * torch.rand(64, generator=g, dtype=F64)
    mu, sig, _ = marginal(t)
    z = mu + sig * torch.randn(64, 2, generator=g, dtype=F64)
    v = exact_velocity(z, t)
    u, du_dt = objective.average_velocity(ExactAverageVelocity(), z, t, r, {}, tangent=v)
    assert (u - v).abs().max() > 0.05  # the interval matters
    torch.testing.assert_close(u, v - (t - r)[:, None] * du_dt, atol=1e-9, rtol=0)


def test_the_loss_target_is_v_minus_t_minus_r_times_a_finite_difference_derivative():
    """Eq. 9 with p = 0 on a random float64 network (ConcatMLP: no float32 time features): u_tgt = v_t -
    (t - r) du/dt, du/dt by central differences along (v_t, 1) with r fixed."""
    torch.manual_seed(0)
    model = ConcatMLP(dim=2, width=16, time_scale=1e-2, interval_embedding=True).double()
    mf = built(MeanFlow(adaptive_p=0.0), model)
    draw = mf.draw({"x": torch.randn(16, 2, dtype=F64)}, torch.Generator().manual_seed(5))
    t, r = mean_flow_times(draw.t, draw.t.flip(0), torch.Generator().manual_seed(6), 1.0)
    draw = draw._replace(t=t)
    point = mf.path.sample(draw.x0, draw.x1, t, draw.eps)

    def u(z: Tensor, t: Tensor) -> Tensor:
        return mf.average_velocity(model, z, t, r, {})[0]

    d = 1e-6
    du_dt = (u(point.x_t + d * point.velocity, t + d) - u(point.x_t - d * point.velocity, t - d)) / (2 * d)
    target = point.velocity - (t - r)[:, None] * du_dt
    want = (u(point.x_t, t) - target).square().sum(1).mean()
    assert (t - r).abs().max() > 0.1
    torch.testing.assert_close(mf.loss_at(model, draw, r), want, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_sampler_carries_the_source_exactly_with_the_exact_average_velocity(steps):
    """One step (Algorithm 2) lands on the flow map's image m + s z_1; so do several."""
    objective = built(MeanFlow(), ExactAverageVelocity(), steps)
    z1 = torch.randn(100, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = objective.context.sampler.sample(objective.denoiser(ExactAverageVelocity()), x=z1, progress=False)
    torch.testing.assert_close(out, M + S * z1, atol=1e-10, rtol=0)


def test_on_a_one_time_network_the_sampler_is_flow_euler():
    model = MLP(dim=2, hidden=8, depth=1)
    denoiser = built(MeanFlow(ratio=0.0), model).denoiser(model)
    z1 = torch.randn(8, 2)
    with torch.no_grad():
        got = MeanFlowSampler(3, grid=GRID).sample(denoiser, x=z1, progress=False)
        want = FlowEuler(3, grid=GRID).sample(denoiser, x=z1, progress=False)
    assert torch.equal(got, want)


def test_the_sampler_is_deterministic_one_step_with_one_evaluation_per_step():
    sampler, calls = MeanFlowSampler(3, grid=GRID), []
    model = ExactAverageVelocity()
    model.register_forward_hook(lambda *args: calls.append(1))
    assert not sampler.stochastic and not sampler.multistep and sampler.nfe_per_step == 1
    denoiser = built(MeanFlow(), model, 3).denoiser(model)
    z1 = torch.randn(8, 2, dtype=F64)
    a, b = (sampler.sample(denoiser, x=z1, generator=torch.Generator().manual_seed(s), progress=False) for s in (1, 2))
    assert torch.equal(a, b) and len(calls) == 6


def test_the_times_pair_the_larger_draw_as_t_and_set_r_to_t_at_the_ratio():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(20000, generator=g, dtype=F64), torch.rand(20000, generator=g, dtype=F64)
    t, r = mean_flow_times(a, b, g, 0.25)
    assert torch.equal(t, torch.maximum(a, b)) and (r <= t).all()
    apart = r < t
    assert torch.equal(r[apart], torch.minimum(a, b)[apart])
    assert abs(apart.double().mean().item() - 0.25) < 0.015


def test_with_r_equal_t_and_no_adaptive_weight_the_loss_is_flow_matching():
    """At r = t with p = 0, the loss of a draw is the coordinate-summed flow-matching loss (D times cfm's
    mean over coordinates); the interval input is then 0."""
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16, depth=2, interval_embedding=True)
    nn.init.normal_(model.interval_embed.linear_2.weight)  # the interval would change the output if it were not 0
    mf = built(MeanFlow(adaptive_p=0.0), model)
    cfm = ConditionalFlowMatching()
    cfm.build(mf.context)
    draw = cfm.draw({"x": torch.randn(32, 2)}, torch.Generator().manual_seed(3))
    torch.testing.assert_close(mf.loss_at(model, draw), 2 * cfm.loss_at(model, draw))


def test_the_adaptive_weight_scales_each_row_by_a_stopped_one_over_error_plus_c():
    """L = mean_b sg(1 / (e_b + c)^p) e_b: its value and its gradient (the weight gets none)."""
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16, depth=2, interval_embedding=True)
    p, c = 0.5, 0.1
    mf = built(MeanFlow(adaptive_p=p, adaptive_c=c), model)
    draw = mf.draw({"x": torch.randn(16, 2)}, torch.Generator().manual_seed(4))
    loss = mf.loss_at(model, draw)
    (grad,) = torch.autograd.grad(loss, model.inp.weight)
    point = mf.path.sample(draw.x0, draw.x1, draw.t, draw.eps)
    u, _ = mf.average_velocity(model, point.x_t, draw.t, draw.t, {})
    error = (u - point.velocity).square().sum(1)
    hand = (error / (error.detach() + c) ** p).mean()
    torch.testing.assert_close(loss, hand)
    torch.testing.assert_close(grad, torch.autograd.grad(hand, model.inp.weight)[0])


@pytest.mark.parametrize("make, x", [
    (lambda: MLP(dim=2, hidden=16, depth=1, interval_embedding=True), torch.randn(3, 2)),
    (lambda: UNet(in_channels=1, channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
                  norm_groups=4, interval_embedding=True), torch.randn(3, 1, 8, 8)),
    (lambda: DiT(input_size=8, in_channels=1, patch_size=4, hidden=16, depth=1, num_heads=2,
                 interval_embedding=True), torch.randn(3, 1, 8, 8)),
], ids=["mlp", "unet", "dit"])
def test_two_time_backbones_start_as_one_time_ones_and_then_see_the_interval(make, x):
    """The interval embedding's output layer starts at zero (the output ignores the interval); trained
    weights make it matter; None is the interval 0 (r = t)."""
    torch.manual_seed(0)
    model = make().eval()
    for name, weight in model.named_parameters():  # zero-initialised output layers would hide any input
        if not name.startswith("interval_embed") and not weight.any():
            nn.init.normal_(weight, std=0.3)
    t = torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        base = model(x, t)
        torch.testing.assert_close(model(x, t, interval=torch.tensor([5.0, 300.0, 100.0])), base)
        nn.init.normal_(model.interval_embed.linear_2.weight)
        moved = model(x, t, interval=torch.tensor([5.0, 300.0, 100.0]))
        assert (moved - model(x, t)).abs().max() > 1e-3
        torch.testing.assert_close(model(x, t, interval=0.0), model(x, t))


def test_concat_mlp_appends_the_interval_as_one_more_input():
    torch.manual_seed(0)
    model = ConcatMLP(dim=2, width=8, interval_embedding=True)
    x, t = torch.randn(4, 2), torch.full((4,), 300.0)
    want = model.net(torch.cat([x, 1e-3 * t[:, None], torch.full((4, 1), 0.2)], 1))
    torch.testing.assert_close(model(x, t, interval=torch.full((4,), 200.0)), want)
    torch.testing.assert_close(model(x, t), model(x, t, interval=0.0))


@pytest.mark.parametrize("model", [MLP(dim=2, hidden=8, depth=1), ConcatMLP(dim=2, width=8)], ids=["mlp", "concat"])
def test_one_time_models_refuse_an_interval_and_meanflow_refuses_them(model):
    with pytest.raises(ValueError, match="interval_embedding"):
        model(torch.randn(2, 2), torch.ones(2), interval=torch.ones(2))
    with pytest.raises(ValueError, match="interval_embedding: true"):
        built(MeanFlow(), model)
    built(MeanFlow(ratio=0.0), model)  # r = t always: flow matching, any model


def test_the_schrodinger_bridge_path_is_refused():
    with pytest.raises(ValueError, match="schrodinger_bridge"):
        built(MeanFlow(path="schrodinger_bridge"), MLP(dim=2, hidden=8, depth=1, interval_embedding=True))


@pytest.mark.parametrize("kwargs, fragment", [({"ratio": 1.5}, "ratio"), ({"adaptive_c": 0.0}, "adaptive_c"),
                                              ({"adaptive_p": -1.0}, "adaptive_p")])
def test_bad_values_are_refused_at_construction(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MeanFlow(**kwargs)


MEANFLOW_MOONS = ROOT / "configs" / "flow_matching" / "meanflow_moons.yaml"
TINY = ["train.steps=6", "train.checkpoint_every=2", "train.batch_size=16", "model.width=8", "data.n=200",
        "objective.source.n=200", "train.eval_samples=60", "train.log_every=1"]


def test_a_run_prints_its_numbers_and_resumes_bit_identical(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(MEANFLOW_MOONS), *TINY, "--out", str(run), "--quiet"]) == 0
    assert "exact Wasserstein-2 to held-out data" in capsys.readouterr().out
    final = load_weights(latest_checkpoint(run) / "model.safetensors")
    shutil.copytree(run, tmp_path / "split")
    for step in (6, 4):
        shutil.rmtree(tmp_path / "split" / "checkpoints" / f"step_{step:07d}")
    assert main(["train", str(MEANFLOW_MOONS), *TINY, "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    resumed = load_weights(latest_checkpoint(tmp_path / "split") / "model.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


def test_a_one_time_model_in_a_config_is_a_one_line_error(capsys, tmp_path):
    assert main(["train", str(MEANFLOW_MOONS), "model.interval_embedding=false", *TINY,
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interval_embedding: true" in err
    assert not (tmp_path / "run").exists()


# ---- MeanFlow against OT-CFM at one step (slow) ------------------------------------------------------------

def one_step_w2(config: Path, tmp: Path, points: int = 1000) -> float:
    """Train ``config`` as written; the exact W2 between ``points`` one-step samples and held-out moons."""
    exp = Experiment.from_config(load_config(config))
    with Trainer(exp, tmp, progress=False) as tr:
        tr.fit()
        samples = exp.objective.sample(tr.sampling_modules(), points, torch.Generator().manual_seed(1234))
    return wasserstein2(samples, exp.heldout(points))


@pytest.mark.slow
def test_meanflow_one_step_w2_is_at_most_ot_cfm_s(tmp_path):
    """8 gaussians -> moons with torchcfm's MLP (width 64; MeanFlow's takes the interval as one more input),
    5,000 steps, batch 256, OT pairs for both (configs/flow_matching/meanflow_moons.yaml against
    otcfm_moons.yaml), one network evaluation each. Measured (seed 0, one thread): MeanFlow 0.256, OT-CFM
    0.268 (MeanFlow with independent pairs: 0.511)."""
    mf = one_step_w2(MEANFLOW_MOONS, tmp_path / "mf")
    ot = one_step_w2(CONFIG, tmp_path / "ot")
    print(f"one-step W2: MeanFlow {mf:.4f}, OT-CFM {ot:.4f}")
    assert mf <= ot, (mf, ot)
