"""Couplings of flow matching: which source sample is paired with which data sample in a minibatch.

Naming follows torchcfm and the flow-matching papers: ``x0`` [B, ...] are source samples (noise, or
another data set), ``x1`` [B, ...] data. (Beware: ``genlab.diffusion`` calls the *data* x0; here x0 is
the source.) A :class:`Coupling` returns the rows re-paired; subclasses only choose the row indices
(:meth:`Coupling.indices`), so anything else indexed by the batch (labels, conditioning) can follow.

Registered in namespace ``coupling``:

- ``independent``: the pairs as given (the product coupling of CFM, Lipman et al. 2023).
- ``exact_ot``: minibatch optimal transport (Tong et al. 2023, "Improving and generalizing flow-based
  generative models with minibatch optimal transport", Eq. 17 (OT-CFM); Pooladian et al. 2023,
  "Multisample flow matching"). The plan minimises <P, M> over P in U(1/B, 1/B), M_ij = |x0_i - x1_j|^2.
- ``sinkhorn``: entropic OT, P = argmin <P, M> - reg H(P) (Cuturi 2013), the coupling of the
  Schrödinger-bridge CFM (Tong et al. 2023, Sec. 4; reg = 2 sigma^2), pairs drawn from P.
- ``label_ot``: exact OT within each class, no pair crosses classes (class-conditional OT-CFM).

**Solver.** With equal batch sizes and uniform weights the OT polytope's vertices are the
permutation matrices / B (Birkhoff-von Neumann), so the linear program min <P, M> has an optimal
permutation: the problem *is* the linear assignment problem. We solve it exactly with
:func:`genlab.metrics.transport.assignment`: where numba is installed (a genlab dependency), a compiled
epsilon-scaling auction (Bertsekas 1988) whose prices are finished by shortest augmenting paths
(:mod:`genlab.metrics.auction`), else ``scipy.optimize.linear_sum_assignment`` (Crouse 2016's
shortest-augmenting-path Jonker-Volgenant) on the cost reduced by entropic potentials, rather than with
the general network simplex of POT's ``ot.emd`` (what torchcfm's ``OTPlanSampler("exact")`` calls). On
clustered 2-D batches (8 gaussians -> moons, B = 1024), where many pairs are near ties, the auction runs in
a fraction of ``ot.emd``'s time and SciPy's solver near it; ``scripts/bench_couplings.py`` measures them.
The cost matrix is computed with torch on the inputs' device in float64 (|x0|^2 + |x1|^2 - 2 x0 x1^T by
one matmul on the flattened rows; float32 on devices without float64); only that [B, B] matrix moves to
the CPU.

Draws (sampling from a plan, surplus partners) come from ``generator``, on the inputs' device;
outputs keep the inputs' device and dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..core.bounds import NonNegativeFloat, PositiveFloat, PositiveInt
from ..core.errors import ShapeError
from ..core.registry import build, register, register_namespace
from ..diffusion.levels import level_dtype
from ..metrics.transport import assignment, host_cost, squared_distances
from .base import ShowsFields


class Pairs(NamedTuple):
    """Re-paired rows: ``x0[i]``, ``x1[j]`` and the labels re-indexed alike (None where none were given)."""

    x0: Tensor
    x1: Tensor
    labels0: Tensor | None = None
    labels1: Tensor | None = None


def _rows(who: str, x0: Tensor, x1: Tensor, labels0: Tensor | None = None,
          labels1: Tensor | None = None, features: bool = True) -> int:
    """The batch size B after checking x0 [B, ...], x1 [B, ...] (the same number of features per row
    when ``features``, for a cost) and labels [B]; ShapeError (a ValueError) naming what is wrong."""
    if x0.ndim < 1 or x1.ndim < 1:
        raise ShapeError(f"{who}: x0 and x1 must be batches [B, ...], got shapes {list(x0.shape)} and "
                         f"{list(x1.shape)}")
    b = x0.shape[0]
    if x1.shape[0] != b:
        raise ShapeError(f"{who}: x0 has {b} rows and x1 has {x1.shape[0]}; a coupling pairs batches of one size "
                         f"B (shapes {list(x0.shape)} and {list(x1.shape)})")
    if features and math.prod(x0.shape[1:]) != math.prod(x1.shape[1:]):
        raise ShapeError(f"{who}: a row of x0 has {math.prod(x0.shape[1:])} values and a row of x1 "
                         f"{math.prod(x1.shape[1:])}; the cost "
                         f"|x0_i - x1_j|^2 needs rows of one size (shapes {list(x0.shape)} and {list(x1.shape)})")
    for name, labels in (("labels0", labels0), ("labels1", labels1)):
        if labels is not None and tuple(labels.shape) != (b,):
            raise ShapeError(f"{who}: {name} must have shape [{b}] (one label per row), got {list(labels.shape)}")
    return b


MULTINOMIAL_LIMIT = 2**24  # torch.multinomial's most categories: larger plans are drawn from in two steps


def draw_from_plan(plan: Tensor, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """n index pairs (i [n], j [n]) drawn with replacement with probability plan[i, j] / sum(plan), as
    torchcfm's ``OTPlanSampler.sample_map`` (which uses numpy's global RNG; here ``generator``, on the
    plan's device)."""
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=plan.device)
        return empty, empty
    if plan.numel() <= MULTINOMIAL_LIMIT:
        flat = torch.multinomial(plan.reshape(-1), n, replacement=True, generator=generator)
        return torch.div(flat, plan.shape[1], rounding_mode="floor"), flat % plan.shape[1]
    i = torch.multinomial(plan.sum(1), n, replacement=True, generator=generator)  # the same law in two steps:
    return i, torch.multinomial(plan[i], 1, generator=generator)[:, 0]  # a row i, then j given i


class Coupling(ShowsFields):
    """Base class: a pairing of source rows x0 [B, ...] with data rows x1 [B, ...].

    Subclasses define :meth:`indices`; :meth:`pair` applies them, :meth:`plan` is the [B, B] transport
    plan (total mass 1) the pairs are drawn from.
    """

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                labels0: Tensor | None = None, labels1: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Row indices (i [B], j [B], int64 on the inputs' device): the pairs are (x0[i_k], x1[j_k])."""
        raise NotImplementedError

    def pair(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
             labels0: Tensor | None = None, labels1: Tensor | None = None) -> Pairs:
        """(x0[i], x1[j], labels0[i], labels1[j]) for the pairs of :meth:`indices` (labels None if not given)."""
        i, j = self.indices(x0, x1, generator, labels0, labels1)
        return Pairs(x0[i], x1[j], None if labels0 is None else labels0[i], None if labels1 is None else labels1[j])

    def plan(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
             labels0: Tensor | None = None, labels1: Tensor | None = None) -> Tensor:
        """The plan [B, B] (float64, the inputs' device): here the empirical measure of the pairs,
        P_ij = #{k: (i_k, j_k) = (i, j)} / B; subclasses with a plan of their own return that."""
        b = _rows(type(self).__name__, x0, x1, labels0, labels1, features=False)
        i, j = self.indices(x0, x1, generator, labels0, labels1)
        p = torch.zeros(b * b, dtype=level_dtype(x0.device), device=x0.device)
        p.index_add_(0, i * b + j, torch.full((len(i),), 1.0 / max(b, 1), dtype=p.dtype, device=p.device))
        return p.reshape(b, b)


register_namespace("coupling", Coupling, "pairings of source and target samples")


@register("coupling", "independent")
class Independent(Coupling):
    """The pairs as given: x0_k with x1_k (the independent coupling q(x0) q(x1) of CFM; Lipman et al.
    2023, Tong et al. 2023 Eq. 16)."""

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                labels0: Tensor | None = None, labels1: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b = _rows("independent", x0, x1, labels0, labels1, features=False)
        k = torch.arange(b, device=x1.device)
        return k, k

    def pair(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
             labels0: Tensor | None = None, labels1: Tensor | None = None) -> Pairs:
        """The rows themselves (no copy)."""
        _rows("independent", x0, x1, labels0, labels1, features=False)
        return Pairs(x0, x1, labels0, labels1)

    def plan(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
             labels0: Tensor | None = None, labels1: Tensor | None = None) -> Tensor:
        """The product plan 1 / B^2 everywhere (of which the given pairs are a draw)."""
        b = _rows("independent", x0, x1, labels0, labels1, features=False)
        return torch.full((b, b), 1.0 / max(b, 1) ** 2, dtype=level_dtype(x0.device), device=x0.device)


@register("coupling", "exact_ot")
class ExactOT(Coupling):
    """Minibatch OT (Tong et al. 2023, Eq. 17; Pooladian et al. 2023): the exact plan for the squared
    Euclidean cost, a permutation, by the linear assignment solver (see the module docstring).

    Args:
        replace: False (default): the permutation itself: every x1 row once, in its order (j = 0..B-1,
            so conditioning aligned with x1 stays aligned), x0 reordered to its partners. True: B pairs
            drawn from the plan with replacement, as torchcfm's ``OTPlanSampler.sample_plan`` does
            (some pairs twice, others not at all).
    """

    def __init__(self, replace: bool = False) -> None:
        self.replace = replace

    def permutation(self, x0: Tensor, x1: Tensor) -> Tensor:
        """sigma [B] (int64, the inputs' device): x1_j's partner is x0_sigma(j) in the OT plan."""
        _rows("exact_ot", x0, x1)
        cost = host_cost("exact_ot", squared_distances(x1, x0))  # [B1, B0]: a row per x1, contiguous
        return torch.as_tensor(assignment(cost), device=x1.device)

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                labels0: Tensor | None = None, labels1: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b = _rows("exact_ot", x0, x1, labels0, labels1)
        sigma = self.permutation(x0, x1)
        j = torch.arange(b, device=x1.device)
        if self.replace and b:  # the plan is uniform on its B entries (sigma(j), j): draw B of them
            j = torch.randint(b, (b,), generator=generator, device=x1.device)
        return sigma[j], j

    def plan(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
             labels0: Tensor | None = None, labels1: Tensor | None = None) -> Tensor:
        """The OT plan [B, B]: 1 / B at (sigma(j), j), 0 elsewhere."""
        b = _rows("exact_ot", x0, x1, labels0, labels1)
        p = torch.zeros(b, b, dtype=level_dtype(x0.device), device=x0.device)
        p[self.permutation(x0, x1), torch.arange(b, device=x0.device)] = 1.0 / max(b, 1)
        return p


def sinkhorn_plan(cost: Tensor, reg: float, iterations: int = 1000, tolerance: float = 1e-9) -> tuple[Tensor, float]:
    """The entropic OT plan P [B0, B1] between uniform weights for ``cost`` M [B0, B1], and its
    marginal error (NaN when not measured).

    P = argmin_{P in U(a, b)} <P, M> - reg H(P), H(P) = -sum P (log P - 1) (Cuturi 2013; ``ot.sinkhorn``'s
    convention: ``reg`` in the units of M, not relative to it), by Sinkhorn iterations in the log
    domain (Peyré & Cuturi 2019, Sec. 4.4; no underflow for small reg): with f, g the scaled dual
    potentials, g <- log b - LSE_i(f_i - M_ij / reg), then f <- log a - LSE_j(g_j - M_ij / reg), and
    P_ij = exp(f_i + g_j - M_ij / reg). The rows' marginal is exact after each sweep; every 10 sweeps
    the L1 error of the columns' marginal, sum_j |sum_i P_ij - b_j|, is measured, and the loop stops
    once it is <= ``tolerance`` (0: never measured, all ``iterations`` run, no host synchronisation).
    """
    n0, n1 = cost.shape
    if cost.numel() == 0:
        return torch.zeros_like(cost), 0.0
    scaled = -cost / reg
    log_a = torch.full((n0,), -math.log(n0), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((n1,), -math.log(n1), dtype=cost.dtype, device=cost.device)
    f = torch.zeros_like(log_a)
    error = math.nan
    for k in range(iterations):
        g = log_b - torch.logsumexp(scaled + f[:, None], dim=0)
        f = log_a - torch.logsumexp(scaled + g[None, :], dim=1)
        if tolerance > 0 and ((k + 1) % 10 == 0 or k + 1 == iterations):
            error = float((torch.logsumexp(scaled + f[:, None] + g[None, :], dim=0).exp() - log_b.exp()).abs().sum())
            if error <= tolerance:
                break
    return (scaled + f[:, None] + g[None, :]).exp(), error


@register("coupling", "sinkhorn")
class Sinkhorn(Coupling):
    """Entropic minibatch OT (Cuturi 2013), the coupling of Schrödinger-bridge CFM (Tong et al. 2023,
    Sec. 4, with reg = 2 sigma^2; torchcfm's ``SchrodingerBridgeConditionalFlowMatcher(sigma,
    ot_method="sinkhorn")``): B pairs drawn from the plan with replacement (torchcfm's ``sample_plan``).

    Args:
        reg: the entropic regularisation (> 0), absolute, in the units of the squared-Euclidean cost
            (``ot.sinkhorn``'s convention). Large: the independent coupling; small: exact OT. The default
            2 is 2 sigma^2 for the ``schrodinger_bridge`` path's default sigma = 1 (torchcfm's SB-CFM).
        iterations: most Sinkhorn sweeps (>= 1); the number needed grows like the cost's scale / reg
            (2-D N(0, I) against N(0, I), B = 128, mean cost 4, tolerance 1e-6: under 100 sweeps for
            reg = 0.5, 1000-10000 for reg = 0.05): for a small reg prefer ``exact_ot``.
        tolerance: stop once the L1 marginal error is at most this (>= 0; 0 runs every sweep). A plan
            that misses it is still used, with a RuntimeWarning.
    """

    def __init__(self, reg: PositiveFloat = 2.0, iterations: PositiveInt = 1000,
                 tolerance: NonNegativeFloat = 1e-6) -> None:
        self.reg, self.iterations, self.tolerance = reg, iterations, tolerance

    def plan(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
             labels0: Tensor | None = None, labels1: Tensor | None = None) -> Tensor:
        """The entropic plan [B, B] (:func:`sinkhorn_plan`), on the inputs' device in float64."""
        _rows("sinkhorn", x0, x1, labels0, labels1)
        p, error = sinkhorn_plan(squared_distances(x0, x1), self.reg, self.iterations, self.tolerance)
        if self.tolerance > 0 and not error <= self.tolerance:
            warnings.warn(f"sinkhorn: marginal error {error:.3g} > tolerance {self.tolerance:g} after "
                          f"{self.iterations} iterations (reg={self.reg:g}); raise iterations or reg",
                          RuntimeWarning, stacklevel=2)
        return p

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                labels0: Tensor | None = None, labels1: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return draw_from_plan(self.plan(x0, x1, None, labels0, labels1), x0.shape[0], generator)


Surplus = Literal["draw", "cheapest"]


@register("coupling", "label_ot")
class LabelOT(Coupling):
    """Exact minibatch OT within each class: x1_j is paired only with a source row of its class
    (class-conditional OT-CFM; what torchcfm's ``guided_sample_location_and_conditional_flow`` does not
    do: its plan ignores the labels).

    Every x1 row appears once, in its order (j = 0..B-1). For a class c with n1 data rows and n0 >= 1
    source rows, the n1 partners form a multiset S of the class's sources, and the data rows are
    assigned to S by the exact assignment on the squared-Euclidean cost:

    - n1 > n0 (too few sources): every source is used floor(n1 / n0) times and a uniformly drawn subset
      (``generator``) of n1 mod n0 of them once more, so the sources stay (nearly) uniformly weighted;
    - n1 < n0 (surplus sources), ``surplus="draw"`` (default): S is a uniformly drawn subset of n1
      sources, so the source marginal stays unbiased (a random subset of noise is still noise);
      ``surplus="cheapest"``: the rectangular assignment picks the n1 sources of least total cost
      (each x1 its own source; the lowest cost, but the sources used lean towards the data);
    - n1 = n0: the class's exact OT permutation (no draw).

    ``labels1`` [B] is required; ``labels0=None`` means an unlabelled source (noise): its rows take the
    data's labels position by position (labels0 = labels1), i.e. the batch of noise is split among the
    classes in the data's proportions. A class with data rows but no source rows is a ValueError.
    Labels are integer (or bool) tensors.
    """

    def __init__(self, surplus: Surplus = "draw") -> None:
        if surplus not in ("draw", "cheapest"):
            raise ValueError(f"LabelOT: surplus must be 'draw' or 'cheapest', got {surplus!r}")
        self.surplus = surplus

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                labels0: Tensor | None = None, labels1: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b = _rows("label_ot", x0, x1, labels0, labels1)
        if labels1 is None:
            raise ValueError("label_ot: labels1 (the data's labels [B]) is required; pass labels0 too when the "
                             "source is labelled (None: unlabelled noise, split like the data)")
        for name, labels in (("labels0", labels0), ("labels1", labels1)):
            if labels is not None and (labels.is_floating_point() or labels.is_complex()):
                raise ValueError(f"label_ot: {name} must be integer class labels, got dtype {labels.dtype}")
        if labels0 is None:
            labels0 = labels1
        cost = host_cost("label_ot", squared_distances(x0, x1))
        l0, l1 = labels0.detach().cpu().numpy(), labels1.detach().cpu().numpy()
        partner = np.empty(b, dtype=np.int64)
        for c in np.unique(l1):
            rows1, rows0 = np.flatnonzero(l1 == c), np.flatnonzero(l0 == c)
            n1, n0 = len(rows1), len(rows0)
            if n0 == 0:
                raise ValueError(f"label_ot: class {c.item()!r} has {n1} data rows (labels1) but no source rows "
                                 "(labels0); every class of labels1 needs at least one source row of its class")
            if n0 > n1 and self.surplus == "cheapest":
                sources = rows0
            else:
                q, r = divmod(n1, n0)
                extra = rows0[self._draw(n0, r, generator, x1.device)] if r else rows0[:0]
                sources = np.concatenate([np.tile(rows0, q), extra])
            partner[rows1] = sources[assignment(cost[np.ix_(sources, rows1)].T)]
        return torch.as_tensor(partner, device=x1.device), torch.arange(b, device=x1.device)

    @staticmethod
    def _draw(n: int, k: int, generator: torch.Generator | None, device: torch.device) -> np.ndarray:
        """k distinct indices of 0..n-1, uniformly drawn (``generator``, on ``device``)."""
        return torch.randperm(n, generator=generator, device=device)[:k].cpu().numpy()


def plan(x0: Tensor, x1: Tensor, method: Coupling | str | Mapping = "exact_ot", generator: torch.Generator | None = None,
         labels0: Tensor | None = None, labels1: Tensor | None = None) -> Tensor:
    """The transport plan P [B, B] (float64, total mass 1, P_ij the weight of the pair (x0_i, x1_j)) of
    ``method``: a :class:`Coupling`, or a registered name / ``{type: name, ...}`` config of one.

    independent: 1 / B^2; exact_ot: the OT permutation / B (as ``ot.emd(unif, unif, M)``); sinkhorn: the
    entropic plan (as ``ot.sinkhorn(unif, unif, M, reg)``); label_ot: its pairs' empirical measure.
    """
    coupling = build("coupling", method, path="plan.method", source="genlab.objectives.couplings.plan")
    if not isinstance(coupling, Coupling):
        raise TypeError(f"plan: method must be a Coupling, a registered coupling's name or config, got {method!r}")
    return coupling.plan(x0, x1, generator, labels0, labels1)
