"""Bad inputs, one table row each: what a user typed or handed over, and a fragment of the one-line
message genlab must answer with.

- ``CLI_CASES``: ``(argv, fragment)`` or ``(argv, fragment, setup)``. ``argv`` is split like a shell
  line after ``{run}`` (a copy of a finished run), ``{toy}`` / ``{digits}`` (the example configs),
  ``{files}`` (the bad files of :data:`FILES`), ``{new}`` (a directory that does not exist) and
  ``{tmp}`` are filled in; ``setup`` names a function of :data:`SETUPS` that damages the run first.
  Each must exit 2 with one line on stderr holding the fragment, no traceback, nothing in the run
  changed and ``{new}`` not created.
- ``COMPONENT_CASES`` (from ``bad_inputs_components``): ``(config, overrides, fragment)``, each a
  ``genlab train`` of that config with those overrides onto ``{run}`` with ``--resume``.
- ``API_CASES`` here and in ``bad_inputs_components``: ``(id, thunk, exception type, fragment)``.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bad_inputs_components import API_CASES as COMPONENT_API_CASES
from bad_inputs_components import CONFIG_CASES as COMPONENT_CASES
from conftest import snapshot_files

from genlab.cli import main
from genlab.core.checkpoint import check_fits, load_weights, save_checkpoint, verify_checkpoint
from genlab.core.config import load_config
from genlab.core.errors import CheckpointError, ConfigError, NonFiniteError, RunDirError
from genlab.core.rundir import RunLock, check_run_dir
from genlab.training import Experiment, Trainer
from genlab.training.experiment import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TOY, DIGITS = ROOT / "configs" / "toy2d.yaml", ROOT / "configs" / "digits.yaml"
TINY = ["train.steps=2", "train.checkpoint_every=1", "train.eval_samples=50", "train.batch_size=16",
        "train.warmup_steps=1", "model.hidden=16", "model.depth=1", "data.n=200", "sampler.steps=2"]
T = "train {toy} " + " ".join(TINY) + " --out {run} --resume"  # a config error must leave that run untouched
S = "sample {run}"

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
FILES: dict[str, str | bytes] = {
    "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
    "bomb.yaml": BOMB,
    "deep.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "recursive.yaml": "a: &a [*a]\n",
    "list.yaml": "- 1\n- 2\n",
    "scalar.yaml": "5\n",
    "tabs.yaml": "a:\n\t- 1\n",
    "unclosed.yaml": "model: {type: mlp\n",
    "tag.yaml": "model: !!python/object/apply:os.system ['echo hi']\n",
    "base_missing.yaml": "base: nope.yaml\n",
    "base_cycle.yaml": "base: base_cycle.yaml\n",
    "base_number.yaml": "base: 5\n",
    "huge.yaml": "# " + "x" * (1 << 20) + "\n",
    "a_file": "not a directory\n",
    "duplicate_section.yaml": "train: {steps: 1}\ntrain: 5\n",
    "section_list.yaml": "process: [vp]\n",
}


def _truncate_newest(run: Path) -> None:
    f = run / "checkpoints" / "step_0000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _damage_all(run: Path) -> None:
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "ema.safetensors").write_bytes(b"\x00" * 16)


def _grids(text: str) -> Callable[[Path], None]:
    return lambda run: (run / "checkpoints" / "step_0000002" / "grids.json").write_text(text)


SETUPS: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate_newest,
    "all damaged": _damage_all,
    "grids not json": _grids("{"),
    "grids a list": _grids("[1, 2]"),
    "grids wrong format": _grids('{"format": "other", "grids": []}'),
    "grids missing keys": _grids('{"format": "genlab.learned_grids", "version": 1}'),
}

CLI_CASES: list[tuple[str, ...]] = [
    # sections that are not what they must be
    (f"{T} train=5", "train: expected a mapping of training settings, got int 5"),
    (f"{T} model=[1]", "model: expected a component name or a mapping with 'type', got list [1]"),
    (f"{T} name=3", "name: expected a string, got int 3"),
    (f"{T} sampler=null", "sampler: expected a component name or a mapping with 'type', got None"),
    (f"{T} process=7", "process: expected a component name or a mapping with 'type', got int 7"),
    (f"{T} data=true", "data: expected a component name or a mapping with 'type', got bool True"),
    (f"{T} objective=[]", "objective: expected a component name or a mapping with 'type', got list []"),
    (f"{T} model.type=5", "model.type: unknown model '5'"),
    ("train {digits} data.control=stroke --out {new}", "data.control: the data set gives control images, but the "
     "model (UNet) takes no control input"),
    # the train section: ranges declared on TrainConfig
    (f"{T} train.grad_accum=0", "train.grad_accum: expected int >= 1, got int 0"),
    (f"{T} train.grad_clip=-1", "train.grad_clip: expected float > 0 or None, got int -1"),
    (f"{T} train.grad_clip=0", "train.grad_clip: expected float > 0 or None, got int 0"),
    (f"{T} train.steps=0", "train.steps: expected int >= 1, got int 0"),
    (f"{T} train.steps=-5", "train.steps: expected int >= 1, got int -5"),
    (f"{T} train.steps=1.5", "train.steps: expected int >= 1, got float 1.5"),
    (f"{T} train.steps=true", "train.steps: expected int >= 1, got bool True"),
    (f"{T} train.ema_decay=.nan", "train.ema_decay: expected float >= 0 and < 1, got float nan"),
    (f"{T} train.ema_decay=2", "train.ema_decay: expected float >= 0 and < 1, got int 2"),
    (f"{T} train.ema_decay=1", "train.ema_decay: expected float >= 0 and < 1, got int 1"),
    (f"{T} train.ema_decay=-0.1", "train.ema_decay: expected float >= 0 and < 1, got float -0.1"),
    (f"{T} train.batch_size=0", "train.batch_size: expected int >= 1, got int 0"),
    (f"{T} train.batch_size=-1", "train.batch_size: expected int >= 1, got int -1"),
    (f"{T} train.lr=-1e-3", "train.lr: expected float > 0, got float -0.001"),
    (f"{T} train.lr=0", "train.lr: expected float > 0, got int 0"),
    (f"{T} train.lr=.inf", "train.lr: expected float > 0, got float inf"),
    (f"{T} train.lr=.nan", "train.lr: expected float > 0, got float nan"),
    (f"{T} train.lr=1e999", "train.lr: expected float > 0, got float inf"),
    (f"{T} train.lr=fast", "train.lr: expected float > 0, got str 'fast'"),
    (f"{T} train.checkpoint_every=0", "train.checkpoint_every: expected int >= 1, got int 0"),
    (f"{T} train.log_every=0", "train.log_every: expected int >= 1, got int 0"),
    (f"{T} train.eval_samples=0", "train.eval_samples: expected int >= 1, got int 0"),
    (f"{T} train.max_bad_steps=0", "train.max_bad_steps: expected int >= 1, got int 0"),
    (f"{T} train.warmup_steps=-1", "train.warmup_steps: expected int >= 0, got int -1"),
    (f"{T} train.weight_decay=-0.1", "train.weight_decay: expected float >= 0, got float -0.1"),
    (f"{T} train.adam_beta1=1.0", "train.adam_beta1: expected float >= 0 and < 1, got float 1.0"),
    (f"{T} train.seed=-1", "train.seed: expected int >= 0 and < 2147483648, got int -1"),
    (f"{T} train.seed=4294967296", "train.seed: expected int >= 0 and < 2147483648, got int 4294967296"),
    (f"{T} train.sample_every=-1", "train.sample_every: expected int >= 0, got int -1"),
    (f"{T} train.mixed_precision=fp8", "train.mixed_precision: expected one of 'no', 'bf16', 'fp16', got str 'fp8'"),
    (f"{T} train.compile=2", "train.compile: expected bool, got int 2"),
    (f"{T} train.tensorboard=[]", "train.tensorboard: expected bool, got list []"),
    (f"{T} train.stpes=3", "train.stpes: unknown key; did you mean 'steps'?"),
    # overrides that are not KEY=VALUE, or whose value is not YAML
    (f"{T} train.lr", "override 'train.lr': expected KEY=VALUE"),
    (f"{T} =3", "override '=3': expected KEY=VALUE"),
    (f"{T} train..lr=3", "override 'train..lr=3': expected KEY=VALUE"),
    (f"{T} train.lr=[1", "override 'train.lr=[1': invalid YAML"),
    (f"{T} model.hidden.x=1", "model.hidden is int 16, not a mapping"),
    # config files that are not configs
    ("train {files}/latin1.yaml", "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 9)"),
    ("train {files}/bomb.yaml", "bomb.yaml: expands to more than 100,000 values through YAML aliases"),
    ("train {files}/deep.yaml", "deep.yaml: nested deeper than 64 levels at line 1"),
    ("train {files}/recursive.yaml", "recursive.yaml: expands to more than 100,000 values"),
    ("train {files}/list.yaml", "list.yaml: top level must be a mapping, got list"),
    ("train {files}/scalar.yaml", "scalar.yaml: top level must be a mapping, got int"),
    ("train {files}/tabs.yaml", "tabs.yaml: invalid YAML at line 2"),
    ("train {files}/unclosed.yaml", "unclosed.yaml: invalid YAML"),
    ("train {files}/tag.yaml", "tag.yaml: invalid YAML at line 1: could not determine a constructor"),
    ("train {files}/base_missing.yaml", "nope.yaml: no such config file (base of base_missing.yaml)"),
    ("train {files}/base_cycle.yaml", "base cycle: base_cycle.yaml -> base_cycle.yaml"),
    ("train {files}/base_number.yaml", "base: expected a file name or list of file names, got int 5"),
    ("train {files}/huge.yaml", "huge.yaml: 1,048,579 characters; a config is at most 1,048,576"),
    ("train {files}/section_list.yaml", "process: expected a component name or a mapping with 'type', got list"),
    ("train {files}", "is a directory, not a config file"),
    ("train {tmp}/nope.yaml", "nope.yaml: no such config file"),
    # run directories
    ("train {toy} --out {files}/a_file", "a_file: is a file; give a directory"),
    ("train {toy} --out {files}/a_file/run", "lies under"),
    ("train {toy} --out /proc/genlab-run", "/proc/genlab-run: cannot create the run directory or its lock"),
    ("train {toy} --out {run}", "holds a run with checkpoints; continue it with --resume"),
    ("train {toy} --out {new} --resume", "no such run directory to resume"),
    ("train {toy} --out {tmp} --resume", "holds no checkpoint to resume from"),
    (f"{T} model.hidden=32", "--resume: model.hidden is 16 in the run"),
    (f"{T} train.batch_size=8", "--resume: train.batch_size is 16 in the run"),
    (f"{T} train.seed=3", "--resume: train.seed is 0 in the run"),
    (f"{T} process.schedule=cosine", "--resume: process.schedule is 'linear' in the run"),
    (f"{T}", "every checkpoint is damaged", "all damaged"),
    # sampling
    (f"{S} --n 0", "argument --n: expected an integer >= 1, got 0"),
    (f"{S} --n -3", "argument --n: expected an integer >= 1, got -3"),
    (f"{S} --n many", "argument --n: expected an integer >= 1, got 'many'"),
    (f"{S} --seed -1", "argument --seed: expected an integer >= 0"),
    (f"{S} --seed 99999999999999999999", "argument --seed: expected an integer >= 0 and < 9223372036854775808"),
    (f"{S} sampler.steps=0", "sampler.steps: expected int >= 1, got int 0"),
    (f"{S} sampler.steps=-1", "sampler.steps: expected int >= 1, got int -1"),
    (f"{S} sampler.type=nope", "sampler.type: unknown sampler 'nope'"),
    (f"{S} model.hidden=24", "[16, 128] in the file and [24, 128] in the model"),
    (f"{S} --out {{files}}/a_file", "a_file: is a file; give a directory"),
    ("sample {new}", "not a run directory with checkpoints/step_N"),
    ("sample {run}/checkpoints/step_0000002", "model.safetensors: 100 bytes", "truncated"),
    (S, "every checkpoint is damaged", "all damaged"),
    (f"{S} sampler.grid=learned", "grids.json: cannot read the learned grids (JSONDecodeError", "grids not json"),
    (f"{S} sampler.grid=learned", "grids.json: not a learned-grids file", "grids a list"),
    (f"{S} sampler.grid=learned", "grids.json: not a learned-grids file (format 'other'", "grids wrong format"),
    (f"{S} sampler.grid=learned", "grids.json: 'grids' must be a list of grid records", "grids missing keys"),
    # other commands and arguments
    ("learn-grid {run} --nfe 0", "argument --nfe: expected an integer >= 1, got 0"),
    ("learn-grid {run} --samples -1", "argument --samples: expected an integer >= 1, got -1"),
    ("learn-grid {run} --reference-steps 0", "argument --reference-steps: expected an integer >= 1"),
    ("learn-grid {new}", "not a run directory with checkpoints/step_N"),
    ("list nospace", "unknown namespace 'nospace'"),
    ("trian {toy}", "argument command: invalid choice: 'trian'"),
    ("train", "the following arguments are required: config"),
    ("sample {run} --bogus", "unrecognized arguments: --bogus"),
]


def _cases() -> list[tuple[tuple[str, ...], tuple[str, ...], str | None]]:
    """(argv, fragments the message must hold, setup) for every command-line case. CLI_CASES are split
    like a shell line; a component case's overrides at spaces (they hold YAML with quotes)."""
    rows = [(tuple(shlex.split(argv)), (fragment,), setup[0] if setup else None) for argv, fragment, *setup in CLI_CASES]
    rows += [(("train", f"{{{cfg}}}", *overrides.split(" "), "--out", "{run}", "--resume"), (f"{cfg}.yaml: ", fragment),
              None) for cfg, overrides, fragment in COMPONENT_CASES]
    return rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", str(TOY), *TINY, "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.parametrize("argv, fragments, setup", _cases(), ids=[" ".join(c[0]) + " | " + c[1][-1] for c in _cases()])
def test_cli_bad_input(capsys, finished, tmp_path, argv, fragments, setup):
    run, files = tmp_path / "run", tmp_path / "files"
    shutil.copytree(finished, run)
    files.mkdir()
    for name, content in FILES.items():
        (files / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if setup:
        SETUPS[setup](run)
    before = snapshot_files(run)
    places = {"run": run, "toy": TOY, "toy2d": TOY, "digits": DIGITS, "files": files, "new": tmp_path / "new",
              "tmp": tmp_path}
    args = []
    for part in argv:
        for key, value in places.items():
            part = part.replace(f"{{{key}}}", str(value))
        args.append(part)
    code = main(args)
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if not line.startswith("genlab: warning:")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("genlab: error: ") and "Traceback" not in err, err
    assert all(fragment in lines[0] for fragment in fragments), err
    assert snapshot_files(run) == before
    assert not (tmp_path / "new").exists()


def _tiny_experiment(*overrides: str) -> Experiment:
    return Experiment.from_config(load_config(TOY, [*TINY, *overrides]))


def _bad_checkpoint(tmp: Path) -> Path:
    d = save_checkpoint(tmp / "step_1", model={"w": torch.ones(3)}, state={"step": 1})
    (d / "model.safetensors").write_bytes(b"junk")
    return d


TMP = Path("/nonexistent-genlab")  # paths below it are refused before anything touches the disk

API_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("TrainConfig steps 0", lambda: TrainConfig(steps=0), ValueError, "TrainConfig: steps must be >= 1, got 0"),
    ("TrainConfig lr nan", lambda: TrainConfig(lr=float("nan")), ValueError, "lr must be > 0, got nan"),
    ("TrainConfig ema 1", lambda: TrainConfig(ema_decay=1.0), ValueError, "ema_decay must be >= 0 and < 1"),
    ("TrainConfig grad_clip -1", lambda: TrainConfig(grad_clip=-1.0), ValueError, "grad_clip must be > 0"),
    ("TrainConfig grad_accum 0", lambda: TrainConfig(grad_accum=0), ValueError, "grad_accum must be >= 1"),
    ("Experiment train section", lambda: Experiment.from_config({"train": 5}), ConfigError,
     "train: expected a mapping of training settings"),
    ("Experiment unknown section", lambda: Experiment.from_config({"trainer": {}}), ConfigError,
     "trainer: unknown key; did you mean 'train'?"),
    ("save NaN weights", lambda: save_checkpoint(TMP / "c", model={"w": torch.tensor([float("nan")])}),
     NonFiniteError, "not checkpointed: non-finite values in model: w"),
    ("save inf ema", lambda: save_checkpoint(TMP / "c", model={"w": torch.ones(1)},
                                             ema={"w": torch.tensor([float("inf")])}),
     NonFiniteError, "ema: w"),
    ("verify missing state", lambda: verify_checkpoint(TMP), CheckpointError, "state.json: unreadable"),
    ("load missing weights", lambda: load_weights(TMP / "model.safetensors"), CheckpointError,
     "not a readable safetensors file"),
    ("check_fits missing file", lambda: check_fits(TMP / "model.safetensors", torch.nn.Linear(2, 2)),
     CheckpointError, "not a readable safetensors file"),
    ("run dir under a file", lambda: check_run_dir(Path(__file__) / "run", resume=False, has_checkpoint=False),
     RunDirError, "which is a file; give a directory"),
    ("run dir is a file", lambda: check_run_dir(Path(__file__), resume=False, has_checkpoint=False),
     RunDirError, "is a file; give a directory"),
    ("resume nothing", lambda: check_run_dir(TMP, resume=True, has_checkpoint=False), RunDirError,
     "no such run directory to resume"),
    ("lock under a file", lambda: RunLock(Path(__file__) / "run"), OSError, "cannot create the run directory"),
]


def _tmp_api_cases(tmp: Path) -> list[tuple[str, Callable[[], object], type[Exception], str]]:
    """Cases that need files on disk (made in ``tmp``)."""
    return [
        ("verify damaged", lambda: verify_checkpoint(_bad_checkpoint(tmp)), CheckpointError,
         "model.safetensors: 4 bytes"),
        ("Trainer resume empty", lambda: Trainer(_tiny_experiment(), tmp / "empty", resume=True), RunDirError,
         "no such run directory to resume"),
    ]


@pytest.mark.parametrize("case", [*API_CASES, *COMPONENT_API_CASES], ids=lambda c: c[0])
def test_api_bad_input(case):
    _, thunk, kind, fragment = case
    with pytest.raises(kind) as info:
        thunk()
    assert fragment in str(info.value)


@pytest.mark.parametrize("index", range(2))
def test_api_bad_input_on_disk(tmp_path, index):
    _, thunk, kind, fragment = _tmp_api_cases(tmp_path)[index]
    with pytest.raises(kind) as info:
        thunk()
    assert fragment in str(info.value)
    assert not (tmp_path / "empty").exists()


def test_the_tables_hold_at_least_150_cases():
    assert len(_cases()) + len(API_CASES) + len(COMPONENT_API_CASES) + 2 >= 150
