"""Guided distillation (Meng et al. 2023): a student conditioned on the guidance weight w, zero-initialised so
that it starts as its teacher; its target is the teacher's classifier-free guided x0, exact against a
class-conditional Gaussian mixture; stage two is progressive distillation with w kept as a condition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from genlab.diffusion import VP
from genlab.models import DiT, MLP, UNet
from genlab.objectives import BuildContext, GuidedDistillation, ProgressiveDistillation
from genlab.testing import GaussianMixture, exact_class_denoiser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with every weight moved off its (partly zero) initialisation, so that every input matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


BACKBONES = {
    "unet": lambda **kw: UNet(in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                              norm_groups=8, num_classes=3, **kw),
    "dit": lambda **kw: DiT(input_size=8, in_channels=1, patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=3,
                            **kw),
    "mlp": lambda **kw: MLP(dim=3, hidden=32, depth=2, num_classes=3, **kw),
}


@pytest.mark.parametrize("kind", BACKBONES)
def test_a_student_loaded_from_its_teacher_starts_equal_to_it(kind):
    """The w embedding starts at zero: the student with the teacher's weights computes the teacher's output
    exactly, at every w; the other weights of a seed are those of the model without it; once the embedding's
    output layer moves, w changes the output."""
    torch.manual_seed(0)
    teacher = perturbed(BACKBONES[kind]())
    torch.manual_seed(0)
    student = BACKBONES[kind](guidance_embedding=True)
    torch.manual_seed(0)
    plain = BACKBONES[kind]()
    same_init = plain.state_dict()
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in same_init.items())
    assert {k for k in student.state_dict() if k not in same_init} == {k for k in student.state_dict()
                                                                       if k.startswith("guidance_embed.")}
    student.load_state_dict({**student.state_dict(), **teacher.state_dict()})
    student.eval()
    x = torch.randn(4, 3) if kind == "mlp" else torch.randn(4, 1, 8, 8)
    t, labels = torch.tensor([3.0, 250.0, 600.0, 999.0]), torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        ref = teacher(x, t, labels)
        for w in (1.0, 3.0, torch.tensor([0.0, 1.0, 2.5, 7.0])):
            assert torch.equal(student(x, t, labels, guidance_scale=w), ref)
        nn.init.normal_(student.guidance_embed.linear_2.weight)
        assert (student(x, t, labels, guidance_scale=1.0) - student(x, t, labels, guidance_scale=3.0)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs guidance_scale"):
        student(x, t, labels)
    with pytest.raises(ValueError, match="guidance_embedding=False"):
        teacher(x, t, labels, guidance_scale=2.0)


MIX = GaussianMixture.ring(k=3, radius=1.5, std=0.4)
LABELS = torch.tensor([0, 1, 2, 0, 2, 1])


def component_x0(k: int, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return GaussianMixture(torch.ones(1), MIX.means[k:k + 1], MIX.covs[k:k + 1]).x0(x, alpha, sigma)


class Calls(nn.Module):
    """A teacher model that records the batch sizes of its calls."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.sizes = fn, []

    def forward(self, x, t, **cond):
        self.sizes.append(len(x))
        return self.fn(x, t, **cond)


def objective_with(teacher, student: nn.Module, **kw) -> GuidedDistillation:
    obj = GuidedDistillation(teacher, **kw)
    obj.build(BuildContext(model=student, process=VP(), data_shape=(2,), num_classes=3))
    return obj


def mixture_student() -> MLP:
    return MLP(dim=2, hidden=16, depth=1, num_classes=3, guidance_embedding=True).double()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_guided_target_is_the_closed_form_from_one_batched_call(prediction):
    """With the exact class-conditional mixture as teacher, the target is (1 + w') D(x | c) - w' D(x) with the
    paper's w' = s - 1 for genlab's scale s (computed here from the mixture's x0 directly), per sample, whatever
    the teacher predicts; the teacher is called once on the batch twice over (cond + uncond)."""
    process = VP()
    teacher = exact_class_denoiser(MIX, process, prediction)
    teacher.model = Calls(teacher.model)
    obj = objective_with(teacher, mixture_student())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    level = process.level(torch.linspace(0.05, 0.95, 6, dtype=torch.float64))
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 0.0, 4.5], dtype=torch.float64)
    target = obj.guided_target(teacher, x, level, {"class_labels": LABELS}, s)
    assert teacher.model.sizes == [12]
    uncond = MIX.x0(x, level.alpha, level.sigma)
    cond = torch.stack([component_x0(int(k), x[i:i + 1], level.alpha[i], level.sigma[i])[0]
                        for i, k in enumerate(LABELS)])
    w = (s - 1)[:, None]  # the paper's weight
    torch.testing.assert_close(target, (1 + w) * cond - w * uncond, rtol=1e-9, atol=1e-9)
    assert (cond - uncond).abs().max() > 0.1  # guidance matters at these points


class GuidedMixture(nn.Module):
    """The exact guided teacher as a w-conditioned student: model(x, t, class_labels, guidance_scale) the guided
    prediction out_u + w (out_c - out_u); ``ignore_w`` gives the conditional model at every w."""

    def __init__(self, teacher, ignore_w=False):
        super().__init__()
        self.teacher, self.ignore_w = teacher, ignore_w
        self.guidance_embed, self.config = nn.Identity(), {"class_dropout": 0.0}  # what the objective checks

    def forward(self, x, t, class_labels=None, guidance_scale=None):
        c = self.teacher.model(x, t, class_labels=class_labels)
        if self.ignore_w:
            return c
        u = self.teacher.model(x, t, class_labels=torch.full_like(class_labels, -1))
        return u + torch.as_tensor(guidance_scale, dtype=x.dtype).reshape(-1, 1) * (c - u)


@pytest.mark.parametrize("weighting", ["truncated_snr", "constant"])
def test_the_loss_is_zero_when_the_student_is_the_guided_teacher(weighting):
    teacher = exact_class_denoiser(MIX, VP(), "v")
    batch = {"x": MIX.sample(64, torch.Generator().manual_seed(1), dtype=torch.float64),
             "class_labels": torch.arange(64) % 3}
    losses = []
    for ignore_w in (False, True):
        obj = objective_with(teacher, GuidedMixture(teacher, ignore_w), weighting=weighting, w_min=1.0, w_max=5.0)
        losses.append(float(obj.loss(obj.modules(), batch, torch.Generator().manual_seed(2))))
    assert losses[0] < 1e-20 and losses[1] > 1e-3, losses


def test_bad_students_and_settings_are_refused():
    teacher = exact_class_denoiser(MIX, VP(), "v")
    with pytest.raises(ValueError, match="guidance_embedding: true"):
        objective_with(teacher, MLP(dim=2, num_classes=3))
    with pytest.raises(ValueError, match="class_dropout: 0"):
        objective_with(teacher, UNet(in_channels=1, preset="tiny", num_classes=3, class_dropout=0.1,
                                     guidance_embedding=True))
    with pytest.raises(ValueError, match="w_min"):
        GuidedDistillation(teacher, w_min=3.0, w_max=2.0)


DIGITS_SMALL = ["model.channels=8", "model.channel_mult=[1]", "model.attention_levels=[]", "train.eval_samples=20",
                "train.steps=2", "sampler.steps=3", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny digits teacher run and the stage-one config distilled from it (two steps each): the stage-one run."""
    from genlab.cli import main

    root = tmp_path_factory.mktemp("guided")
    teacher, stage1 = root / "teacher", root / "stage1"
    assert main(["train", str(CONFIGS / "digits.yaml"), *DIGITS_SMALL, "--out", str(teacher), "--quiet"]) == 0
    assert main(["train", str(CONFIGS / "distill" / "guided_digits.yaml"), *DIGITS_SMALL,
                 f"objective.teacher={teacher}", "--out", str(stage1), "--quiet"]) == 0
    return stage1


def test_guided_digits_then_stage_two(stage1, tmp_path, capsys):
    """The stage-one run of a tiny teacher, then stage two (progressive distillation) from it: w stays a condition
    (its range read from the teacher run), the evaluation rows name the teacher with CFG, ``genlab sample RUN
    guidance.scale=5`` sets w, and settings a w-student cannot honour are one line on stderr."""
    from genlab.cli import main
    from genlab.core.config import load_config
    from genlab.training import Experiment

    metrics = json.loads((stage1 / "samples.json").read_text())
    assert "at guidance_scale=3 (w an input" in metrics["sampler"] and "CFG" not in metrics["sampler"]
    assert [r["label"] for r in metrics["rows"]] == ["teacher"] and "CFG(scale=3" in metrics["rows"][0]["sampler"]
    capsys.readouterr()
    assert main(["sample", str(stage1), "guidance.scale=5", "--n", "20", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples-ddpm-3steps-cfg5-seed1234.json").is_file()
    assert main(["sample", str(stage1), "guidance.rescale=0.5", "--n", "20", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "samples with guidance: {scale: w} alone" in err and len(err.strip().splitlines()) == 1

    config = load_config(CONFIGS / "distill" / "guided_progressive_digits.yaml",
                         [*DIGITS_SMALL, f"objective.teacher={stage1}", "objective.student_steps=2"])
    exp = Experiment.from_config(config)
    assert isinstance(exp.objective, ProgressiveDistillation) and exp.objective.guidance_range == (1.0, 5.0)
    seen = []
    exp.objective.teacher_.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance_scale"]),
                                                            with_kwargs=True)
    exp.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance_scale"]), with_kwargs=True)
    batch = {"x": exp.data.data[:4], "class_labels": exp.data.labels[:4]}
    exp.objective.loss(exp.objective.modules(), batch, torch.Generator().manual_seed(0))
    assert len(seen) == 3 and all(torch.equal(s, seen[0]) for s in seen)  # two teacher steps, one student call
    assert ((seen[0] >= 1) & (seen[0] <= 5)).all() and seen[0].unique().numel() == 4
    samples = exp.objective.sample(exp.objective.modules(), 4, torch.Generator().manual_seed(0),
                                   cond={"class_labels": torch.arange(4)})
    assert samples.shape == (4, 1, 16, 16) and seen[-1] == 3.0  # sampled at guidance.scale


@pytest.mark.slow
def test_genlab_distill_runs_stage_two_rounds(stage1, tmp_path, capsys):
    """``genlab distill`` of the stage-two config: two rounds (2 -> 1 DDIM steps), each student sampled at the
    config's w in one call per step."""
    from genlab.cli import main

    config = CONFIGS / "distill" / "guided_progressive_digits.yaml"
    assert main(["distill", str(config), *DIGITS_SMALL, f"objective.teacher={stage1}", "objective.student_steps=2",
                 "--rounds", "2", "--out", str(tmp_path / "stage2"), "--quiet"]) == 0
    for r in (1, 2):
        metrics = json.loads((tmp_path / "stage2" / f"round_{r}" / "samples.json").read_text())
        assert "at guidance_scale=3 (w an input" in metrics["sampler"] and metrics["steps"] == 2 // r
        assert "at guidance_scale=3 (w an input" in metrics["rows"][0]["sampler"]  # the teacher: a w-student too


def test_stage_two_needs_a_student_that_takes_w():
    teacher = exact_class_denoiser(MIX, VP(), "v")
    obj = ProgressiveDistillation(teacher, student_steps=2, guidance_range=[1.0, 5.0])
    with pytest.raises(ValueError, match="guidance_embedding: true"):
        obj.build(BuildContext(model=MLP(dim=2, num_classes=3), process=VP(), data_shape=(2,), num_classes=3))
    with pytest.raises(ValueError, match="guidance_range"):
        ProgressiveDistillation(teacher, student_steps=2, guidance_range=[5.0, 1.0])
