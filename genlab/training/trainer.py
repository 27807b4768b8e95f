"""The training loop on accelerate: one CPU process or many GPUs with the same code.

Every random draw of step k (batch indices, noise, times) comes from a generator seeded with
(seed, k, micro-batch, rank), so a resumed run repeats exactly what an uninterrupted one would
have done, and ranks see different data.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from ..core.checkpoint import latest_checkpoint, load_optimizer, load_state, load_weights, save_checkpoint
from ..core.errors import GenlabError
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


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank)


class Trainer:
    """Trains ``exp.model`` with ``exp.objective``; writes checkpoints, loss curve, samples and
    metrics to ``out_dir``. :meth:`resume` continues from the newest checkpoint there."""

    def __init__(self, exp: Experiment, out_dir: str | Path, progress: bool = True) -> None:
        self.exp, self.out, self.progress = exp, Path(out_dir), progress
        self.out.mkdir(parents=True, exist_ok=True)
        tc = exp.train
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
        self.step, self.losses = 0, []
        self.writer = self._tensorboard() if tc.tensorboard and self.acc.is_main_process else None

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise GenlabError("train.tensorboard: true needs the tensorboard package (pip install tensorboard)") from e
        return SummaryWriter(str(self.out / "tensorboard"))

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return False
        self.unwrapped().load_state_dict(load_weights(ckpt / "model.safetensors"))  # also under torch.compile
        self.ema.model.load_state_dict(load_weights(ckpt / "ema.safetensors"))
        self.opt.load_state_dict(load_optimizer(ckpt))
        state = load_state(ckpt)
        self.step, self.ema.updates, self.losses = state["step"], state["ema_updates"], state.get("losses", [])
        return True

    def unwrapped(self) -> torch.nn.Module:
        model = self.acc.unwrap_model(self.model)
        return getattr(model, "_orig_mod", model)  # torch.compile's wrapper

    def save(self) -> None:
        if not self.acc.is_main_process:
            return
        state = {"step": self.step, "ema_updates": self.ema.updates, "losses": self.losses}
        save_checkpoint(self.out / "checkpoints" / f"step_{self.step:07d}", model=self.unwrapped().state_dict(),
                        ema=self.ema.model.state_dict(), optimizer=self.opt.state_dict(), config=self.exp.resolved(),
                        state=state)

    def micro_loss(self, micro: int) -> torch.Tensor:
        tc = self.exp.train
        g = step_generator(tc.seed, self.step, micro, self.acc.process_index, self.data.device)
        idx = torch.randint(len(self.data), (tc.batch_size,), generator=g, device=self.data.device)
        cond = {} if self.labels is None else {"class_labels": self.labels[idx]}
        with self.acc.autocast():
            return self.exp.objective(self.exp.denoiser(self.model), self.data[idx], generator=g, **cond)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; NaN (and no update) if the loss is not finite."""
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
        if tc.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
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
                bad += 1
                warnings.warn(f"step {self.step}: non-finite loss, step skipped ({bad} in a row)", stacklevel=1)
                if bad >= tc.max_bad_steps:
                    raise GenlabError(f"{bad} non-finite losses in a row at step {self.step}: lower train.lr, "
                                      "enable train.grad_clip or check the data")
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                self.log(sum(running) / max(1, len(running)), bar)
                running = []
            if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                self.evaluate(name=f"samples/step_{self.step:07d}")
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
        """Sample with the EMA model, write ``{name}.png`` and ``{name}.json``; returns the metrics."""
        if not self.acc.is_main_process:
            return {}
        (self.out / name).parent.mkdir(parents=True, exist_ok=True)
        metrics = evaluate(self.exp, self.ema.model, self.out, name, seed, self.step)
        (self.out / f"{name}.json").write_text(json.dumps(metrics, indent=2))
        return metrics
