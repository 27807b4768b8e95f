"""The device a module computes on."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer; the CPU for a module that holds neither (a
    parameterless flow, a fixed field), where ``next(module.parameters())`` raises StopIteration."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device
