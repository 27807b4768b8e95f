"""Exact optimal transport between equal-size batches, the pieces shared by the W2 metric and the
minibatch-OT couplings of flow matching: the squared-distance cost, its host copy, and the
minimum-cost assignment (with equal batches and uniform weights an optimal plan is a permutation)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..core.dtypes import wide_dtype


def squared_distances(x0: Tensor, x1: Tensor) -> Tensor:
    """The cost M [B0, B1], M_ij = |x0_i - x1_j|^2 over the flattened rows, on the inputs' device in
    float64 (float32 where the device has no float64)."""
    dtype = wide_dtype(x0.device)
    rows0, rows1 = (x.reshape(x.shape[0], math.prod(x.shape[1:])).to(dtype) for x in (x0, x1))
    return torch.cdist(rows0, rows1) ** 2


def host_cost(who: str, cost: Tensor) -> np.ndarray:
    """The cost matrix as a CPU float64 numpy array, checked to be finite (the solver needs values)."""
    m = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(m).all():
        raise ValueError(f"{who}: the cost matrix has {int((~np.isfinite(m)).sum())} non-finite entries "
                         "(NaN or inf in x0 or x1); the OT solver needs finite samples")
    return m


def assignment(cost: np.ndarray) -> np.ndarray:
    """For a cost [n1, n0] with n1 <= n0 (rows: x1, columns: x0 candidates), the column given to each row
    [n1] by the exact minimum-cost assignment (``scipy.optimize.linear_sum_assignment``; each column at
    most once).

    The cost is reduced first: each row's minimum subtracted, and (square costs only, where every column
    is used) then each column's. Every assignment's total changes by the same constant, so the optimum is
    the same; the solver, which starts from zero potentials, ran 1.2-4x faster on it (squared distances,
    B = 1024)."""
    from scipy.optimize import linear_sum_assignment

    if cost.size == 0:
        return np.zeros(cost.shape[0], dtype=np.int64)
    cost = cost - cost.min(axis=1, keepdims=True)
    if cost.shape[0] == cost.shape[1]:
        cost -= cost.min(axis=0, keepdims=True)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = cols
    return out
