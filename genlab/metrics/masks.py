"""Overlap of binary masks: intersection over union (the Jaccard index)."""

from __future__ import annotations

from torch import Tensor

from genlab.core.errors import ShapeError


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU(a, b) = |a AND b| / |a OR b| per item, ``[N]``, for masks ``a, b: [N, ...]`` of one shape (a
    value counts as set where it is > 0.5, so {0, 1} floats and bools both work); 1 where both are empty."""
    if a.shape != b.shape or a.ndim < 2:
        raise ShapeError(f"mask_iou: expected two masks [N, ...] of one shape, got {list(a.shape)} and {list(b.shape)}")
    a, b = (a > 0.5).flatten(1), (b > 0.5).flatten(1)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return (inter / union.clamp(min=1)).where(union > 0, 1.0)
