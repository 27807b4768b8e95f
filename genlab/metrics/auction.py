"""The dense linear assignment problem, min_sigma sum_i C[i, sigma(i)] over permutations of a square cost
C [n, n], solved exactly in compiled code (numba) in two stages:

1. **Auction with epsilon scaling** (Bertsekas 1988, "The auction algorithm: a distributed relaxation
   method for the assignment problem", Sec. 2-4; Bertsekas & Eckstein 1988): each unassigned row i bids for
   its cheapest column j under the prices p, C_ij + p_j <= C_ik + p_k for all k, and raises p_j by the
   margin to its second choice plus eps; a phase ends when every row holds a column, in epsilon-
   complementary slackness (each row's column within eps of its cheapest). Phases run at eps0, eps0 /
   theta, ... down to eps_min. The prices are then dual potentials v = -p within eps of optimal ones.
   The auction runs on the cost normalised to [0, 1] in float32 (half the memory per scan, and the scans'
   reductions compile to SIMD, see :func:`_auction`): its prices need only be close, not exact.
2. **Shortest augmenting paths** (Jonker & Volgenant 1987; the Dijkstra form of Crouse 2016, "On
   implementing 2D rectangular assignment algorithms", Alg. 4, which SciPy's ``linear_sum_assignment``
   runs from zero potentials): with u_i = min_j (C_ij - v_j) every reduced cost C_ij - u_i - v_j is >= 0;
   the auction's pairs whose reduced cost is exactly 0 are kept (complementary slackness holds on them),
   and every other row is matched by a shortest path in reduced costs to a free column, the potentials
   updated so that slackness keeps holding. When every row is matched, (u, v) is dual feasible and tight on
   the permutation: it is optimal (LP duality), whatever the auction's accuracy. The auction only makes
   this stage short: from its prices few rows are left, and their paths are short.

Why not the solvers at hand: on minibatches of clustered low-dimensional points (8 gaussians -> moons, B =
1024), where many rows are near ties, SciPy's ``linear_sum_assignment`` took longer than POT's network
simplex, and LAPJV (``lap``) and OR-tools' cost-scaling solver longer still; epsilon scaling is what
resolves such ties cheaply (``scripts/bench_couplings.py``).

:data:`AVAILABLE` is False without numba; :func:`genlab.metrics.transport.assignment` then uses SciPy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

AVAILABLE = numba is not None

THETA = 5.0  # eps shrinks by this factor per phase
START = 0.05  # eps0 = START * (max C - min C)
STOP = 1e-6  # eps_min = STOP * (max C - min C): ~8 float32 ulps of the normalised cost's largest values
LARGEST = np.int32(np.iinfo(np.int32).max)  # the bit pattern of a NaN: above every non-negative float32's


def _compiled(f: Callable) -> Callable:
    """``numba.njit`` (cached on disk, GIL released) where numba is installed; the plain function otherwise."""
    return numba.njit(cache=True, nogil=True)(f) if AVAILABLE else f


@_compiled
def _normalised(cost: np.ndarray, low: float, spread: float) -> np.ndarray:
    """(C - low) / spread [n, n] as float32: in [0, 1] when low = min C and spread = max C - min C."""
    n = cost.shape[0]
    out = np.empty((n, n), np.float32)
    scale = 1.0 / spread
    for i in range(n):
        for j in range(n):
            out[i, j] = (cost[i, j] - low) * scale
    return out


@_compiled
def _lowest(keys: np.ndarray) -> np.int32:
    """min of int32 ``keys`` [n]: a select reduction on integers, which LLVM compiles to SIMD (the same
    reduction on floats stays scalar without fast-math's no-NaN flags)."""
    low = keys[0]
    for j in range(keys.shape[0]):
        k = keys[j]
        low = k if k < low else low
    return low


@_compiled
def _index_of(keys: np.ndarray, key: np.int32) -> int:
    """The last j with keys[j] == key (-1 if none), branch-free so that it compiles to SIMD."""
    found = -1
    for j in range(keys.shape[0]):
        found = j if keys[j] == key else found
    return found


@_compiled
def _auction(cost: np.ndarray, eps0: float, eps_min: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Seidel forward auction with eps scaling on a float32 ``cost`` [n, n] with entries >= 0 (the
    :func:`_normalised` one) -> (col4row [n], prices [n] float32): an eps_min-complementary-slack
    permutation and its prices.

    A bid scans its row's values C_ij + p_j (all >= 0, prices only rise from 0) for the cheapest and the
    second cheapest. Non-negative float32s order as their int32 bit patterns, so the scan writes the values
    once and finds both by integer reductions (min, index of the min, min with it masked), each SIMD: 3-4x
    faster than one scalar pass tracking best and second (measured at n = 1024, 2-D batches). A price
    rises by at least one ulp, so the phases end whatever the rounding."""
    n = cost.shape[0]
    prices = np.zeros(n, np.float32)
    row4col = np.full(n, -1, np.int64)
    col4row = np.full(n, -1, np.int64)
    queue = np.empty(n, np.int64)
    values = np.empty(n, np.float32)
    keys = values.view(np.int32)
    cell = np.empty(1, np.int32)  # int32 -> float32 by the same bits
    eps, eps_end, ceiling = np.float32(eps0), np.float32(eps_min), np.float32(np.inf)
    while True:
        row4col[:] = -1
        col4row[:] = -1
        for i in range(n):
            queue[i] = i
        head, waiting = 0, n
        while waiting > 0:
            i = queue[head]
            head = head + 1 if head + 1 < n else 0
            waiting -= 1
            for j in range(n):
                values[j] = cost[i, j] + prices[j]
            choice = _index_of(keys, _lowest(keys))
            best = values[choice]
            if n > 1:
                keys[choice] = LARGEST
                cell[0] = _lowest(keys)
                second = cell.view(np.float32)[0]
            else:
                second = best
            price = prices[choice] + (second - best + eps)
            prices[choice] = price if price > prices[choice] else np.nextafter(prices[choice], ceiling)
            previous = row4col[choice]
            row4col[choice], col4row[i] = i, choice
            if previous >= 0:  # outbid: back in the queue
                col4row[previous] = -1
                tail = head + waiting
                queue[tail - n if tail >= n else tail] = previous
                waiting += 1
        if eps <= eps_end:
            return col4row, prices
        eps = max(eps / np.float32(theta), eps_end)


@_compiled
def _finish(cost: np.ndarray, v: np.ndarray, col4row_start: np.ndarray, rounds: int = 2
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact assignment of ``cost`` [n, n] from column potentials ``v`` [n] and a start permutation:
    ``rounds`` times u is set tight on the start's pairs and (v, u) replaced by their c-transforms (each
    round leaves more of the start's pairs at reduced cost 0; two measured fastest on 2-D batches of
    1024), those pairs are kept, and the other rows matched by shortest augmenting paths (Crouse 2016,
    Alg. 4). Returns (col4row [n], u [n], v [n])."""
    n = cost.shape[0]
    u = np.empty(n)
    for _ in range(rounds):
        for i in range(n):  # u tight on the start's pairs, v its c-transform (v_j = min_i C_ij - u_i) ...
            u[i] = cost[i, col4row_start[i]] - v[col4row_start[i]]
        v[:] = np.inf
        for i in range(n):
            for j in range(n):
                v[j] = min(v[j], cost[i, j] - u[i])
        for i in range(n):  # ... and u the c-transform of v: every reduced cost >= 0, more start pairs at 0
            low = np.inf
            for j in range(n):
                low = min(low, cost[i, j] - v[j])
            u[i] = low
    col4row = np.full(n, -1, np.int64)
    row4col = np.full(n, -1, np.int64)
    for i in range(n):
        j = col4row_start[i]
        if j >= 0 and row4col[j] < 0 and cost[i, j] - v[j] - u[i] <= 0.0:
            col4row[i], row4col[j] = j, i
    shortest = np.empty(n)
    path = np.empty(n, np.int64)
    remaining = np.empty(n, np.int64)
    in_rows = np.zeros(n, np.bool_)
    in_cols = np.zeros(n, np.bool_)
    for start in range(n):
        if col4row[start] >= 0:
            continue
        shortest[:] = np.inf
        path[:] = -1
        in_rows[:] = False
        in_cols[:] = False
        for k in range(n):
            remaining[k] = n - 1 - k
        left, low_total, i, sink = n, 0.0, start, -1
        while sink < 0:  # Dijkstra over columns in reduced costs from row `start`
            in_rows[i] = True
            index, lowest = -1, np.inf
            for k in range(left):
                j = remaining[k]
                r = low_total + cost[i, j] - u[i] - v[j]
                if r < shortest[j]:
                    path[j], shortest[j] = i, r
                if shortest[j] < lowest or (shortest[j] == lowest and row4col[j] < 0):
                    lowest, index = shortest[j], k
            low_total = lowest
            j = remaining[index]
            if row4col[j] < 0:
                sink = j
            else:
                i = row4col[j]
            in_cols[j] = True
            left -= 1
            remaining[index] = remaining[left]
        u[start] += low_total  # keep reduced costs >= 0 and 0 on the matching (Crouse 2016, Eq. 15)
        for r in range(n):
            if in_rows[r] and r != start:
                u[r] += low_total - shortest[col4row[r]]
        for c in range(n):
            if in_cols[c]:
                v[c] -= low_total - shortest[c]
        j = sink
        while True:  # flip the path's pairs
            r = path[j]
            row4col[j] = r
            col4row[r], j = j, col4row[r]
            if r == start:
                break
    return col4row, u, v


def solve(cost: np.ndarray, start: float = START, stop: float = STOP, theta: float = THETA) -> np.ndarray:
    """The column of each row [n] (int64) in a minimum-cost permutation of the finite square ``cost``
    [n, n]: the auction's prices on the cost normalised to [0, 1] in float32 (eps from ``start`` to ``stop``,
    divided by ``theta`` per phase), then the exact shortest-augmenting-path stage on the float64 cost.
    Requires numba (:data:`AVAILABLE`)."""
    if not AVAILABLE:
        raise RuntimeError("genlab.metrics.auction needs numba (pip install numba); "
                           "genlab.metrics.transport.assignment falls back to SciPy without it")
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"auction.solve: expected a square cost [n, n], got {list(cost.shape)}")
    if not (0 < stop <= start and theta > 1):  # else eps never reaches its end: the phases would not stop
        raise ValueError(f"auction.solve: needs 0 < stop <= start and theta > 1, got start={start}, stop={stop}, "
                         f"theta={theta}")
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n = len(cost)
    low, high = (float(cost.min()), float(cost.max())) if n else (0.0, 0.0)  # NaN and inf propagate
    spread = high - low
    if not np.isfinite(spread):
        raise ValueError("auction.solve: the cost has NaN or infinite entries; the assignment needs finite costs")
    if not spread > 0:  # every permutation costs the same
        return np.arange(n, dtype=np.int64)
    col4row, prices = _auction(_normalised(cost, low, spread), start, stop, theta)
    return _finish(cost, prices.astype(np.float64) * -spread, col4row)[0]
