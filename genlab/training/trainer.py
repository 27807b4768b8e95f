"""The training loop on accelerate: one CPU process or many GPUs with the same code.

Every random draw of step k (batch indices, noise, times) comes from a generator seeded with
(seed, k, rank), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..core.checkpoint import latest_checkpoint, load_optimizer, load_state, load_weights, save_checkpoint
from ..core.errors import GenlabError
from ..metrics import sliced_wasserstein
from .ema import EMA
from .experiment import Experiment
from .plots import plot_samples_2d


def lr_at(step: int, exp: Experiment) -> float:
    """Linear warm-up to ``lr``, then cosine decay to lr / 10 at the last step."""
    tc = exp.train
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


class Trainer:
    """Trains ``exp.model`` with ``exp.objective`` and writes checkpoints, samples and metrics to
    ``out_dir``. ``resume=True`` continues from the newest checkpoint there."""

    def __init__(self, exp: Experiment, out_dir: str | Path, progress: bool = True) -> None:
        self.exp, self.out, self.progress = exp, Path(out_dir), progress
        self.acc = Accelerator(mixed_precision=exp.train.mixed_precision, cpu=not torch.cuda.is_available())
        self.ema = EMA(exp.model, exp.train.ema_decay)
        opt = torch.optim.AdamW(exp.model.parameters(), lr=exp.train.lr, weight_decay=exp.train.weight_decay)
        self.model, self.opt = self.acc.prepare(exp.model, opt)
        self.ema.model.to(self.acc.device)
        self.data = exp.data.data.to(self.acc.device)
        self.step, self.losses = 0, []

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return False
        self.acc.unwrap_model(self.model).load_state_dict(load_weights(ckpt / "model.safetensors"))
        self.ema.model.load_state_dict(load_weights(ckpt / "ema.safetensors"))
        self.opt.load_state_dict(load_optimizer(ckpt))
        state = load_state(ckpt)
        self.step, self.ema.updates, self.losses = state["step"], state["ema_updates"], state.get("losses", [])
        return True

    def save(self) -> None:
        if not self.acc.is_main_process:
            return
        state = {"step": self.step, "ema_updates": self.ema.updates, "losses": self.losses}
        save_checkpoint(self.out / "checkpoints" / f"step_{self.step:07d}",
                        model=self.acc.unwrap_model(self.model).state_dict(), ema=self.ema.model.state_dict(),
                        optimizer=self.opt.state_dict(), config=self.exp.resolved(), state=state)

    def train_step(self) -> float:
        tc, rank = self.exp.train, self.acc.process_index
        g = step_generator(tc.seed, self.step, rank, self.acc.device)
        idx = torch.randint(len(self.data), (tc.batch_size,), generator=g, device=self.acc.device)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.exp)
        with self.acc.autocast():
            loss = self.exp.objective(self.exp.denoiser(self.model), self.data[idx], generator=g)
        if not torch.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            return float("nan")
        self.acc.backward(loss)
        if tc.grad_clip:
            self.acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.acc.unwrap_model(self.model))
        return loss.item()

    def fit(self) -> None:
        tc, bad, running = self.exp.train, 0, []
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress or not self.acc.is_main_process,
                   desc="train", dynamic_ncols=True)
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
                self.losses.append([self.step, sum(running) / max(1, len(running))])
                bar.set_postfix(loss=f"{self.losses[-1][1]:.4f}")
                running = []
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save()
        bar.close()

    @torch.no_grad()
    def evaluate(self, seed: int = 1234, name: str = "samples") -> dict[str, Any]:
        """Sample with the EMA model, write ``{name}.png`` and ``{name}.json``, and measure the sliced
        Wasserstein distance to held-out data."""
        n, dev = self.exp.train.eval_samples, self.acc.device
        g = torch.Generator(device=dev).manual_seed(seed)
        start = time.perf_counter()
        samples = self.exp.sampler.sample(self.exp.denoiser(self.ema.model), shape=(n, self.data.shape[1]),
                                          generator=g, progress=False).float().cpu()
        elapsed = time.perf_counter() - start
        held, held2 = self.exp.heldout(n), self.exp.heldout(n, draw=1)
        sw = sliced_wasserstein(samples, held, generator=torch.Generator().manual_seed(0)).item()
        base = sliced_wasserstein(held2, held, generator=torch.Generator().manual_seed(0)).item()
        metrics = {"step": self.step, "sliced_wasserstein": sw, "sliced_wasserstein_data_vs_data": base,
                   "sampler": repr(self.exp.sampler), "sampling_seconds": elapsed, "image": f"{name}.png"}
        if self.acc.is_main_process:
            plot_samples_2d(samples, held, self.out / f"{name}.png",
                            f"{self.exp.sampler!r}: sliced W2 to held-out data {sw:.3f} (data vs data {base:.3f})")
            (self.out / f"{name}.json").write_text(json.dumps(metrics, indent=2))
        return metrics
