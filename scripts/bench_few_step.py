"""Few-step generation on digits, side by side: the teacher at 25 steps against consistency distillation
and easy consistency tuning (1, 2, 4 steps), progressive distillation (rounds down to 1 step) and MeanFlow
(1, 2, 4 steps).

Every model is trained here, one after the other, by the configs the README names, each timed (wall
clock; time benchmarks only on an otherwise idle machine): the digits main job (``configs/digits.yaml``,
the teacher; or ``--teacher RUN``, an existing run, then untimed), ``configs/consistency/cd_digits.yaml``,
``configs/consistency/ect_digits.yaml`` (started from the teacher run), ``configs/distill/progressive_digits.yaml`` (``genlab distill``) and
``configs/flow_matching/meanflow_digits.yaml``. Each run's final evaluation (400 samples, 40 per digit,
seed 1234) gives the classifier accuracy on the requested labels and the Frechet distance in the digits
classifier's feature space (10.28 between as many real training images and the test split); the table
lists every model at every step count next to the teacher's 25, and ``--csv`` writes it.

Targets (the issue's): consistency distillation at 2 steps has FD <= 2x the teacher's at 25 and
accuracy >= 85%.

Usage: ``python scripts/bench_few_step.py [--teacher runs/digits] [--out bench-few-step] [--only cd,ect,pd,meanflow]
[--csv few_step.csv] [OVERRIDE ...]`` (overrides go to every student's config, e.g. ``train.steps=50`` for a
smoke run).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from genlab.cli import main as genlab
from genlab.core.io import atomic_open

ROOT = Path(__file__).resolve().parents[1]
JOBS = {  # name -> (command, config, the objective's key naming the teacher run, if it has one)
    "cd": ("train", "configs/consistency/cd_digits.yaml", "teacher"),
    "ect": ("train", "configs/consistency/ect_digits.yaml", "pretrained"),
    "pd": ("distill", "configs/distill/progressive_digits.yaml", "teacher"),
    "meanflow": ("train", "configs/flow_matching/meanflow_digits.yaml", None),
}
LABELS = {"cd": "consistency distillation", "ect": "easy consistency tuning", "pd": "progressive distillation",
          "meanflow": "MeanFlow"}


def run(args: list[str]) -> float:
    """``genlab ARGS`` in this process; its wall time in seconds (RuntimeError if it fails)."""
    start = time.perf_counter()
    if genlab(args) != 0:
        raise RuntimeError(f"genlab {' '.join(args)} failed")
    return time.perf_counter() - start


def metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "samples.json").read_text())


def row(model: str, steps: int, m: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    return {"model": model, "steps": steps, "accuracy": m.get("classifier_accuracy"),
            "frechet_distance": m.get("frechet_distance"), "train_seconds": seconds}


def student_rows(name: str, out: Path, seconds: float) -> list[dict[str, Any]]:
    """The rows of one job's run(s): every ``train.eval_steps`` row, or every round's student."""
    if name == "pd":
        rounds = sorted(out.glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
        return [row(f"{LABELS[name]}, round {p.name.split('_')[1]}", metrics(p)["steps"], metrics(p), seconds)
                for p in rounds]
    m = metrics(out)
    wanted = [r for r in m.get("rows", []) if r["label"] == "model"] or [m]
    return [row(LABELS[name], r["steps"], r, seconds) for r in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every student's config")
    parser.add_argument("--teacher", help="a trained digits run (default: train configs/digits.yaml)")
    parser.add_argument("--out", default="bench-few-step", help="directory of the runs (must not hold runs)")
    parser.add_argument("--only", default=",".join(JOBS), help=f"comma-separated jobs among {', '.join(JOBS)}")
    parser.add_argument("--csv", help="also write the table as CSV here")
    args = parser.parse_args()
    out, rows = Path(args.out), []
    jobs = [j.strip() for j in args.only.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        parser.error(f"--only: unknown job(s) {', '.join(unknown)}; choose among {', '.join(JOBS)}")
    teacher, teacher_seconds = args.teacher, None
    if teacher is None:
        teacher = str(out / "teacher")
        teacher_seconds = run(["train", str(ROOT / "configs" / "digits.yaml"), "--out", teacher, "--quiet"])
    rows.append(row("teacher (DDPM)", 25, metrics(Path(teacher)), teacher_seconds))
    for name in jobs:
        command, config, key = JOBS[name]
        extra = [f"objective.{key}={teacher}"] if key else []
        seconds = run([command, str(ROOT / config), *extra, *args.overrides, "--out", str(out / name), "--quiet"])
        rows += student_rows(name, out / name, seconds)
    print(f"\n{'model':<38} {'steps':>5} {'accuracy':>9} {'FD':>8} {'train':>8}")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        fd = "-" if r["frechet_distance"] is None else f"{r['frechet_distance']:.2f}"
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f} min"
        print(f"{r['model']:<38} {r['steps']:>5} {acc:>9} {fd:>8} {secs:>8}")
    teacher_fd = rows[0]["frechet_distance"]
    cd2 = [r for r in rows if r["model"] == LABELS["cd"] and r["steps"] == 2]
    if cd2 and teacher_fd:
        ok = cd2[0]["frechet_distance"] <= 2 * teacher_fd and cd2[0]["accuracy"] >= 0.85
        print(f"\nCD at 2 steps: FD {cd2[0]['frechet_distance'] / teacher_fd:.2f}x the teacher's at 25 (target <= 2), "
              f"accuracy {cd2[0]['accuracy']:.1%} (target >= 85%): {'met' if ok else 'NOT met'}")
    if args.csv:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        with atomic_open(args.csv) as f:
            f.write(text.getvalue().encode())


if __name__ == "__main__":
    main()
