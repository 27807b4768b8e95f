"""The training loop on accelerate: one CPU process or many GPUs with the same code.

Every random draw of step k (batch indices, noise, times) comes from a generator seeded with
(seed, k, micro-batch, rank), so a resumed run repeats exactly what an uninterrupted one would
have done, and ranks see different data.

The run directory belongs to the Trainer from its checks to its last file (:mod:`genlab.core.rundir`):
a fresh run needs a new or empty directory, a resumed one its newest intact checkpoint, a config that
differs from the run's only in :data:`RESUMABLE` keys, and weights that fit the model; all of that is
checked before anything is written, then the directory is locked and cleaned of temporaries.

Non-finite policy: a step whose loss (or, without fp16 loss scaling, gradient norm) is not finite is
skipped and counted; ``train.max_bad_steps`` skipped steps in a row stop the run with a
:class:`~genlab.core.errors.NonFiniteError`; a checkpoint never holds a non-finite tensor.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from ..core.checkpoint import (check_fits, intact_checkpoint, latest_checkpoint, load_optimizer, load_state,
                               load_weights, save_checkpoint)
from ..core.config import load_config, save_config
from ..core.errors import ConfigError, GenlabError, NonFiniteError
from ..core.rundir import RunLock, check_run_dir, is_main_rank
from .ema import EMA
from .evaluation import evaluate
from .experiment import Experiment
from .plots import plot_losses


def lr_at(step: int, exp: Experiment) -> float:
    """Linear warm-up to ``lr``, then cosine decay to lr / 10 at the last step."""
    tc = exp.train
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of every random draw of micro-batch ``micro`` of step ``step`` on ``rank``."""
    return ((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, micro, rank))


# keys a resumed run may change: how long it runs and what it logs, samples and keeps, never what it learns
RESUMABLE = ("name", "sampler", "train.steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
             "train.eval_samples", "train.tensorboard", "train.max_bad_steps", "train.compile")


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(ckpt: Path, config: dict[str, Any]) -> None:
    """ConfigError naming the first key where ``config`` differs from the checkpoint's ``config.yaml``,
    except the :data:`RESUMABLE` keys: a resumed run learns exactly what the interrupted one did."""
    saved, now = _flat(load_config(ckpt / "config.yaml")), _flat(config)
    for key in sorted(saved.keys() | now.keys()):
        resumable = any(key == r or key.startswith(r + ".") for r in RESUMABLE)
        if resumable or (key in saved and key in now and saved[key] == now[key]):
            continue
        before = repr(saved[key]) if key in saved else "not set"
        after = repr(now[key]) if key in now else "not set"
        raise ConfigError(f"--resume: {key} is {before} in the run ({ckpt / 'config.yaml'}) and {after} now; a "
                          f"resumed run keeps its config except {', '.join(RESUMABLE)} (start a new run to change it)")


class Trainer:
    """Trains ``exp.model`` with ``exp.objective``; writes checkpoints, loss curve, samples and
    metrics to ``out_dir``, which it owns (locked) until :meth:`close`. ``resume=True`` continues from
    the newest intact checkpoint there (``resumed_from``); otherwise the directory must be new or empty."""

    def __init__(self, exp: Experiment, out_dir: str | Path, progress: bool = True, resume: bool = False) -> None:
        self.exp, self.out, self.progress = exp, Path(out_dir), progress
        self.resumed_from = self._checked_start(resume)  # nothing is written before this passes
        self.lock = RunLock(self.out, purpose="training")
        try:
            if is_main_rank():
                self._checked_start(resume)  # again, under the lock: no run slipped in since
            self._setup()
            if self.resumed_from is not None:
                self._load(self.resumed_from)
        except BaseException:
            self.close()
            raise

    def _checked_start(self, resume: bool) -> Path | None:
        """The checkpoint to resume from (None for a fresh run), every check passed; writes nothing."""
        if is_main_rank():
            check_run_dir(self.out, resume=resume, has_checkpoint=latest_checkpoint(self.out) is not None)
        if not resume:
            return None
        ckpt = intact_checkpoint(self.out)
        if ckpt is None:
            raise GenlabError(f"--out {self.out}: holds no checkpoint to resume from")
        check_resume_config(ckpt, self.exp.resolved())
        for name in ("model.safetensors", "ema.safetensors"):
            check_fits(ckpt / name, self.exp.model)
        return ckpt

    def _setup(self) -> None:
        exp, tc = self.exp, self.exp.train
        # accelerate keeps one precision per process: let a later Trainer in the same process (a
        # notebook, a test) choose its own; the distributed state is kept
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
        self.ema = EMA(exp.model, tc.ema_decay)
        opt = torch.optim.AdamW(exp.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        model = torch.compile(exp.model) if tc.compile else exp.model
        self.model, self.opt = self.acc.prepare(model, opt)
        self.ema.model.to(self.acc.device)
        self.data = exp.data.data.to(self.acc.device)
        self.labels = exp.data.labels.to(self.acc.device) if exp.num_classes else None
        self.step, self.losses, self.skipped = 0, [], 0
        self.writer = self._tensorboard() if tc.tensorboard and self.acc.is_main_process else None
        if self.acc.is_main_process:
            save_config(exp.resolved(), self.out / "config.yaml")

    def close(self) -> None:
        """Release the run directory (the process's end does it too)."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self.lock.release() if hasattr(self, "lock") else None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise GenlabError("train.tensorboard: true needs the tensorboard package (pip install tensorboard)") from e
        return SummaryWriter(str(self.out / "tensorboard"))

    def _load(self, ckpt: Path) -> None:
        self.unwrapped().load_state_dict(load_weights(ckpt / "model.safetensors"))  # also under torch.compile
        self.ema.model.load_state_dict(load_weights(ckpt / "ema.safetensors"))
        self.opt.load_state_dict(load_optimizer(ckpt))
        state = load_state(ckpt)
        self.step, self.ema.updates, self.losses = state["step"], state["ema_updates"], state.get("losses", [])
        self.skipped = state.get("skipped_steps", 0)

    def unwrapped(self) -> torch.nn.Module:
        model = self.acc.unwrap_model(self.model)
        return getattr(model, "_orig_mod", model)  # torch.compile's wrapper

    def save(self) -> None:
        """Checkpoint ``checkpoints/step_N``; NonFiniteError (nothing written) if a weight is not finite."""
        if not self.acc.is_main_process:
            return
        state = {"step": self.step, "ema_updates": self.ema.updates, "losses": self.losses,
                 "skipped_steps": self.skipped}
        try:
            save_checkpoint(self.out / "checkpoints" / f"step_{self.step:07d}", model=self.unwrapped().state_dict(),
                            ema=self.ema.model.state_dict(), optimizer=self.opt.state_dict(),
                            config=self.exp.resolved(), state=state)
        except NonFiniteError as e:
            last = latest_checkpoint(self.out)
            raise NonFiniteError(f"step {self.step}: the model diverged, {e}; the newest checkpoint is "
                                 f"{last or 'none'}; lower train.lr or set train.grad_clip") from None

    def micro_loss(self, micro: int) -> torch.Tensor:
        tc = self.exp.train
        g = step_generator(tc.seed, self.step, micro, self.acc.process_index, self.data.device)
        # draws that modules make from the global generators (dropout, class dropout) are then a
        # function of the step too, so that a resumed run repeats them
        torch.manual_seed(step_seed(tc.seed, self.step, micro, self.acc.process_index) ^ 0x5DEECE66D)
        idx = torch.randint(len(self.data), (tc.batch_size,), generator=g, device=self.data.device)
        cond = {} if self.labels is None else {"class_labels": self.labels[idx]}
        with self.acc.autocast():
            return self.exp.objective(self.exp.denoiser(self.model), self.data[idx], generator=g, **cond)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; NaN (and no update) if the loss, or the
        gradient norm (without fp16 loss scaling, which skips such steps itself), is not finite."""
        tc, total = self.exp.train, 0.0
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.exp)
        for micro in range(tc.grad_accum):
            last = micro == tc.grad_accum - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                loss = self.micro_loss(micro) / tc.grad_accum
                if not torch.isfinite(loss):
                    self.opt.zero_grad(set_to_none=True)
                    return float("nan")
                self.acc.backward(loss)
            total += loss.item()
        norm = self.acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip or math.inf)
        if self.acc.scaler is None and norm is not None and not torch.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            return float("nan")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.unwrapped())
        return total

    def fit(self) -> None:
        tc, bad, running = self.exp.train, 0, []
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress or not self.acc.is_main_process,
                   desc="train", dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        while self.step < tc.steps:
            loss = self.train_step()
            self.step += 1
            bar.update(1)
            if math.isfinite(loss):
                bad, running = 0, running + [loss]
            else:
                bad, self.skipped = bad + 1, self.skipped + 1
                warnings.warn(f"step {self.step}: non-finite loss or gradient, step skipped ({bad} in a row)",
                              stacklevel=1)
                if bad >= tc.max_bad_steps:
                    raise NonFiniteError(
                        f"{bad} non-finite losses or gradients in a row at step {self.step} (train.max_bad_steps): "
                        f"stopped; the newest checkpoint is {latest_checkpoint(self.out) or 'none'}; lower "
                        "train.lr, set train.grad_clip or check the data")
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                self.log(sum(running) / max(1, len(running)), bar)
                running = []
            if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                try:
                    self.evaluate(name=f"samples/step_{self.step:07d}")
                except NonFiniteError as e:  # a picture along the way: say so, keep training
                    warnings.warn(f"step {self.step}: {e}", stacklevel=1)
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save()
        bar.close()

    def log(self, loss: float, bar: Any) -> None:
        self.losses.append([self.step, loss])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_at(self.step - 1, self.exp):.2e}")
        if self.acc.is_main_process:
            plot_losses(self.losses, self.out / "loss.png")
            if self.writer is not None:
                self.writer.add_scalar("loss", loss, self.step)

    def evaluate(self, seed: int = 1234, name: str = "samples") -> dict[str, Any]:
        """Sample with the EMA model, write ``{name}.png`` and ``{name}.json``; returns the metrics.
        NonFiniteError if the samples are not finite (nothing written)."""
        if not self.acc.is_main_process:
            return {}
        return evaluate(self.exp, self.ema.model, self.out, name, seed, self.step)
