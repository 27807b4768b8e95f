"""Exponential moving average of weights, with the usual warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """``shadow = d * shadow + (1 - d) * params`` with d = min(decay, (1 + n) / (10 + n)) after n
    updates (the warm-up of Tarvainen & Valpola 2017 as used by ADM and diffusers' EMAModel), or d =
    decay throughout with ``warmup=False`` (a consistency model's target network)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay, self.updates, self.warmup = decay, 0, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

        self._source: nn.Module | None = None
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = ([], [], [], [])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        if model is not self._source:  # the tensor lists, gathered once per source module
            self._source = model
            self._pairs = (list(self.model.parameters()), [p.detach() for p in model.parameters()],
                           list(self.model.buffers()), list(model.buffers()))
        shadows, params, shadow_buffers, buffers = self._pairs
        if shadows:
            torch._foreach_lerp_(shadows, params, 1 - d)
        if shadow_buffers:
            torch._foreach_copy_(shadow_buffers, buffers)
        self.updates += 1
