"""Rectified-flow reflow (Liu et al. 2023): pairs drawn from a trained flow, the next flow trained on
them, and its straightness (Eq. 3) below the first one's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.data.pairs import FlowPairs
from genlab.diffusion import RectifiedFlow
from genlab.objectives.flow_matching import straightness
from genlab.training import Experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flow_matching" / "otcfm_moons.yaml"
SMALL = ["objective.coupling=independent", "objective.path.sigma=0", "train.steps=1500", "train.batch_size=256",
         "train.checkpoint_every=1500", "train.eval_samples=500", "sampler.steps=20"]


def test_straightness_is_zero_for_a_constant_field_and_positive_for_a_curved_one():
    from genlab.diffusion import Denoiser

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    const = Denoiser(lambda x, t: torch.ones_like(x), RectifiedFlow(), "velocity")
    curved = Denoiser(lambda x, t: x * t[:, None] ** 2 / 1000, RectifiedFlow(), "velocity")
    assert straightness(const, x, steps=20) == pytest.approx(0.0, abs=1e-10)
    assert straightness(curved, x, steps=20) > 0.01


def test_reflow_pairs_train_a_straighter_flow(tmp_path, capsys):
    """I-CFM from 8 gaussians to moons (1-RF), 4,000 pairs drawn with its Euler sampler, 2-RF trained on
    them with the same budget: 2-RF's straightness on held-out starts is below 0.1x 1-RF's (measured: 1.12
    against 0.0016)."""
    first, second = tmp_path / "rf1", tmp_path / "rf2"
    assert main(["train", str(CONFIG), *SMALL, "--out", str(first), "--quiet"]) == 0
    assert main(["reflow", str(first), "--pairs", "4000"]) == 0
    out = capsys.readouterr().out
    assert "straightness of this flow" in out and (first / "pairs.safetensors").is_file()
    pairs = FlowPairs(str(first))
    assert pairs.data.shape == pairs.source.shape == (4000, 2)
    assert main(["train", str(CONFIG), *SMALL, "data.type=pairs", f"data.path={first}", "--out", str(second),
                 "--quiet"]) == 0
    def measured(run: Path) -> float:
        exp = Experiment.from_config(load_config(latest_checkpoint(run) / "config.yaml"))
        exp.model.load_state_dict(load_weights(latest_checkpoint(run) / "ema.safetensors"))
        source, _ = exp.objective.draw_source(1000, torch.Generator().manual_seed(5))
        return straightness(exp.objective.denoiser(exp.model.eval()), source)

    s1, s2 = measured(first), measured(second)
    print(f"straightness 1-RF {s1:.4f}, 2-RF {s2:.4f}")
    assert s2 < 0.1 * s1, (s1, s2)
