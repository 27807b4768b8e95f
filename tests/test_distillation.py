"""Progressive distillation (Salimans & Ho 2022): the target, a student against the exact ODE solution
of a Gaussian mixture, and a round driven by a config from a trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.diffusion import DDIM, VP
from genlab.models import MLP
from genlab.objectives import BuildContext
from genlab.objectives.distillation import ProgressiveDistillation, distillation_target
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution
from genlab.training import Experiment

ROOT = Path(__file__).resolve().parents[1]


def test_one_ddim_step_with_the_target_lands_on_the_teachers_point():
    g = torch.Generator().manual_seed(0)
    z_t, z_next = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a_t, s_t = torch.rand(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    a_n, s_n = a_t + 0.3, s_t * 0.4
    s_n[0] = 0.0  # the last step: the target is the teacher's point itself
    x = distillation_target(z_t, z_next, (a_t, s_t), (a_n, s_n))
    eps = (z_t - a_t[:, None] * x) / s_t[:, None]  # DDIM: the eps implied by (z_t, x0 = x)
    landed = a_n[:, None] * x + s_n[:, None] * eps
    assert torch.allclose(landed, z_next, atol=1e-12)
    assert torch.allclose(x[0], z_next[0] / a_n[0], atol=1e-15)


def test_a_student_at_n_steps_is_within_1_5x_of_its_teacher_at_2n():
    """The exact mixture denoiser (v prediction) teaches an MLP; against the exact probability-flow ODE
    solution, the student's 4 DDIM steps are within 1.5x of the teacher's 8, and beat the teacher's 4."""
    torch.manual_seed(0)
    mixture, process = GaussianMixture.ring(k=4, radius=1.5, std=0.3), VP()
    teacher = exact_denoiser(mixture, process, "v")
    model = MLP(dim=2, hidden=48, depth=3)
    objective = ProgressiveDistillation(teacher, student_steps=4)
    objective.build(BuildContext(model=model, process=process, data_shape=(2,)))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    steps = 500
    for k in range(steps):
        loss = objective.loss({"model": model, "teacher": teacher}, {"x": mixture.sample(256, generator=g)}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        opt.param_groups[0]["lr"] = 2e-3 * (1 - k / steps) + 1e-5
    x_T = process.prior((2000, 2), generator=torch.Generator().manual_seed(5))
    exact = exact_ode_solution(mixture, process, x_T, process.t_max, 0.0)
    times = objective.times
    with torch.no_grad():
        teacher_2n = DDIM(8).sample(teacher, x_T.clone(), times=times, progress=False)
        teacher_n = DDIM(4).sample(teacher, x_T.clone(), times=times[::2], progress=False)
        student = DDIM(4).sample(objective.denoiser(model), x_T.clone(), times=times[::2], progress=False)

    def rms(x: torch.Tensor) -> float:
        return (x - exact).square().sum(1).mean().sqrt().item()

    assert rms(student) <= 1.5 * rms(teacher_2n), (rms(student), rms(teacher_2n))
    assert rms(student) < rms(teacher_n), (rms(student), rms(teacher_n))


def test_a_round_from_a_trained_run(tmp_path, capsys):
    """``objective: {type: progressive_distillation, teacher: RUN}``: the student starts as the
    teacher's EMA weights, keeps its parameterisation, trains through the general trainer and samples
    in N steps; a teacher on another process is refused."""
    tiny = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
            "train.warmup_steps=1", "sampler.type=ddim", "sampler.steps=4", "sampler.grid=uniform"]
    teacher = tmp_path / "teacher"
    assert main(["train", str(ROOT / "configs" / "toy2d.yaml"), *tiny, "objective.prediction=v", "train.steps=4",
                 "--out", str(teacher), "--quiet"]) == 0
    distill = [*tiny, "objective.type=progressive_distillation", f"objective.teacher={teacher}",
               "objective.student_steps=2", "sampler.steps=2"]
    exp = Experiment.from_config(load_config(ROOT / "configs" / "toy2d.yaml", distill))
    ema = load_weights(latest_checkpoint(teacher) / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in exp.model.state_dict().items())
    assert exp.objective.denoiser(exp.model).prediction == "v" and len(exp.objective.times) == 5
    code = main(["train", str(ROOT / "configs" / "toy2d.yaml"), *distill, "train.steps=3", "--out",
                 str(tmp_path / "student"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "sliced Wasserstein" in out, err
    code = main(["train", str(ROOT / "configs" / "toy2d.yaml"), *distill, "process.schedule=cosine",
                 "--out", str(tmp_path / "wrong")])
    assert code == 2 and "the teacher was trained on VP" in capsys.readouterr().err


@pytest.mark.parametrize("weighting, expected", [("truncated_snr", [4.0, 1.0, 1.0]), ("snr", [4.0, 1.0, 0.25]),
                                                 ("constant", [1.0, 1.0, 1.0])])
def test_the_weightings(weighting, expected):
    """Truncated SNR (Salimans & Ho 2022, Eq. 10) is max(SNR, 1)."""
    objective = ProgressiveDistillation(exact_denoiser(GaussianMixture.ring(), VP()), 2, weighting=weighting)
    alpha, sigma = torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 2.0])
    assert objective.weight(alpha, sigma).tolist() == expected
