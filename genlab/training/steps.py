"""How step k of a run trains: its learning rate (linear warm-up, cosine decay), its optimizer (fused AdamW
where the device has it) and the seeds of its random draws, a function of (seed, k, micro-batch, rank) so
that a resumed run draws what an uninterrupted one would have."""

from __future__ import annotations

import math

import torch

from .experiment import Experiment


def lr_at(step: int, exp: Experiment) -> float:
    """Linear warm-up to ``lr``, then cosine decay to lr / 10 at the last step."""
    tc = exp.train
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``params``, the fused kernel where the parameters' device has one (CPU and CUDA do:
    on the CPU a small model's whole step is about 30% faster than with the per-tensor loop)."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of every random draw of micro-batch ``micro`` of step ``step`` on ``rank``."""
    return ((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank


def seed_global_generators(seed: int, device: torch.device) -> None:
    """Seed torch's CPU generator and, for an accelerator, that device's: what dropout draws from.
    (``torch.manual_seed`` would also queue a lazy seeding of every CUDA device, with a stack trace,
    which costs about as much as a small model's training step.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    elif device.type not in ("cpu", "meta") and hasattr(getattr(torch, device.type, None), "manual_seed"):
        getattr(torch, device.type).manual_seed(seed)


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, micro, rank))
