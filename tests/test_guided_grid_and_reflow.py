"""``genlab learn-grid`` and ``genlab reflow`` on a run that samples guided (its ``guidance:``): the grid is
learned for the guided sampler (recorded in grids.json), and reflow's pairs come from the guided sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import genlab.diffusion.learned_grid as learned_grid
from genlab.adapters.gradient_guidance import GradientGuided
from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint
from genlab.data.pairs import PAIRS_FILE
from genlab.diffusion.grid_store import GRIDS_FILE, load_grids

ROOT = Path(__file__).resolve().parents[1]
TO_ORIGIN = ["guidance.type=universal", "guidance.loss.type=masked_l2", "guidance.loss.value=0"]


def test_learn_grid_learns_the_guided_samplers_grid(tmp_path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "toy2d.yaml"), "train.steps=30", "train.eval_samples=50", "objective.prediction=x0",
                 "train.batch_size=32", "model.hidden=16", "model.depth=1", "data.n=200", "sampler.steps=3",
                 "--out", str(run), "--quiet"]) == 0
    seen = []
    real = learned_grid.learn_grid
    monkeypatch.setattr(learned_grid, "learn_grid", lambda denoiser, *a, **k: seen.append(denoiser) or real(denoiser, *a, **k))
    capsys.readouterr()
    assert main(["learn-grid", str(run), *TO_ORIGIN, "guidance.scale=0.2", "--nfe", "3", "--samples", "16",
                 "--pool", "16", "--heldout", "16", "--evaluations", "3", "--reference-steps", "20"]) == 0
    assert isinstance(seen[0], GradientGuided) and "guided by the run's UniversalGuidance" in capsys.readouterr().out
    (stored,) = load_grids(latest_checkpoint(run) / GRIDS_FILE)
    assert stored["guidance"] == "universal0.2"


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reflow") / "run"
    assert main(["train", str(ROOT / "configs" / "flow_matching" / "otcfm_moons.yaml"), "train.steps=30",
                 "train.batch_size=64", "train.eval_samples=50", "train.checkpoint_every=30", "sampler.steps=4",
                 "--out", str(run), "--quiet"]) == 0
    return run


def test_reflow_draws_its_pairs_guided(flow_run, tmp_path) -> None:
    pairs = {}
    for name, extra in (("plain", []), ("guided", [*TO_ORIGIN, "guidance.scale=3"])):
        out = tmp_path / f"{name}_{PAIRS_FILE}"
        assert main(["reflow", str(flow_run), *extra, "--pairs", "256", "--out", str(out)]) == 0
        pairs[name] = load_file(str(out))
    assert set(pairs["plain"]) == set(pairs["guided"])
    (source_key,) = [k for k in pairs["plain"] if torch.equal(pairs["plain"][k], pairs["guided"][k])]  # same noise
    (sample_key,) = [k for k in pairs["plain"] if k != source_key]
    norm = {name: p[sample_key].norm(dim=-1).mean().item() for name, p in pairs.items()}
    assert norm["guided"] < 0.8 * norm["plain"]  # pulled towards the origin



def test_reflow_refuses_guidance_for_class_labels(flow_run, tmp_path, capsys, monkeypatch) -> None:
    """A run that samples guided per class (here the moons run told it draws 2 classes) cannot store its labels
    in the pairs file: one line naming guidance=null."""
    from genlab.training import Experiment

    monkeypatch.setattr(Experiment, "sampled_classes", property(lambda self: 2))
    assert main(["reflow", str(flow_run), *TO_ORIGIN, "--pairs", "8"]) == 2
    assert "which the pairs file does not store; draw unguided pairs (add guidance=null)" in capsys.readouterr().err
    assert main(["reflow", str(flow_run), *TO_ORIGIN, "guidance=null", "--pairs", "8",
                 "--out", str(tmp_path / PAIRS_FILE)]) == 0  # unguided pairs, as the message says
