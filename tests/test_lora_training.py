"""The ``adapters:`` config section: fine-tuning a trained run through LoRA updates the adapter alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.training import Experiment, Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml"
TINY = ["train.batch_size=64", "model.hidden=32", "model.depth=1", "data.n=500", "sampler.steps=2",
        "train.eval_samples=100", "train.warmup_steps=1", "train.steps=3", "train.checkpoint_every=3"]


def _fit(run: Path, *overrides: str) -> dict[str, torch.Tensor]:
    trainer = Trainer(Experiment.from_config(load_config(CONFIG, [*TINY, *overrides])), run, progress=False)
    trainer.fit()
    return load_weights(latest_checkpoint(run) / "model.safetensors")


def test_lora_fine_tuning_trains_only_the_adapter(tmp_path) -> None:
    base = _fit(tmp_path / "base")
    ema = load_weights(latest_checkpoint(tmp_path / "base") / "ema.safetensors")
    tuned = _fit(tmp_path / "tuned", f"adapters.base={tmp_path / 'base'}", "adapters.lora.target=['*blocks.*.out.*']",
                 "adapters.lora.rank=2", "train.lr=0.05")
    adapter = {k for k in tuned if ".lora." in k}
    assert adapter and set(tuned) - adapter == set(base)
    assert all(torch.equal(tuned[k], ema[k]) for k in base)  # the base weights: the base run's EMA, untouched
    assert any(k.endswith(".B") and tuned[k].abs().max() > 0 for k in adapter)  # B left zero: the adapter trained
    pinned = load_config(latest_checkpoint(tmp_path / "tuned") / "config.yaml")["pinned"]  # the base's checkpoint
    assert pinned[str(tmp_path / "base")]["checkpoint"] == latest_checkpoint(tmp_path / "base").name
    back = Experiment.from_config(load_config(CONFIG, [*TINY, f"adapters.base={tmp_path / 'base'}",
                                                       "adapters.lora.target=['*blocks.*.out.*']",
                                                       "adapters.lora.rank=2"]))
    back.model.load_state_dict(tuned)  # a fine-tuned checkpoint loads into the model its config builds


@pytest.mark.parametrize("override,message", [
    ("adapters.lora.rnak=2", "adapters.lora.rnak: unknown key; did you mean 'rank'"),
    ("adapters.lora.target=['*nothing*']", "adapters.lora: LoRA target '\\*nothing\\*' matches no"),
    ("adapters.lroa.rank=2", "adapters.lroa: unknown key; did you mean 'lora'"),
    ("adapters.base=/no/such/run", "adapters.base: /no/such/run: not a run directory"),
])
def test_bad_adapter_sections_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Experiment.from_config(load_config(CONFIG, [*TINY, "adapters.lora.target=['*out*']", override]))
