"""Exponential moving average of weights, with the usual warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * params`` with d = min(decay, (1 + n) / (10 + n)) after n
    updates (the warm-up of Tarvainen & Valpola 2017 as used by ADM and diffusers' EMAModel), or d =
    decay throughout with ``warmup=False`` (a consistency model's target network)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay, self.updates, self.warmup = decay, 0, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for shadow, param in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(param.detach(), 1 - d)
        for shadow, buf in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(buf)
        self.updates += 1
