"""Consistency distillation (Song et al. 2023, Algorithm 2): the distances, a student distilled from
the exact Gaussian-mixture denoiser, and a run from a trained teacher through the general trainer,
with its target network checkpointed and resumed exactly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.diffusion import EDM, VP, ConsistencyOnDenoiser, ConsistencySampler, Denoiser
from genlab.models import MLP
from genlab.objectives import BuildContext
from genlab.objectives.consistency import ConsistencyDistillation, consistency_distance
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution
from genlab.training import Experiment
from genlab.training.ema import EMA

ROOT = Path(__file__).resolve().parents[1]


def test_the_distances():
    a, b = torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.zeros(2, 2)
    assert consistency_distance(a, b, "l2").tolist() == [12.5, 1.0]
    assert consistency_distance(a, b, "l1").tolist() == [3.5, 1.0]
    huber = consistency_distance(a, b, "pseudo_huber", c=1.0)
    assert torch.allclose(huber, torch.tensor([math.sqrt(26) - 1, math.sqrt(3) - 1]))
    assert consistency_distance(a, b, "pseudo_huber")[0].item() == pytest.approx(5.0, abs=1e-3)  # c = 0.00054 sqrt(2)


def test_one_step_samples_distilled_from_the_exact_mixture_denoiser():
    """Against the exact probability-flow ODE, f(x_T, T) of a student distilled for 1,500 steps is within
    0.25 RMS of the trajectory's end (the mixture's components have std 0.3), and its 1-step samples'
    mean log-density under the mixture is within 0.75 nats of the mixture's own (measured: 0.185 and
    0.54; an untrained student: about 1.1 and 7)."""
    torch.manual_seed(0)
    mixture, process = GaussianMixture.ring(k=4, radius=1.5, std=0.3), EDM()
    teacher = exact_denoiser(mixture, process, "eps")
    model = MLP(dim=2, hidden=64, depth=3, time_embedding="fourier", fourier_scale=4.0)
    objective = ConsistencyDistillation(teacher, steps=18, sigma_data=1.0)
    objective.build(BuildContext(model=model, process=process, data_shape=(2,), sampler=ConsistencySampler(1)))
    target, ema = EMA(model, objective.target_decay, warmup=False), EMA(model, 0.99)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    steps = 1500
    for k in range(steps):
        modules = {"model": model, "teacher": teacher, "target": target.model}
        loss = objective.loss(modules, {"x": mixture.sample(256, generator=g)}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(model)
        ema.update(model)
        opt.param_groups[0]["lr"] = 1e-3 * (1 - k / steps) + 1e-5
    x_T = process.prior((500, 2), generator=torch.Generator().manual_seed(9))
    end = exact_ode_solution(mixture, process, x_T, process.t_max, process.t_min)
    with torch.no_grad():
        f = objective.denoiser(ema.model)(x_T, torch.full((500,), process.t_max, dtype=torch.float64))[0]
    assert (f - end).square().sum(1).mean().sqrt().item() < 0.25
    own = mixture.log_prob(mixture.sample(20000, generator=torch.Generator().manual_seed(3))).mean().item()
    x = ConsistencySampler(1).sample(objective.denoiser(ema.model), shape=(4000, 2),
                                     generator=torch.Generator().manual_seed(7), progress=False)
    assert mixture.log_prob(x).mean().item() > own - 0.75


def test_a_run_from_a_trained_teacher_resumes_exactly_with_its_target_network(tmp_path, capsys):
    tiny = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
            "train.warmup_steps=1"]
    config = str(ROOT / "configs" / "toy2d.yaml")
    teacher = tmp_path / "teacher"
    assert main(["train", config, *tiny, "train.steps=2", "--out", str(teacher), "--quiet"]) == 0
    cd = [*tiny, "objective.type=consistency_distillation", f"objective.teacher={teacher}", "objective.steps=6",
          "objective.solver.type=heun", "sampler.type=consistency", "sampler.steps=2", "train.checkpoint_every=2",
          "train.steps=4"]
    assert main(["train", config, *cd, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sliced Wasserstein" in out
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", split)
    shutil.rmtree(split / "checkpoints" / "step_0000004")
    assert main(["train", config, *cd, "--out", str(split), "--resume", "--quiet"]) == 0
    a, b = latest_checkpoint(tmp_path / "whole"), latest_checkpoint(split)
    for file in ("model.safetensors", "ema.safetensors", "target_target.safetensors"):
        wa, wb = load_weights(a / file), load_weights(b / file)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), file
    assert not (a / "teacher.safetensors").exists()  # frozen: not checkpointed


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_consistency_function_on_a_v_prediction_network(per_sample):
    """f = c_skip x^ + (1 - c_skip) x0_v with x0_v = alpha x - sigma v (Song et al.'s c_skip, sigma_data 0.5,
    sigma_min 0.02), eps = (x - alpha f) / sigma, and f(x, t_min) = x / alpha: against a hand computation."""
    process, sigma_min = VP(), 0.02
    net = torch.nn.Linear(3, 3).double()
    model = lambda x, t_in: net(x) * (1 + t_in[:, None] / 1000)  # noqa: E731 - the time input reaches the output
    f = ConsistencyOnDenoiser(Denoiser(model, process, "v"), sigma_data=0.5, sigma_min=sigma_min)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.1, 0.02], dtype=torch.float64) if per_sample else 0.3
    level = process.level(torch.as_tensor(t, dtype=torch.float64))
    alpha, sigma = (v.reshape(-1, 1) if per_sample else v for v in (level.alpha, level.sigma))
    s = sigma / alpha
    c_skip = 0.25 / ((s - sigma_min) ** 2 + 0.25)
    v = model(x, torch.full((4,), 1000.0) * torch.as_tensor(t, dtype=torch.float64))
    expected = c_skip * x / alpha + (1 - c_skip) * (alpha * x - sigma * v)
    x0, eps = f(x, t)
    assert torch.allclose(x0, expected, atol=1e-12) and torch.allclose(eps, (x - alpha * x0) / sigma, atol=1e-12)
    edge = process.t_of_sigma_edm(torch.tensor(sigma_min, dtype=torch.float64))
    assert torch.allclose(f(x, edge)[0], x / process.level(edge).alpha, atol=1e-12)


def test_a_student_on_its_teachers_parameterisation_starts_at_the_teachers_estimate(tmp_path):
    """``parameterisation: teacher``: initialised from the teacher's weights, f(x, t) = c_skip x^ +
    (1 - c_skip) x0_teacher(x, t) at every level."""
    tiny = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
            "train.warmup_steps=1"]
    config = str(ROOT / "configs" / "toy2d.yaml")
    teacher = tmp_path / "teacher"
    assert main(["train", config, *tiny, "train.steps=2", "--out", str(teacher), "--quiet"]) == 0
    exp = Experiment.from_config(load_config(config, [*tiny, "objective.type=consistency_distillation",
                                                      f"objective.teacher={teacher}", "objective.parameterisation=teacher",
                                                      "sampler.type=consistency"]))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.999, 0.6, 0.3, 0.05, 0.002], dtype=torch.float64)
    level = exp.process.level(t)
    student = exp.objective.denoiser(exp.model)
    s, alpha = (level.sigma_edm - student.sigma_min)[:, None], level.alpha[:, None]
    c_skip = 0.25 / (s**2 + 0.25)
    with torch.no_grad():
        teacher_x0 = exp.objective.teacher_.denoiser(exp.objective.teacher_.module, exp.process)(x, t)[0]
        expected = (c_skip * x / alpha + (1 - c_skip) * teacher_x0).float()
        assert torch.allclose(student(x, t)[0], expected, atol=1e-5)
