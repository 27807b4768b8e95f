"""Continuous normalizing flow (FFJORD) against exact answers (a linear field: expm(A) and trace(A); a
density that integrates to 1), its peer zuko's CNF on the same vector field, the diffusion likelihood of a
flow-matching model on the same field, Hutchinson's estimator, training through the objective, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import scipy.linalg
import torch
from torch import nn

from genlab.core import build
from genlab.core.config import load_config
from genlab.core.errors import ConfigError, ShapeError
from genlab.core.ode import divergence, draw_probes
from genlab.data.toy2d import toy2d_log_prob
from genlab.diffusion import Denoiser, RectifiedFlow
from genlab.diffusion.likelihood import DiffusionLikelihood
from genlab.models.concatsquash import ConcatSquashMLP
from genlab.models.flows import CNF, Flow, probes_from
from genlab.training import Experiment, Trainer
from genlab.training.evaluation import heldout_nll

F64 = torch.float64
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flows" / "ffjord_toy2d.yaml"


class Linear(nn.Module):
    """f(z, t) = A z: z(1) = expm(A) z(0) and int_0^1 div f dt = trace(A)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T


def linear_cnf(**kwargs) -> tuple[CNF, torch.Tensor]:
    a = 0.7 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    return CNF(3, net=Linear(a), **kwargs).double().eval(), a


def field_2d(seed: int = 0) -> ConcatSquashMLP:
    torch.manual_seed(seed)
    return ConcatSquashMLP(2, hidden=16, depth=2).double()


@pytest.mark.parametrize("solver", [{"method": "dopri5", "rtol": 1e-11, "atol": 1e-11},
                                    {"method": "rk4", "steps": 200}], ids=["dopri5", "rk4"])
def test_linear_field_is_expm_and_trace(solver):
    cnf, a = linear_cnf(**solver)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        z, logdet = cnf(x)
        back, logdet_inv = cnf.inverse(z)
    expm = torch.from_numpy(scipy.linalg.expm(a.numpy()))
    torch.testing.assert_close(z, x @ expm.T, rtol=0, atol=1e-8)
    torch.testing.assert_close(logdet, torch.full((5,), float(a.trace()), dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-8)
    assert z.dtype == logdet.dtype == F64


def test_linear_field_gradients_are_the_analytic_ones():
    """Backpropagation through the solver: d sum_b logdet / dA = B I, d sum z(1) / dA by central differences
    of scipy's expm."""
    cnf, a = linear_cnf(method="rk4", steps=100)
    cnf.train()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    z, logdet = cnf(x)
    (logdet.sum() + z.sum()).backward()
    grad = cnf.net.a.grad.clone()
    eps = 1e-6
    num = torch.zeros(3, 3, dtype=F64)
    for i in range(3):
        for j in range(3):
            e = torch.zeros(3, 3, dtype=F64)
            e[i, j] = eps
            hi = torch.from_numpy(scipy.linalg.expm((a + e).numpy()))
            lo = torch.from_numpy(scipy.linalg.expm((a - e).numpy()))
            num[i, j] = ((x @ hi.T).sum() - (x @ lo.T).sum()) / (2 * eps) + 4 * (i == j)
    torch.testing.assert_close(grad, num, rtol=0, atol=1e-6)


def test_log_density_integrates_to_one_on_a_grid():
    """A CNF with a random FFJORD field: log p on a 161 x 161 grid over [-8, 8]^2 sums to 1 (trapezoid rule)."""
    flow = Flow([2], [CNF(2, net=field_2d(), rtol=1e-7, atol=1e-7)]).double().eval()
    side = torch.linspace(-8, 8, 161, dtype=F64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        p = flow.log_prob(grid).exp()
    mass = float(p.sum()) * float(side[1] - side[0]) ** 2  # the density is ~0 on the boundary
    assert abs(mass - 1) < 1e-3, mass
    with torch.no_grad():
        gauss = Flow([2], []).double().log_prob(grid).exp()
    assert (p - gauss).abs().max() > 1e-2  # the field does move the density


def test_zuko_cnf_gives_the_same_log_prob_and_inverse():
    """zuko's CNF (its FFJTransform's field, tanh for a smooth field) and genlab's CNF on that field, both
    dopri5 at rtol = atol = 1e-9 in float64: log p and the inverse agree to 1e-8 (measured 8e-10)."""
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    peer = zuko.flows.CNF(2, hidden_features=(32, 32), rtol=1e-9, atol=1e-9, activation=nn.Tanh).double().eval()
    f = peer.transform.f
    flow = Flow([2], [CNF(2, net=lambda z, t: f(t, z), rtol=1e-9, atol=1e-9)]).double().eval()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), peer().log_prob(x), rtol=0, atol=1e-8)
        torch.testing.assert_close(flow.inverse(z)[0], peer().transform.inv(z), rtol=0, atol=1e-8)


def test_flow_matching_likelihood_is_the_cnf_on_its_velocity():
    """A rectified-flow model predicting the velocity dx/dt = v(x, t) (data at t = 0, N(0, I) at t = 1) is a
    CNF with field v: DiffusionLikelihood from t = 0 to 1 and the CNF give the same log p (1e-8)."""
    v = field_2d(seed=5)
    denoiser = Denoiser(lambda x, t: v(x, t), RectifiedFlow(), "velocity", model_time=lambda t: t)
    like = DiffusionLikelihood(denoiser, rtol=1e-10, atol=1e-10, t_start=0.0, t_end=1.0)
    flow = Flow([2], [CNF(2, net=v, rtol=1e-10, atol=1e-10)]).double().eval()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(like.log_prob(x), flow.log_prob(x), rtol=0, atol=1e-8)


def test_hutchinson_is_unbiased_and_seeded_by_the_generator():
    """Mean of 10,000 Rademacher / Gaussian probe estimates of div f at a point is the exact divergence
    within 5 standard errors; the same generator seed draws the same probes."""
    v = field_2d(seed=7)
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(8), dtype=F64).requires_grad_(True)
    out = v(y, torch.full((3,), 0.3, dtype=F64))
    exact = divergence(out, y, None, create_graph=True)[:, 0]  # keeps the graph for the probes
    for probe in ("rademacher", "gaussian"):
        probes = draw_probes(y, 10_000, probe, torch.Generator().manual_seed(9))
        est = divergence(out, y, probes, create_graph=True)  # [3, 10000]
        stderr = est.std(1) / math.sqrt(est.shape[1])
        assert ((est.mean(1) - exact).abs() < 5 * stderr).all(), (probe, est.mean(1), exact, stderr)
        assert (stderr > 0).all()
    again = draw_probes(y, 4, "gaussian", torch.Generator().manual_seed(9))
    torch.testing.assert_close(again, draw_probes(y, 4, "gaussian", torch.Generator().manual_seed(9)))
    assert not torch.equal(again, draw_probes(y, 4, "gaussian", torch.Generator().manual_seed(10)))


def test_cnf_hutchinson_log_det_averages_to_the_exact_one():
    """The CNF's Hutchinson log-det (probes fixed over a solve, 20 per sample) over 40 generator seeds
    averages to the exact log-det within 5 standard errors; one seed gives one estimate, another a different
    one; outside ``probes_from`` the probes come from the CNF's ``seed`` (a deterministic log p)."""
    cnf = CNF(2, net=field_2d(seed=11), divergence="hutchinson", n_probes=20, method="rk4", steps=10,
              eval_divergence="exact").double()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    with torch.no_grad():
        exact = cnf.eval()(x)[1]
        cnf.train()
        runs = []
        for seed in range(40):
            with probes_from(torch.Generator().manual_seed(seed)):
                runs.append(cnf(x)[1])
        with probes_from(torch.Generator().manual_seed(0)):
            again = cnf(x)[1]
        default = cnf(x)[1]
    est = torch.stack(runs)  # [40, 4]
    stderr = est.std(0) / math.sqrt(len(runs))
    assert ((est.mean(0) - exact).abs() < 5 * stderr).all(), (est.mean(0), exact, stderr)
    assert (stderr > 1e-4).all()  # a real estimate, not the exact one
    torch.testing.assert_close(again, runs[0])
    assert not torch.equal(runs[0], runs[1])
    torch.testing.assert_close(default, cnf(x)[1])


def test_trainer_lowers_the_heldout_nll_and_reports_the_data_density(tmp_path: Path):
    """100 steps of the shipped config (RK4 training, dopri5 evaluation; 32 units) through the Trainer and
    objective flow_likelihood: held-out NLL falls by more than 1 nat (measured: 2.84 -> ~0.9); the evaluation reports
    the data's own NLL (eight_gaussians' closed form) and samples by the inverse solve."""
    config = load_config(CONFIG, ["train.steps=100", "train.checkpoint_every=100", "train.eval_samples=500"])
    config["model"]["transforms"][0]["net"]["hidden"] = 32
    exp = Experiment.from_config(config)
    held = exp.heldout(500)
    before = heldout_nll(exp.model.eval(), held)["heldout_nll_nats"]
    with Trainer(exp, tmp_path / "run", progress=False) as tr:
        tr.fit()
        after = heldout_nll(tr.sampling_modules()["model"], held)["heldout_nll_nats"]
        metrics = tr.evaluate()
    assert after < before - 1.0, (before, after)
    truth = -float(toy2d_log_prob("eight_gaussians", exp.heldout(500)).mean())
    assert metrics["heldout_nll_nats_data"] == pytest.approx(truth, rel=1e-6)  # float32 data
    assert metrics["heldout_nll_nats"] > truth - 0.1  # no model beats the data's own density by much
    assert metrics["sampler"].startswith("flow inverse")


def test_float32_and_config_build():
    flow = build("model", {"type": "flow", "shape": [2], "transforms": [
        {"type": "cnf", "features": 2, "net": {"type": "concat_mlp", "dim": 2, "width": 16, "time_scale": 1.0},
         "method": "heun2", "steps": 8}]})
    x = torch.randn(5, 2)
    z, logdet = flow(x)
    assert z.dtype == logdet.dtype == torch.float32 and logdet.shape == (5,)
    torch.testing.assert_close(flow.inverse(z)[0], x, rtol=0, atol=1e-3)  # heun2 in 8 steps: not exact
    s = flow.sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 2) and torch.isfinite(s).all()


def test_sampling_integrates_the_velocity_alone():
    """Flow.sample inverts a CNF without its divergence: with a fixed-step solver the samples equal
    inverse()'s first output, in as many field evaluations, with no vector-Jacobian product (exact
    divergence would take one backward pass per coordinate and evaluation)."""
    net = ConcatSquashMLP(2, hidden=16, depth=2)
    cnf = CNF(2, net=net, method="rk4", steps=5, divergence="exact", eval_divergence="exact").eval()
    flow = Flow([2], [cnf])
    backward_calls = []
    hook = net.register_full_backward_hook(lambda *a: backward_calls.append(1))
    s = flow.sample(7, generator=torch.Generator().manual_seed(1))
    assert not backward_calls and cnf.nfe == 20
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, _ = flow.chain.inverse(z)
    hook.remove()
    assert cnf.nfe == 20 and torch.equal(s, x)


def test_class_conditional_field():
    net = ConcatSquashMLP(2, hidden=8, depth=1, num_classes=3)
    flow = Flow([2], [CNF(2, net=net, method="rk4", steps=4)], num_classes=3)
    x, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        net.layers[0].hyper_gate.weight[:, 1:].normal_()  # make the classes' fields differ
        a, b = flow.log_prob(x, labels), flow.log_prob(x, labels.roll(1))
    assert a.shape == (6,) and not torch.allclose(a, b)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown ODE method 'rk45'"):
        CNF(2, method="rk45")
    with pytest.raises(ValueError, match="steps"):
        CNF(2, method="rk4", steps=0)
    with pytest.raises(ValueError, match="rtol"):
        CNF(2, rtol=0.0)
    with pytest.raises(ValueError, match="divergence"):
        CNF(2, divergence="trace")
    with pytest.raises(ValueError, match="probe"):
        CNF(2, divergence="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="n_probes"):
        CNF(2, n_probes=0)
    with pytest.raises(ShapeError, match=r"CNF: expected x: \[B, 2\]"):
        CNF(2)(torch.randn(4, 3))
    with pytest.raises(ShapeError, match="ConcatSquashMLP"):
        CNF(3, net=ConcatSquashMLP(2))(torch.randn(4, 3))
    with pytest.raises(ConfigError, match=r"transforms\[0\].method"):
        build("model", {"type": "flow", "shape": [2], "transforms": [{"type": "cnf", "features": 2, "method": "rk45"}]})
    with pytest.raises(ConfigError, match=r"transforms\[0\].steps"):
        build("model", {"type": "flow", "shape": [2], "transforms": [{"type": "cnf", "features": 2, "steps": -1}]})
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        build("flow_transform", {"type": "cnf", "features": 2, "net": {"type": "nope"}})


def test_concatsquash_layer_by_hand():
    """FFJORD's ConcatSquash layer: (W h + b) * sigmoid(A c + a) + B c, and the MLP feeds c = [t]."""
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, hidden=4, depth=1, activation="tanh")
    x, t = torch.randn(3, 2), torch.tensor([0.1, 0.5, 0.9])

    def layer(m, h, c):
        return (h @ m.layer.weight.T + m.layer.bias) * torch.sigmoid(c @ m.hyper_gate.weight.T + m.hyper_gate.bias) \
            + c @ m.hyper_bias.weight.T

    c = t[:, None]
    torch.testing.assert_close(net(x, t), layer(net.layers[1], torch.tanh(layer(net.layers[0], x, c)), c))


def test_eval_mode_uses_the_eval_solver():
    """Training mode solves with ``method`` (one Euler step: z = (I + A) x), eval mode with ``eval_method``
    (dopri5: expm(A) x)."""
    cnf, a = linear_cnf(method="euler", steps=1, eval_method="dopri5", rtol=1e-10, atol=1e-10)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        trained = cnf.train()(x)[0]
        evaluated = cnf.eval()(x)[0]
    torch.testing.assert_close(trained, x + x @ a.T)
    torch.testing.assert_close(evaluated, x @ torch.from_numpy(scipy.linalg.expm(a.numpy())).T, rtol=0, atol=1e-8)


@pytest.mark.slow
def test_ffjord_toy2d_as_shipped(tmp_path: Path):
    """The config as shipped (2,000 steps, about 140 s of CPU time): held-out NLL within 0.05 nats of the exact
    eight-Gaussians density's (measured: 0.020 above) and samples within 0.06 sliced W2 of held-out data
    (measured 0.040; two held-out draws: 0.042)."""
    exp = Experiment.from_config(load_config(CONFIG))
    with Trainer(exp, tmp_path / "run", progress=False) as tr:
        tr.fit()
        m = tr.evaluate()
    assert m["heldout_nll_nats"] - m["heldout_nll_nats_data"] < 0.05, m
    assert m["sliced_wasserstein"] < 0.06, m
