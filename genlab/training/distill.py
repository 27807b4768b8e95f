"""Progressive distillation in rounds (Salimans & Ho 2022, Algorithm 2, repeated): ``genlab distill``.

Round r trains a student in N_r = N_1 / 2^(r - 1) DDIM steps whose teacher is round r - 1's student
(round 1's: the config's teacher, or the trained run distilled), each round a run of its own in
``OUT/round_r`` with the objective ``progressive_distillation``: locked, checkpointed atomically and
resumable as every run. All rounds keep one time grid (the config's ``objective.grid``, else the first
teacher's sampler grid), so that the N_r-step grid a student learns on is the grid its own student's
teacher runs (exactly so for grids spaced uniformly in some variable: ``uniform``, ``log_snr``).

With ``resume``, a round whose final evaluation is written is skipped, an unfinished one continues
from its newest intact checkpoint, and one killed before its first checkpoint starts again.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.checkpoint import latest_checkpoint, resolve_checkpoint
from ..core.config import ConfigDict, apply_overrides, load_config
from ..core.errors import ConfigError, GenlabError
from ..core.registry import construct, lookup
from ..core.rundir import RunLock, check_run_dir, run_contents
from .evaluation import table
from .experiment import DistillConfig, Experiment, check_section
from .trainer import Trainer

OBJECTIVE = "progressive_distillation"
EARLY_FILES = {"config.yaml", "loss.png"}  # what a run writes before its first checkpoint


@dataclass
class Round:
    """Round ``index`` (1-based): its student's ``steps``, run directory and config."""

    index: int
    steps: int
    out: Path
    config: ConfigDict


def teacher_grid(teacher: str) -> Any:
    """The grid spec of a trained run's sampler (its config's ``sampler.grid``, else the sampler's default)."""
    sampler = load_config(resolve_checkpoint(teacher) / "config.yaml").get("sampler", "unipc")
    sampler = {"type": sampler} if isinstance(sampler, str) else dict(sampler)
    grid = sampler.get("grid") or lookup("sampler", sampler.get("type", "unipc"), path="sampler.type").default_grid
    return grid if isinstance(grid, str) else dict(grid)


def plan_rounds(config: ConfigDict, out: Path, rounds: int) -> list[Round]:
    """The config of every round from ``config`` (objective ``progressive_distillation``, its
    ``student_steps`` N_1 round 1's): teacher, student steps, the shared grid, and a DDIM sampler in the
    round's steps (what the student samples with: the next round's teacher). ConfigError, nothing
    written, if N_1 is not divisible by 2^(rounds - 1)."""
    source = getattr(config, "source", "config")
    objective = config.get("objective")
    kind = objective if isinstance(objective, str) else (objective or {}).get("type")
    if kind != OBJECTIVE:
        raise ConfigError(f"{source}: objective: genlab distill needs objective type {OBJECTIVE}, got {kind!r}")
    first, teacher = objective.get("student_steps"), objective.get("teacher")
    if not isinstance(first, int) or isinstance(first, bool) or first < 1 or teacher is None:
        return []  # building the experiment names the missing or bad key
    if first % 2 ** (rounds - 1):
        raise ConfigError(f"{source}: objective.student_steps: {rounds} rounds halve the steps {rounds - 1} times; "
                          f"{first} steps are not divisible by {2 ** (rounds - 1)} (use a multiple, e.g. "
                          f"{2 ** (rounds - 1)}, or fewer rounds)")
    grid = objective.get("grid") or teacher_grid(str(teacher))
    plan = []
    for r in range(1, rounds + 1):
        cfg = ConfigDict(copy.deepcopy({k: v for k, v in config.items() if k != "distill"}), source=source)
        steps = first >> (r - 1)
        cfg["objective"].update(teacher=str(teacher) if r == 1 else str(out / f"round_{r - 1}"),
                                student_steps=steps, grid=copy.deepcopy(grid))
        cfg["sampler"] = {"type": "ddim", "steps": steps, "grid": copy.deepcopy(grid)}
        cfg["name"] = f"{config.get('name', 'distill')}-round{r}"
        plan.append(Round(r, steps, out / f"round_{r}", cfg))
    return plan


def config_rounds(config: ConfigDict) -> int:
    """``distill.rounds`` of ``config`` (1 without a ``distill`` section); ConfigError naming a bad value."""
    source = getattr(config, "source", "config")
    section = config.get("distill")
    check_section("distill", section, source)
    return construct(DistillConfig, section or {}, path="distill", source=source).rounds


def run_config(run: str, overrides: list[str], rounds: int) -> ConfigDict:
    """The distillation config of a trained run: its config with objective ``progressive_distillation``
    taught by the run, N_1 = 2^(rounds - 1) (the last round samples in one step) unless
    ``objective.student_steps`` is among ``overrides``, which apply last."""
    ckpt = resolve_checkpoint(run)
    config = load_config(ckpt / "config.yaml")
    config["objective"] = {"type": OBJECTIVE, "teacher": str(run), "student_steps": 2 ** (rounds - 1)}
    apply_overrides(config, overrides)
    return ConfigDict(config, source=str(ckpt / "config.yaml"))


def finished(r: Round, steps: int) -> dict[str, Any] | None:
    """Round ``r``'s final metrics if it ran all ``steps`` and wrote them, else None."""
    try:
        metrics = json.loads((r.out / "samples.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("step") == steps else None


def distill(config: ConfigDict, out: str | Path, rounds: int, *, resume: bool = False, progress: bool = True,
            say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the rounds of ``config`` into ``out`` (``out/round_1`` ...) and return each round's final
    metrics (``samples.json``: the student in its steps, and its teacher as a row). Every check that
    needs no earlier round runs before anything is written: the config (round 1's experiment is
    built, its teacher loaded), the rounds, ``out`` (new or empty; with ``resume`` it must exist)."""
    out = Path(out)
    plan = plan_rounds(config, out, rounds)
    first = Experiment.from_config(plan[0].config if plan else config)  # names any bad key of the config
    check_run_dir(out, resume=resume, has_checkpoint=resume, flag="--out")  # resumed: it exists; fresh: it is empty
    results = []
    with RunLock(out, purpose="distill"):
        for r in plan:
            exp = first if r.index == 1 else Experiment.from_config(r.config)
            done = finished(r, exp.train.steps) if resume else None
            if done is None:
                done = _train_round(r, exp, resume, progress, say)
            else:
                say(f"round {r.index}: {r.out} finished earlier, skipped")
            results.append(done)
            for line in table([*done.get("rows", []), student_row(r.index, done)]):
                say("  " + line)
    return results


def student_row(index: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Round ``index``'s student in its own steps as a row of :func:`~genlab.training.evaluation.table`."""
    return {**metrics, "label": f"round {index}"}


def summary(results: list[dict[str, Any]]) -> list[str]:
    """The first teacher (round 1's reference row) and every round's student, as table lines."""
    teacher = [row for row in results[0].get("rows", []) if row["label"] == "teacher"] if results else []
    return table([*teacher, *(student_row(i, m) for i, m in enumerate(results, 1))])


def _train_round(r: Round, exp: Experiment, resume: bool, progress: bool, say: Callable[[str], None]) -> dict:
    """Train round ``r`` (resumed from its newest checkpoint if it has one) and evaluate it."""
    again = resume and latest_checkpoint(r.out) is not None
    if resume and not again and r.out.is_dir():
        leftover = set(run_contents(r.out))
        if not leftover <= EARLY_FILES:
            raise GenlabError(f"--resume: {r.out} holds {', '.join(sorted(leftover))} but no checkpoint; move it away "
                              "to train that round again")
        with RunLock(r.out, purpose="distill"):  # a round killed before its first checkpoint starts again
            for name in leftover:
                (r.out / name).unlink()
    say(f"round {r.index}: {exp.objective.teacher_source} -> {r.steps}-step student in {r.out}"
        + (" (resumed)" if again else ""))
    with Trainer(exp, r.out, progress=progress, resume=again) as trainer:
        trainer.fit()
        return trainer.evaluate(rows=True)
