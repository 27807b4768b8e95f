"""Latent diffusion in training configs (``latent:``): a tiny autoencoder run trained for two steps, then a latent
denoising run on its latents: the objective sees latents, the model is built for them, samples come back as
images of the data's shape and are scored as images, a resumed run equals an uninterrupted one bit for bit, the
autoencoder is neither changed nor checkpointed, flow matching works unchanged, a diffusers AutoencoderKL
directory works as well, ``genlab sample`` works on the run, a bad path is one clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.training import Experiment, Trainer
from genlab.training import evaluation
from genlab.training.latent import LatentConfig, LatentSpace

ROOT = Path(__file__).resolve().parents[1]
VAE = ROOT / "configs" / "autoencoders" / "vae_digits.yaml"
LDM = ROOT / "configs" / "latent" / "ldm_digits.yaml"
TINY_VAE = ["model.block_out_channels=[8, 8]", "model.norm_groups=4", "data.image_size=16", "train.steps=2",
            "train.batch_size=8", "train.checkpoint_every=2", "train.warmup_steps=1"]
TINY_LDM = ["data.image_size=16", "model.channels=8", "model.channel_mult=[1]", "model.attention_levels=[]",
            "model.norm_groups=4", "train.batch_size=8", "train.steps=4", "train.checkpoint_every=2",
            "train.warmup_steps=1", "train.log_every=1", "train.eval_samples=20", "sampler.steps=2"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """A KL autoencoder run on 16x16 digits (f = 2: latents [4, 8, 8]), two steps, its scaling fitted."""
    out = tmp_path_factory.mktemp("vae") / "run"
    with Trainer(Experiment.from_config(load_config(VAE, TINY_VAE)), out, progress=False) as tr:
        tr.fit()
    return out


def experiment(vae: Path | str, *overrides: str) -> Experiment:
    return Experiment.from_config(load_config(LDM, [*TINY_LDM, f"latent.autoencoder={vae}", *overrides]))


def fit(out: Path, vae: Path, *overrides: str, resume: bool = False) -> Trainer:
    with Trainer(experiment(vae, *overrides), out, progress=False, resume=resume) as tr:
        tr.fit()
    return tr


def test_the_model_is_built_for_latents_and_the_objective_sees_them(vae_run, tmp_path, monkeypatch):
    exp = experiment(vae_run)
    assert exp.image_shape == (1, 16, 16) and exp.data_shape == (4, 8, 8)
    assert exp.model(torch.zeros(2, 4, 8, 8), torch.ones(2), class_labels=torch.zeros(2, dtype=torch.long)).shape \
        == (2, 4, 8, 8)
    seen = []
    loss = type(exp.objective).loss
    monkeypatch.setattr(type(exp.objective), "loss",
                        lambda self, modules, batch, g, opt="model": seen.append(batch["x"].shape) or
                        loss(self, modules, batch, g, opt))
    with Trainer(exp, tmp_path / "run", progress=False) as tr:
        tr.fit()
        scored = []
        metrics_of = evaluation.image_metrics
        monkeypatch.setattr(evaluation, "image_metrics",
                            lambda e, samples, labels: scored.append(samples.shape) or metrics_of(e, samples, labels))
        metrics = tr.evaluate()
    assert seen == [(8, 4, 8, 8)] * 4
    assert scored == [(20, 1, 16, 16)]  # decoded before they are scored
    assert {"classifier_accuracy", "frechet_distance"} <= metrics.keys()
    assert (tmp_path / "run" / "samples.png").is_file()


def test_training_draws_the_latents_from_the_steps_generator(vae_run):
    exp = experiment(vae_run)
    x = exp.data.data[:4]
    a, b, c = (exp.latent.encode({"x": x}, torch.Generator().manual_seed(s))["x"] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ae = exp.latent.autoencoder
    assert torch.equal(a, ae.to_latent(x, torch.Generator().manual_seed(0)))
    mode = experiment(vae_run, "latent.sample=false").latent.encode({"x": x}, None)["x"]
    assert torch.allclose(mode, (ae.posterior(x)[0] - ae.shift_factor) * ae.scaling_factor)
    assert ae.scaling_factor.item() != 1.0  # fitted at the end of the autoencoder's training


def test_a_resumed_latent_run_equals_an_uninterrupted_one(vae_run, tmp_path):
    fit(tmp_path / "whole", vae_run)
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_0000004")
    fit(tmp_path / "split", vae_run, resume=True)
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = (load_weights(latest_checkpoint(tmp_path / d) / file) for d in ("whole", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_the_autoencoder_is_frozen_unchanged_and_not_checkpointed(vae_run, tmp_path):
    exp = experiment(vae_run)
    before = {k: v.clone() for k, v in exp.latent.autoencoder.state_dict().items()}
    with Trainer(exp, tmp_path / "run", progress=False) as tr:
        tr.fit()
    ae = exp.latent.autoencoder
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    assert all(torch.equal(before[k], v) for k, v in ae.state_dict().items())
    saved = load_weights(latest_checkpoint(vae_run) / "ema.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in ae.state_dict().items())  # the run's EMA weights
    ckpt = latest_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["ema.safetensors", "model.safetensors"]
    assert not any(k.startswith(("encoder.", "decoder.")) for k in load_weights(ckpt / "model.safetensors"))


def test_flow_matching_works_unchanged_on_latents(vae_run, tmp_path):
    tr = fit(tmp_path / "run", vae_run, "process=rectified_flow", "objective.type=flow_matching",
             "objective.prediction=velocity", "sampler={type: flow_euler, steps: 2}", "train.steps=1")
    metrics = tr.evaluate()
    assert metrics["steps"] == 2 and "frechet_distance" in metrics


def test_genlab_sample_decodes_a_latent_run(vae_run, tmp_path, capsys):
    fit(tmp_path / "run", vae_run, "train.steps=2")
    assert main(["sample", str(tmp_path / "run"), "--n", "20", "--out", str(tmp_path / "more")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert any(p.suffix == ".png" for p in (tmp_path / "more").iterdir())


def test_a_diffusers_autoencoder_directory_works(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=4,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline directory's vae/ (no model_index.json)
    exp = experiment(tmp_path / "pipe")
    assert exp.data_shape == (4, 8, 8) and exp.latent.autoencoder.scaling_factor.item() == 0.5
    with Trainer(exp, tmp_path / "run", progress=False) as tr:
        tr.train_step()


def test_a_bad_autoencoder_path_is_one_clear_error(vae_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"latent.autoencoder: .*{tmp_path / 'nothing'}"):
        experiment(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"multiples of 2; the data's items are \[1, 9, 9\]"):
        LatentSpace(LatentConfig(str(vae_run)), (1, 9, 9))
    with pytest.raises(ConfigError, match="latent: expected a mapping"):
        experiment(vae_run, "latent=runs/vae")
    code = main(["train", str(LDM), f"latent.autoencoder={tmp_path / 'nothing'}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "nothing") in err
    assert not (tmp_path / "run").exists()
