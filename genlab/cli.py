"""``genlab train | sample | learn-grid | reflow | distill | list``: the command line.

Bad input (a config, an argument, a file, a run directory) and a run that must stop (non-finite
losses, non-finite samples, a full disk) print one line ``genlab: error: ...`` on stderr and exit
with 2, with no traceback and nothing written or changed in an existing run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import GenlabError

if TYPE_CHECKING:
    from .core.config import ConfigDict
    from .training import Experiment


def _out_dir(config: Path, out: str | None, resume: bool) -> Path:
    """``--out`` or ``runs/<config name>``; without ``--out``, a fresh run takes ``runs/<name>-2``, ``-3``...
    rather than a directory that holds something."""
    from .core.rundir import run_contents

    base = Path(out) if out else Path("runs") / config.stem
    if resume or out or not run_contents(base):
        return base
    i = 2
    while run_contents(base.with_name(f"{base.name}-{i}")):
        i += 1
    return base.with_name(f"{base.name}-{i}")


def cmd_train(args: argparse.Namespace) -> None:
    from .core.config import load_config
    from .training import Experiment, Trainer
    from .training.report import print_report
    from .training.resume import with_stored_pins

    config = load_config(args.config, args.overrides)
    out = _out_dir(Path(args.config), args.out, args.resume)
    if args.resume:  # the checkpoints of teachers / autoencoders the run was built on, not their runs' newest
        config = with_stored_pins(config, out)
    exp = Experiment.from_config(config)
    with Trainer(exp, out, progress=not args.quiet, resume=args.resume) as trainer:
        if trainer.resumed_from is not None:
            print(f"resuming {out} from {trainer.resumed_from.name} (step {trainer.step})")
        obj = exp.objective
        others = "".join(f" and {name}: {_described(module)}" for name, module in obj.modules().items()
                         if name != "model" and name not in obj.frozen)
        trained = obj.modules().get("model", exp.model)
        process = f" on {exp.process!r}" if obj.uses_process else ""
        print(f"training {_described(trained)}{others}{process} for {exp.train.steps} steps -> {out}")
        trainer.fit()
        if trainer.skipped:
            print(f"skipped {trainer.skipped} steps with a non-finite loss or gradient")
        metrics = trainer.evaluate(rows=True)
        if metrics:  # the main process's; under DDP the other ranks sample nothing and report nothing
            print_report(out, metrics)


def _described(module: Any) -> str:
    return f"{type(module).__name__} ({sum(p.numel() for p in module.parameters()):,} parameters)"


def use_stored_grids(config: dict, ckpt: Path) -> None:
    """``sampler.grid=learned`` (without a path) means the grids stored in this checkpoint."""
    sampler = config.get("sampler")
    grid = sampler.get("grid") if isinstance(sampler, dict) else None
    if grid == "learned":
        sampler["grid"] = {"type": "learned", "path": str(ckpt)}
    elif isinstance(grid, dict) and grid.get("type") == "learned" and not grid.get("times"):
        grid.setdefault("path", str(ckpt))


def checkpoint_experiment(path: str, overrides: Sequence[str], *, stored_grids: bool = False,
                          eval_samples: int | None = None) -> tuple[Path, ConfigDict, Experiment]:
    """The checkpoint directory that ``path`` (a run or checkpoint directory) names, its ``config.yaml``
    with ``overrides`` applied, and the Experiment built from that config. ``stored_grids``: apply
    :func:`use_stored_grids`; ``eval_samples`` (if given and not 0) sets ``train.eval_samples``."""
    from .core.checkpoint import resolve_checkpoint
    from .core.config import ConfigDict, apply_overrides, load_config
    from .training import Experiment

    ckpt = resolve_checkpoint(path)
    config = load_config(ckpt / "config.yaml")
    apply_overrides(config, overrides)
    if stored_grids:
        use_stored_grids(config, ckpt)
    config = ConfigDict(config, source=f"{ckpt / 'config.yaml'}")
    if eval_samples:
        config.setdefault("train", {})["eval_samples"] = eval_samples
    return ckpt, config, Experiment.from_config(config)


def cmd_sample(args: argparse.Namespace) -> None:
    from .core.checkpoint import load_state
    from .training.evaluation import evaluate
    from .training.report import print_report
    from .training.resume import load_sampling_weights

    overrides = [prompt_override(o) for o in args.overrides]
    ckpt, config, exp = checkpoint_experiment(args.path, overrides, stored_grids=True, eval_samples=args.n)
    modules = load_sampling_weights(exp, ckpt)
    exp.sampler.timesteps(exp.process)  # a grid that cannot be made (a damaged grids.json) fails before any write
    run = ckpt.parent.parent
    out = Path(args.out) if args.out else run
    if out.exists() and not out.is_dir():
        raise GenlabError(f"--out {out}: is a file; give a directory")
    sampler = config.get("sampler", {})
    kind = sampler if isinstance(sampler, str) else sampler.get("type", "sampler")
    guided = "" if exp.guidance is None else f"-{exp.guidance.tag}"
    prompts = exp.text.cfg.prompts if exp.text is not None else []
    prompted = "-" + re.sub(r"[^a-z0-9]+", "_", " ".join(prompts).lower()).strip("_")[:48] if prompts else ""
    name = f"samples-{kind}-{exp.sampler.steps}steps{guided}{prompted}-seed{args.seed}"
    # the run's own directory is the run's: sampling into it waits for no one, it refuses while a run holds it
    with _run_lock(run, "sampling") if out.resolve() == run.resolve() else contextlib.nullcontext():
        step = load_state(ckpt).get("step", exp.train.steps)  # the checkpoint's own step, not the config's end
        print_report(out, evaluate(exp, modules, out, name, args.seed, step))


def prompt_override(override: str) -> str:
    """``prompt=TEXT`` (a text-conditioned run sampled for one prompt) as ``text_encoder.prompts=[TEXT]``; any
    other override as it is."""
    key, sep, text = override.partition("=")
    if not sep or key.strip() != "prompt":
        return override
    import json

    return f"text_encoder.prompts={json.dumps([text])}"


def _run_lock(run: Path, purpose: str) -> contextlib.AbstractContextManager:
    """The lock of ``run`` if it is a run directory (holds ``checkpoints/``), else nothing to lock."""
    from .core.rundir import RunLock

    return RunLock(run, purpose=purpose) if (run / "checkpoints").is_dir() else contextlib.nullcontext()


def cmd_learn_grid(args: argparse.Namespace) -> None:
    """Learn time grids for a trained model and its sampler; store them in the checkpoint's grids.json."""
    from .training.resume import load_sampling_weights

    ckpt, _, exp = checkpoint_experiment(args.path, args.overrides)
    if exp.objective.takes_control:  # its denoiser would be the base alone, without the control it samples with
        raise GenlabError(f"learn-grid: {args.path} samples with control images (objective controlnet); learn the grid "
                          f"on its base run ({getattr(exp.objective, 'base_source', 'BASE')}) and sample with "
                          "sampler.grid.type=learned sampler.grid.path=BASE")
    load_sampling_weights(exp, ckpt)
    with _run_lock(ckpt.parent.parent, "learn-grid"):  # grids.json goes into the checkpoint
        _learn_grids(args, ckpt, exp)


def _learn_grids(args: argparse.Namespace, ckpt: Path, exp: Experiment) -> None:
    import torch

    from .diffusion.grid_store import save_grid
    from .diffusion.learned_grid import learn_grid, reference_solve, rms_error
    from .training.evaluation import requested_labels

    denoiser, sampler = exp.objective.guided(exp.denoiser()), exp.sampler  # the run's sampler, guided as it samples
    classes = exp.sampled_classes if exp.text is None else None  # labels (a classifier guidance's too), not prompts
    g = torch.Generator().manual_seed(args.seed)
    sets = []
    for n in (max(args.pool, args.samples), args.heldout):  # the training pool, then held-out noise
        labels = requested_labels(exp, -(-n // classes))[:n] if classes else None
        cond = None if labels is None else {"class_labels": labels}
        x = exp.process.prior((n, *exp.data_shape), generator=g)
        sets.append((x, cond, *reference_solve(denoiser, x, args.reference_steps, cond)))
    (x, cond, ref, ref_rms), (x_test, cond_test, ref_test, _) = sets
    guided = "" if exp.guidance is None else f", guided by the run's {exp.guidance!r}"
    print(f"reference: DPM-Solver++ 3M, {args.reference_steps} steps{guided}, estimated RMS error {ref_rms:.2e}")
    for nfe in args.nfe or [sampler.steps * sampler.nfe_per_step]:
        fit = learn_grid(denoiser, sampler, nfe, x=x, reference=ref, samples=args.samples,
                         evaluations=args.evaluations, cond=cond)
        fit.reference_rms = ref_rms
        file = save_grid(ckpt, {**fit.entry(sampler, denoiser, nfe, len(x)),
                                "guidance": None if exp.guidance is None else exp.guidance.tag})
        start, learned = (rms_error(sampler, denoiser, t, x_test, ref_test, cond_test) for t in (fit.start, fit.times))
        print(f"NFE {nfe} ({len(fit.times) - 1} steps of {sampler!r}): RMS to the reference on held-out noise "
              f"{start:.3e} -> {learned:.3e} ({start / learned:.1f}x); training pool {fit.rms_start:.3e} -> "
              f"{fit.rms_learned:.3e}")
    print(f"saved in {file}; use: genlab sample {args.path} sampler.grid.type=learned sampler.grid.path={ckpt} "
          f"sampler.steps=N [the same sampler overrides]")


def cmd_reflow(args: argparse.Namespace) -> None:
    """Draw (source, sample) pairs with a trained flow-matching run and its sampler; store them in the run."""
    import torch

    from .data.pairs import PAIRS_FILE, save_pairs
    from .objectives.flow_matching import ConditionalFlowMatching, straightness
    from .training.resume import load_sampling_weights

    ckpt, _, exp = checkpoint_experiment(args.path, args.overrides)
    if not isinstance(exp.objective, ConditionalFlowMatching):
        raise GenlabError(f"reflow: {args.path} was trained with objective {type(exp.objective).__name__}; reflow "
                          "needs a flow-matching run (objective: cfm)")
    if exp.guidance is not None and exp.sampled_classes is not None:
        raise GenlabError(f"reflow: {args.path} samples with {exp.guidance!r} for class labels, which the pairs file "
                          "does not store; draw unguided pairs (add guidance=null) or train the next flow guided")
    modules = load_sampling_weights(exp, ckpt)  # pairs from the run's sampler, guided as it samples
    denoiser = exp.objective.guided(exp.objective.denoiser(modules["model"], score=modules.get("score")))
    g = torch.Generator().manual_seed(args.seed)
    sources, samples = [], []
    for start in range(0, args.pairs, args.batch):
        x0, _ = exp.objective.draw_source(min(args.batch, args.pairs - start), g)
        sources.append(x0)
        samples.append(exp.sampler.sample(denoiser, x=x0, generator=g, progress=False))
    run = ckpt.parent.parent
    out = Path(args.out) if args.out else run / PAIRS_FILE
    with _run_lock(run, "reflow") if out.parent.resolve() == run.resolve() else contextlib.nullcontext():
        save_pairs(out, torch.cat(sources), torch.cat(samples))
    s = straightness(denoiser, sources[0][:1000])
    print(f"{args.pairs} pairs ({exp.sampler!r}) -> {out}; straightness of this flow (Liu et al. 2023, Eq. 3): {s:.4f}")
    print(f"train the next rectified flow on them: genlab train CONFIG data.type=pairs data.path={out}")


def cmd_distill(args: argparse.Namespace) -> None:
    """Progressive-distillation rounds from a config (objective progressive_distillation, ``distill.rounds``)
    or from a trained run (``--rounds``), each round a run in OUT/round_r; per round and at the end, the
    students' numbers next to the teacher's."""
    from .core.config import load_config
    from .training.distill import config_rounds, distill, run_config, summary

    source = Path(args.source)
    if source.is_dir():
        config = run_config(args.source, args.overrides, args.rounds or 1)
    elif source.exists() or source.suffix in (".yaml", ".yml"):
        config = load_config(source, args.overrides)
    else:
        raise GenlabError(f"distill: {source}: no such config file or run directory")
    rounds = args.rounds or config_rounds(config)
    out = _out_dir(Path(f"{source.stem}-distill") if source.is_dir() else source, args.out, args.resume)
    results = distill(config, out, rounds, resume=args.resume, progress=not args.quiet)
    print(f"{len(results)} rounds in {out}; the students next to the first teacher:")
    print("\n".join(summary(results)))


def cmd_list(args: argparse.Namespace) -> None:
    from .core.registry import describe, registered

    names = [args.namespace] if args.namespace else sorted(registered())
    for ns in names:
        print(f"{ns}:")
        for name, summary in describe(ns):
            print(f"  {name:<20} {summary}")


def _integer(low: int, high: int | None = None) -> Any:
    """An argparse type: an int in [low, high)."""
    wanted = f"an integer >= {low}" + (f" and < {high}" if high is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


_positive, _seed = _integer(1), _integer(0, 2**63)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"genlab: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genlab", description="genlab: train and sample generative models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config; KEY=VALUE overrides any key")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="e.g. train.lr=1e-4 model.hidden=128")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sample", help="sample from a run directory or checkpoint")
    s.add_argument("path")
    s.add_argument("overrides", nargs="*", help="e.g. sampler.type=heun sampler.steps=10")
    s.add_argument("--n", type=_positive, help="number of samples")
    s.add_argument("--seed", type=_seed, default=1234)
    s.add_argument("--out", help="directory for the PNG (default: the run directory, which keeps the training samples.png)")
    s.set_defaults(func=cmd_sample)
    lg = sub.add_parser("learn-grid", help="learn sampler time grids for a trained run (stored in its checkpoint)")
    lg.add_argument("path", help="run directory or checkpoint directory")
    lg.add_argument("overrides", nargs="*", help="sampler to learn for, e.g. sampler.type=dpm_solver_pp sampler.order=3")
    lg.add_argument("--nfe", type=_positive, nargs="+", help="model evaluations per sample (default: the sampler's)")
    lg.add_argument("--samples", type=_positive, default=256, help="noise draws per training batch")
    lg.add_argument("--pool", type=_positive, default=1024, help="noise draws solved by the reference; batches come from it")
    lg.add_argument("--heldout", type=_positive, default=512, help="further noise draws, only to report the error")
    lg.add_argument("--evaluations", type=_positive, default=300, help="forward-backward passes of the sampler (L-BFGS)")
    lg.add_argument("--reference-steps", type=_positive, default=800, help="steps of the DPM-Solver++ 3M reference")
    lg.add_argument("--seed", type=_seed, default=0)
    lg.set_defaults(func=cmd_learn_grid)
    rf = sub.add_parser("reflow", help="draw (source, sample) pairs with a flow-matching run (rectified-flow reflow)")
    rf.add_argument("path", help="run directory or checkpoint directory")
    rf.add_argument("overrides", nargs="*", help="e.g. sampler.type=heun sampler.steps=20")
    rf.add_argument("--pairs", type=_positive, default=10_000, help="number of pairs")
    rf.add_argument("--batch", type=_positive, default=2_000, help="pairs sampled at once")
    rf.add_argument("--seed", type=_seed, default=0)
    rf.add_argument("--out", help="pairs file (default: RUN/pairs.safetensors)")
    rf.set_defaults(func=cmd_reflow)
    d = sub.add_parser("distill", help="progressive-distillation rounds from a config or a trained run")
    d.add_argument("source", help="a config (objective: progressive_distillation) or a trained diffusion run")
    d.add_argument("overrides", nargs="*", help="e.g. train.steps=500 objective.student_steps=8")
    d.add_argument("--rounds", type=_positive, help="rounds, each halving the steps (default: the config's "
                   "distill.rounds; from a run: 1)")
    d.add_argument("--out", help="directory of the rounds, OUT/round_1 ... (default: runs/<config or run name>)")
    d.add_argument("--resume", action="store_true", help="continue: skip finished rounds, resume the unfinished one")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)
    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("namespace", nargs="?")
    ls.set_defaults(func=cmd_list)
    return p


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    print(f"genlab: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 2 (one line on stderr) on bad input or a run that had to stop."""
    p = parser()
    try:
        args, rest = p.parse_known_args(argv)
        # KEY=VALUE overrides may also follow the options (argparse stops collecting them at the first)
        if rest and hasattr(args, "overrides") and not any(r.startswith("-") for r in rest):
            args.overrides, rest = [*args.overrides, *rest], []
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # --help, or a bad argument (already printed)
        return int(e.code or 0)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        args.func(args)
    except GenlabError as e:
        print(f"genlab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no where genlab did not expect it: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"genlab: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
    return 0


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
