"""The widest float a device computes in: float64, or float32 where there is no float64 (Apple's MPS)."""

from __future__ import annotations

import torch


def wide_dtype(device: torch.device | str | None) -> torch.dtype:
    """float64; float32 on devices without float64 (Apple's MPS)."""
    return torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
