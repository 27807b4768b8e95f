"""The training spine: the objective interface (a two-optimizer objective trains and resumes exactly),
batches through torch.utils.data in an order that is a function of (seed, epoch, rank), mid-epoch
resume, and a Trainer that knows nothing of diffusion."""

from __future__ import annotations

import ast
import inspect
import shutil
from pathlib import Path

import pytest
import torch

import genlab.testing.toy_objectives  # noqa: F401  (registers toy_gan)
from genlab.core.checkpoint import latest_checkpoint, load_optimizer, load_weights
from genlab.core.config import load_config
from genlab.data.loading import BatchStream, ItemKey, item_seed, training_batches
from genlab.training import Experiment, Trainer
from genlab.training import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy2d.yaml"
TINY = ["train.batch_size=16", "model.hidden=16", "model.depth=1", "data.n=200", "sampler.steps=2",
        "train.eval_samples=50", "train.warmup_steps=1", "train.log_every=1"]


def experiment(*overrides: str) -> Experiment:
    return Experiment.from_config(load_config(CONFIG, [*TINY, *overrides]))


def run(out: Path, *overrides: str, resume: bool = False) -> Trainer:
    with Trainer(experiment(*overrides), out, progress=False, resume=resume) as tr:
        tr.fit()
    return tr


def interrupted(whole: Path, out: Path, step: int) -> Path:
    """``whole``'s run as if killed after its step-``step`` checkpoint: the later checkpoints removed."""
    shutil.copytree(whole, out)
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    return out


def stream(n: int, batch: int, count: int = 12, **kw) -> list[list[int]]:
    it = iter(BatchStream(n, batch, **kw))
    return [next(it) for _ in range(count)]


# ---- batches -------------------------------------------------------------------------------------------

def test_each_epoch_is_a_permutation_seeded_by_seed_and_epoch():
    s = BatchStream(10, 5, seed=3)
    orders = [s.epoch_order(e) for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert orders[0] != orders[1] and s.epoch_order(1) == orders[1]
    assert BatchStream(10, 5, seed=4).epoch_order(0) != orders[0]
    batches = stream(10, 5, seed=3)
    assert batches[:2] == [orders[0][:5], orders[0][5:]] and batches[2] == orders[1][:5]


def test_ranks_take_disjoint_shares_of_each_epoch():
    shares = [BatchStream(11, 2, seed=0, rank=r, world=3).epoch_order(0) for r in range(3)]
    flat = [i for share in shares for i in share]
    assert all(len(share) == 3 for share in shares) and len(set(flat)) == 9  # the tail of 11 % 3 is left out


@pytest.mark.parametrize("n, batch, start", [(10, 3, 0), (10, 3, 4), (10, 3, 7), (7, 5, 3), (3, 8, 2)])
def test_a_stream_started_at_batch_k_continues_the_whole_stream(n, batch, start):
    """Mid-epoch and across epochs (batches larger than the data set included)."""
    whole = stream(n, batch, seed=1, count=start + 6)
    assert stream(n, batch, seed=1, start=start, count=6) == whole[start:]


def test_a_keyed_stream_names_each_items_epoch_and_seed():
    """For data sets that draw per item (``wants_item_keys``): the same order, each index keyed with
    its epoch and the stream's seed, so that a draw keyed on it repeats on resume."""
    keyed, plain = stream(10, 4, seed=2, keys=True, start=2), stream(10, 4, seed=2, start=2)
    assert [[k.index for k in b] for b in keyed] == plain
    assert keyed[0] == [ItemKey(i, 0, 2) for i in plain[0][:2]] + [ItemKey(i, 1, 2) for i in plain[0][2:]]
    assert {k.epoch for k in keyed[-1]} == {5} and {k.seed for b in keyed for k in b} == {2}
    assert item_seed(ItemKey(1, 0, 2)) != item_seed(ItemKey(1, 1, 2)) != item_seed(ItemKey(1, 0, 3))
    assert item_seed(ItemKey(1, 0, 2), salt=1) != item_seed(ItemKey(1, 0, 2))


def test_tensor_data_sets_are_read_a_batch_at_a_time_with_labels():
    exp = Experiment.from_config(load_config(ROOT / "configs" / "digits.yaml", ["data.image_size=8"]))
    batches = iter(training_batches(exp.data, 4, seed=0))
    b = next(batches)
    assert b["x"].shape == (4, 1, 8, 8) and b["class_labels"].shape == (4,)
    order = BatchStream(len(exp.data), 4, seed=0).epoch_order(0)[:4]
    assert torch.equal(b["x"], exp.data.data[order]) and torch.equal(b["class_labels"], exp.data.labels[order])


def test_item_data_sets_go_through_a_data_loader_with_workers():
    class Items(torch.utils.data.Dataset):  # a map-style data set of (x, label) items
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return torch.full((2,), float(i)), torch.tensor(i % 3)

    for workers in (0, 2):
        b = next(iter(training_batches(Items(), 4, seed=5, num_workers=workers)))
        order = BatchStream(9, 4, seed=5).epoch_order(0)[:4]
        assert b["x"][:, 0].tolist() == order and b["class_labels"].tolist() == [i % 3 for i in order]


# ---- the objective interface ---------------------------------------------------------------------------

def test_the_trainer_knows_nothing_of_diffusion():
    tree = ast.parse(inspect.getsource(trainer_module))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any("diffusion" in m or "objectives" in m for m in imported), imported


GAN = ["objective.type=toy_gan", "train.checkpoint_every=2", "train.grad_clip=null", "train.ema_decay=0.9"]


@pytest.mark.parametrize("schedule", ["alternate", "both"])
def test_a_two_optimizer_objective_steps_its_schedule(tmp_path, schedule):
    tr = Trainer(experiment(*GAN, f"objective.schedule={schedule}"), tmp_path, progress=False)
    before = {n: [p.detach().clone() for p in tr.unwrapped(n).parameters()] for n in ("model", "discriminator")}
    tr.train_step()  # step 0
    changed = {n: any(not torch.equal(a, b) for a, b in zip(before[n], tr.unwrapped(n).parameters()))
               for n in before}
    assert changed == {"discriminator": True, "model": schedule == "both"}
    tr.close()


def test_a_two_optimizer_objective_resumes_bit_identical(tmp_path):
    whole = run(tmp_path / "whole", *GAN, "train.steps=6")
    interrupted(tmp_path / "whole", tmp_path / "split", 2)
    resumed = run(tmp_path / "split", *GAN, "train.steps=6", resume=True)
    assert resumed.resumed_from.name == "step_0000002" and resumed.step == 6
    a, b = (latest_checkpoint(tmp_path / d) for d in ("whole", "split"))
    for file in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        wa, wb = load_weights(a / file), load_weights(b / file)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file
    oa, ob = load_optimizer(a), load_optimizer(b)
    assert sorted(oa) == ["discriminator", "model"]
    assert all(torch.equal(x, y) for n in oa for k in oa[n]["state"] for x, y in
               zip(oa[n]["state"][k].values(), ob[n]["state"][k].values()))
    with Trainer(experiment(*GAN, "train.steps=6"), tmp_path / "split", progress=False, resume=True) as tr:
        metrics = tr.evaluate()  # the family's own sampling: the generator's EMA copy
    assert whole.step == 6 and (tmp_path / "split" / "samples.png").is_file() and metrics["sliced_wasserstein"] > 0


def test_resume_in_the_middle_of_an_epoch_and_across_epochs_is_exact(tmp_path):
    """200 items in batches of 16 (12.5 batches an epoch), 3 micro-batches a step: the checkpoint at
    step 3 falls at batch 9, mid-epoch; later steps cross the epoch boundary."""
    args = ["train.steps=7", "train.checkpoint_every=3", "train.grad_accum=3"]
    run(tmp_path / "whole", *args)
    interrupted(tmp_path / "whole", tmp_path / "split", 3)
    run(tmp_path / "split", *args, resume=True)
    a, b = (load_weights(latest_checkpoint(tmp_path / d) / "model.safetensors") for d in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_objective_that_names_an_untrained_module_in_an_optimizer_is_refused(tmp_path, monkeypatch):
    exp = experiment(*GAN)
    monkeypatch.setattr(type(exp.objective), "optimizers", lambda self: {"model": ("model", "critic")})
    with pytest.raises(Exception, match="optimizer 'model' updates"):
        Trainer(exp, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_pretrained_run_loads_as_a_frozen_experiment(tmp_path):
    """What ``teacher: runs/NAME`` gives an objective: the run's own config, validated and built, its
    EMA weights loaded through safetensors, frozen; a path that is no run is a clear error."""
    from genlab.core.errors import GenlabError
    from genlab.training.experiment import load_pretrained

    run(tmp_path / "teacher", "train.steps=2", "train.checkpoint_every=2")
    teacher = load_pretrained(str(tmp_path / "teacher"))
    ema = load_weights(latest_checkpoint(tmp_path / "teacher") / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in teacher.model.state_dict().items())
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.config["model"]["hidden"] == 16
    with pytest.raises(GenlabError, match="not a run directory"):
        load_pretrained(str(tmp_path / "nothing"))
