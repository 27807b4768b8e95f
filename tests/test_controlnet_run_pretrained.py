"""A ControlNet run (objective ``controlnet``) where genlab loads trained runs: ``load_pretrained`` gives the
base with the ControlNet as one model (what the run samples), ``genlab sample RUN`` draws with the held-out
controls, and as the ``base`` of another ControlNet or fine-tuning run (or for learn-grid) it is a one-line error
naming the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.adapters.controlled import ControlledModel
from genlab.cli import main
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.training import Experiment, Trainer
from genlab.training.experiment import load_pretrained
from genlab.training.resume import load_sampling_weights

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
CONTROLNET = str(ROOT / "configs" / "controlnet" / "controlnet_digits.yaml")
TINY = ["model.channels=8", "model.norm_groups=4", "train.batch_size=8", "train.eval_samples=20",
        "train.warmup_steps=1", "train.steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A two-step digits base run and a two-step ControlNet run on it (its zero convs moved once)."""
    root = tmp_path_factory.mktemp("controlnet_run")
    with Trainer(Experiment.from_config(load_config(DIGITS, TINY)), root / "base", progress=False) as t:
        t.fit()
    exp = Experiment.from_config(load_config(CONTROLNET, [*TINY, f"objective.base={root / 'base'}", "train.lr=0.05"]))
    with Trainer(exp, root / "cn", progress=False) as t:
        t.fit()
    return root / "base", root / "cn"


def test_a_controlnet_run_loads_whole(runs) -> None:
    base, cn = runs
    run = load_pretrained(str(cn))
    assert isinstance(run.model, ControlledModel) and not any(p.requires_grad for p in run.model.parameters())
    again = Experiment.from_config(load_config(str(cn / "config.yaml")))
    ckpt = sorted((cn / "checkpoints").iterdir())[-1]
    modules = load_sampling_weights(again, ckpt)
    g = torch.Generator().manual_seed(0)
    x, y, c = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 3]), (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        whole = run.denoiser()(x, t, class_labels=y, control=c)[0]
        trained = again.objective.denoiser(again.objective.controlled(modules))(x, t, class_labels=y, control=c)[0]
        plain = run.denoiser()(x, t, class_labels=y)[0]
    torch.testing.assert_close(whole, trained, rtol=0, atol=0)  # what the run samples with
    assert not torch.allclose(whole, plain)  # the control acts (the ControlNet's weights are loaded)


def test_genlab_sample_draws_a_controlnet_run_with_controls(runs, tmp_path, capsys) -> None:
    assert main(["sample", str(runs[1]), "--n", "10", "--out", str(tmp_path)]) == 0
    assert "IoU of the samples' controls" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["controlnet", "finetune"])
def test_a_controlnet_run_as_a_base_names_its_base(runs, objective) -> None:
    base, cn = runs
    config = CONTROLNET if objective == "controlnet" else DIGITS
    extra = [] if objective == "controlnet" else ["objective.type=finetune", "objective.trainable=null"]
    with pytest.raises(ConfigError, match=rf"base: {cn} was trained with objective ControlNetTraining.*name the base run \({base}\)"):
        Experiment.from_config(load_config(config, [*TINY, *extra, f"objective.base={cn}"]))


def test_learn_grid_sends_a_controlnet_run_to_its_base(runs, capsys) -> None:
    base, cn = runs
    assert main(["learn-grid", str(cn), "--nfe", "2"]) == 2
    assert f"learn the grid on its base run ({base})" in capsys.readouterr().err
