"""Fine-tuning a trained run (DreamBooth, Custom Diffusion, textual inversion as one objective): the
model starts from the run's EMA weights, only the named parameters (or new classes) train, the loss is
the run's own, prior preservation draws from the frozen base; bad patterns are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.training import Experiment

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY = ["model.channels=8", "model.norm_groups=4", "data.image_size=8", "train.batch_size=8", "train.eval_samples=20",
        "train.warmup_steps=1", "sampler.steps=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny class-conditional digits run (2 steps)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", DIGITS, *TINY, "train.steps=2", "--out", str(run), "--quiet"]) == 0
    return run


def finetune(base: Path, *overrides: str) -> Experiment:
    return Experiment.from_config(load_config(DIGITS, [*TINY, "objective.type=finetune", f"objective.base={base}",
                                                       *overrides]))


def test_textual_inversion_trains_only_the_new_class(base, tmp_path):
    out = tmp_path / "ti"
    args = ["objective.trainable=[]", "objective.new_classes=1", "objective.new_class_init=3",
            "objective.instance_label=new", "data.classes=[7]", "data.n=10", "train.steps=3"]
    assert main(["train", DIGITS, *TINY, "objective.type=finetune", f"objective.base={base}", *args,
                 "--out", str(out), "--quiet"]) == 0
    before = load_weights(latest_checkpoint(base) / "ema.safetensors")
    after = load_weights(latest_checkpoint(out) / "model.safetensors")
    assert set(after) == {k.replace("label_embed.embedding.weight", "label_embed.embedding.base.weight")
                          for k in before} | {"label_embed.embedding.new"}
    for key, value in before.items():
        torch.testing.assert_close(after[key.replace("embedding.weight", "embedding.base.weight")], value,
                                   rtol=0, atol=0)
    assert not torch.equal(after["label_embed.embedding.new"][0], before["label_embed.embedding.weight"][3])


def test_the_loss_is_the_base_runs_with_the_instance_label(base):
    exp = finetune(base, "objective.trainable=[]", "objective.new_classes=1", "objective.instance_label=new")
    obj, model = exp.objective, exp.model.eval()  # no label dropout (it draws from the global generator)
    assert obj.label == 11 and obj.trained_names == ["label_embed.embedding.new"]
    x = exp.data.data[:4]
    got = obj.loss({"model": model}, {"x": x, "class_labels": torch.zeros(4, dtype=torch.long)},
                   torch.Generator().manual_seed(5))
    want = obj.teacher.objective(obj.denoiser(model), x, torch.Generator().manual_seed(5),
                                 class_labels=torch.full((4,), 11))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_custom_diffusion_patterns_and_prior_preservation(base):
    exp = finetune(base, "objective.trainable=['*attn.to_k.*', '*attn.to_v.*']", "objective.prior_weight=1.0",
                   "objective.prior_label=3", "objective.prior_samples=6")
    obj = exp.objective
    assert obj.trained_names and all(".attn.to_k." in n or ".attn.to_v." in n for n in obj.trained_names)
    assert obj.frozen == ("base",) and "base" in obj.modules()
    modules = obj.modules()
    images, labels = obj.prior(modules, torch.device("cpu"))
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [3] * 6
    again = obj.teacher.objective.sample({"model": modules["base"]}, 6, torch.Generator().manual_seed(0),
                                         {"class_labels": labels})
    torch.testing.assert_close(images, again, rtol=0, atol=0)  # the base model's own draw, seed 0
    batch = {"x": exp.data.data[:4], "class_labels": exp.data.labels[:4]}
    with_prior = obj.loss(modules, batch, torch.Generator().manual_seed(1))
    obj.prior_weight = 0.0
    without = obj.loss(modules, batch, torch.Generator().manual_seed(1))
    assert with_prior > without  # the prior term adds a positive loss


def test_bad_fine_tunes_are_named(base):
    with pytest.raises(ValueError, match=r"trainable pattern '\*attn2.to_k\*' matches no parameter"):
        finetune(base, "objective.trainable=['*attn2.to_k*']")
    with pytest.raises(ValueError, match="nothing trains"):
        finetune(base, "objective.trainable=[]")
    with pytest.raises(ValueError, match="instance_label 'new' needs new_classes"):
        finetune(base, "objective.instance_label=new")
    with pytest.raises(ValueError, match="architecture"):
        finetune(base, "model.channels=16")
