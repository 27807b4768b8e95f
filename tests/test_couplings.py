"""Couplings of flow matching (genlab.objectives.couplings) against POT as the oracle: the exact plan's
cost equals ``ot.emd``'s, the entropic plan equals ``ot.sinkhorn``'s, label-aware OT stays within classes
at the cost of POT's emd on each class; draws come from the plan and the generator; dtypes and devices
are kept; bad values are refused with messages that name them."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.core.registry import build, registered
from genlab.objectives import couplings
from genlab.objectives.couplings import (Coupling, ExactOT, Independent, LabelOT, Sinkhorn, assignment, draw_from_plan,
                                         plan, sinkhorn_plan)
from genlab.testing.devices import DeviceAudit, generator_on


def batches(b: int, shape: tuple[int, ...], seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Source x0 ~ N(0, I) and data x1 from a shifted, stretched Gaussian mixture, [b, *shape]."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=dtype)
    centres = 3 * torch.randn(4, *shape, generator=g, dtype=dtype)
    x1 = centres[torch.randint(4, (b,), generator=g)] + 0.5 * torch.randn(b, *shape, generator=g, dtype=dtype)
    return x0, x1


def pot_cost(x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
    """M_ij = |x0_i - x1_j|^2 computed by POT in numpy (independently of genlab's torch.cdist)."""
    a, b = x0.reshape(len(x0), -1).numpy(), x1.reshape(len(x1), -1).numpy()
    return ot.dist(a, b, metric="sqeuclidean")


SHAPES = [(1, (2,)), (8, (2,)), (64, (10,)), (256, (2,)), (256, (10,)), (32, (1, 4, 4)), (256, (1, 4, 4))]


@pytest.mark.parametrize("b,shape", SHAPES, ids=lambda v: str(v))
def test_exact_ot_plan_is_a_permutation_with_the_cost_of_pot_emd(b, shape):
    x0, x1 = batches(b, shape, seed=b)
    m = pot_cost(x0, x1)
    reference = ot.emd(ot.unif(b), ot.unif(b), m)
    p = plan(x0, x1, "exact_ot")
    assert p.dtype == torch.float64 and p.shape == (b, b)
    cost, expected = float((p.numpy() * m).sum()), float((reference * m).sum())
    assert abs(cost - expected) <= 1e-9 * max(1.0, expected), (cost, expected)
    assert bool(((p == 0) | (p == 1.0 / b)).all())  # a permutation / B
    assert bool((p.sum(0) == 1.0 / b).all()) and bool((p.sum(1) == 1.0 / b).all())


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
@pytest.mark.parametrize("clustered", [False, True])
def test_the_warm_started_assignment_is_exact_on_clustered_and_extreme_costs(scale, clustered, monkeypatch):
    """The entropic start (n >= WARM_START) only moves the duals: the optimum stays that of the solver started
    from row minima, and no worse than POT's (which at scale 1e-6 stops 1e-6 above it), also where the float32
    kernel under- or overflows (tiny and huge costs) and on clustered batches (many near ties)."""
    from genlab.metrics import transport
    from genlab.metrics.transport import WARM_START, assignment, entropic_potentials

    g = torch.Generator().manual_seed(3)
    n = WARM_START + 36
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, 2, generator=g, dtype=torch.float64) + 3
    if clustered:  # 4 tight clusters of sources, data on a circle
        x0 = 3 * torch.randn(4, 2, generator=g, dtype=torch.float64)[torch.arange(n) % 4] + 0.01 * x0
    m = pot_cost(scale * x0, scale * x1)
    sigma = assignment(m, solver="scipy")
    assert sorted(sigma.tolist()) == list(range(n))
    cost = m[np.arange(n), sigma].sum()
    assert cost <= float((ot.emd(ot.unif(n), ot.unif(n), m) * m).sum()) * n * (1 + 1e-9)
    monkeypatch.setattr(transport, "WARM_START", n + 1)
    plain = assignment(m, solver="scipy")
    assert abs(cost - m[np.arange(n), plain].sum()) <= 1e-12 * cost
    u = entropic_potentials(m)
    assert u.shape == (n,) and np.isfinite(u).all()


def test_entropic_potentials_approach_the_optimal_duals():
    """The warm start is close to the assignment's optimal duals (POT's, up to a constant), much closer than the
    row minima it replaces: the reason it speeds the solver up."""
    from genlab.metrics.transport import entropic_potentials

    x0, x1 = batches(256, (2,), seed=5)
    m = pot_cost(x0, x1)
    exact = ot.emd(ot.unif(256), ot.unif(256), m, log=True)[1]["u"]

    def spread(u: np.ndarray) -> float:
        d = u - exact
        return float(np.std(d - d.mean()))

    assert spread(entropic_potentials(m)) < 0.2 * spread(m.min(axis=1))


def test_exact_ot_pairs_keep_the_data_order_and_reorder_the_source():
    x0, x1 = batches(64, (3,))
    pairs = ExactOT().pair(x0, x1)
    assert torch.equal(pairs.x1, x1)
    p = plan(x0, x1, ExactOT())
    i = p.argmax(0)  # the partner of each x1 in the plan
    assert torch.equal(pairs.x0, x0[i])
    assert sorted(i.tolist()) == list(range(64))
    cost = (pairs.x0 - pairs.x1).square().sum()  # B <P, M>, below the given pairs' cost
    assert abs(cost - 64 * (p * torch.cdist(x0, x1) ** 2).sum()) < 1e-9 * cost and cost < (x0 - x1).square().sum()


def test_exact_ot_with_replace_draws_pairs_from_the_plan():
    b = 256
    x0, x1 = batches(b, (2,))
    p = plan(x0, x1, "exact_ot")
    coupling = ExactOT(replace=True)
    i, j = coupling.indices(x0, x1, torch.Generator().manual_seed(1))
    assert bool((p[i, j] > 0).all())  # every drawn pair is a pair of the plan
    distinct = len(set(zip(i.tolist(), j.tolist())))
    assert abs(distinct - b * (1 - math.exp(-1))) < 5 * math.sqrt(b * 0.25), distinct  # B draws from B atoms
    again = coupling.indices(x0, x1, torch.Generator().manual_seed(1))
    other = coupling.indices(x0, x1, torch.Generator().manual_seed(2))
    assert torch.equal(i, again[0]) and torch.equal(j, again[1]) and not torch.equal(j, other[1])
    pairs = coupling.pair(x0, x1, torch.Generator().manual_seed(1))
    assert torch.equal(pairs.x0, x0[i]) and torch.equal(pairs.x1, x1[j])


@pytest.mark.parametrize("b,shape,reg", [(16, (2,), 1.0), (64, (2,), 2.0), (64, (10,), 5.0), (32, (1, 4, 4), 2.0)])
def test_sinkhorn_plan_equals_pot_sinkhorn(b, shape, reg):
    x0, x1 = batches(b, shape, seed=b + 1)
    m = pot_cost(x0, x1)
    reference = ot.sinkhorn(ot.unif(b), ot.unif(b), m, reg, numItermax=100_000, stopThr=1e-14)
    p = plan(x0, x1, Sinkhorn(reg=reg, iterations=100_000, tolerance=1e-13)).numpy()
    np.testing.assert_allclose(p, reference, rtol=1e-6, atol=1e-15)
    assert abs(p.sum() - 1) < 1e-12


def test_sinkhorn_with_a_small_reg_equals_pot_log_domain_sinkhorn():
    """reg = 0.08 against costs up to ~42: exp(-M / reg) down to 1e-230 (near float64's underflow), thousands
    of sweeps; POT's log-domain solver is the oracle."""
    x0, x1 = batches(16, (2,), seed=5)
    m = pot_cost(x0, x1)
    reference = ot.sinkhorn(ot.unif(16), ot.unif(16), m, 0.08, method="sinkhorn_log", numItermax=100_000,
                            stopThr=1e-13)
    p = plan(x0, x1, Sinkhorn(reg=0.08, iterations=100_000, tolerance=1e-13)).numpy()
    np.testing.assert_allclose(p, reference, rtol=1e-6, atol=1e-14)


def test_sinkhorn_plan_of_a_non_square_cost_and_its_warning():
    cost = torch.rand(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p, error = sinkhorn_plan(cost, 0.3, 10_000, 1e-14)
    reference = ot.sinkhorn(ot.unif(5), ot.unif(7), cost.numpy(), 0.3, numItermax=100_000, stopThr=1e-14)
    np.testing.assert_allclose(p.numpy(), reference, rtol=1e-6)
    assert error <= 1e-14
    x0, x1 = batches(16, (2,))
    with pytest.warns(RuntimeWarning, match="sinkhorn: marginal error .* > tolerance 1e-12 after 1 iterations"):
        Sinkhorn(reg=0.01, iterations=1, tolerance=1e-12).plan(x0, x1)


def test_draws_from_a_plan_follow_it():
    p = torch.rand(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    p /= p.sum()
    n = 200_000
    i, j = draw_from_plan(p, n, torch.Generator().manual_seed(1))
    freq = torch.zeros(36, dtype=torch.float64).index_add_(0, i * 6 + j, torch.ones(n, dtype=torch.float64)) / n
    assert bool(((freq - p.reshape(-1)).abs() <= 5 * (p.reshape(-1) / n).sqrt() + 1e-9).all())


def test_draws_from_a_plan_too_large_for_one_multinomial_follow_it(monkeypatch):
    """Above torch.multinomial's 2^24 categories a row is drawn, then a column given the row."""
    monkeypatch.setattr(couplings, "MULTINOMIAL_LIMIT", 0)
    test_draws_from_a_plan_follow_it()


def test_empty_batches_and_one_value_rows():
    empty, labels = torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
    for name in ("independent", "exact_ot", "sinkhorn", "label_ot"):
        coupling = build("coupling", name)
        assert coupling.pair(empty, empty, None, labels, labels).x0.shape == (0, 2)
        assert coupling.plan(empty, empty, None, labels, labels).shape == (0, 0)
    x0, x1 = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([10.0, 30.0, 20.0])  # rows of one value: sorted order
    assert ExactOT().pair(x0, x1).x0.tolist() == [1.0, 3.0, 2.0]


def test_sinkhorn_pairs_are_drawn_from_its_plan_with_the_generator():
    x0, x1 = batches(32, (2,))
    coupling = Sinkhorn(reg=1.0)
    p = coupling.plan(x0, x1)
    expected = draw_from_plan(p, 32, torch.Generator().manual_seed(3))
    i, j = coupling.indices(x0, x1, torch.Generator().manual_seed(3))
    assert torch.equal(i, expected[0]) and torch.equal(j, expected[1])
    labels0, labels1 = torch.arange(32), torch.arange(32) + 100
    pairs = coupling.pair(x0, x1, torch.Generator().manual_seed(3), labels0, labels1)
    assert torch.equal(pairs.x0, x0[i]) and torch.equal(pairs.x1, x1[j])
    assert torch.equal(pairs.labels0, labels0[i]) and torch.equal(pairs.labels1, labels1[j])


def test_sinkhorn_with_a_large_reg_is_the_independent_plan():
    x0, x1 = batches(16, (2,))
    assert torch.allclose(plan(x0, x1, Sinkhorn(reg=1e6)), plan(x0, x1, "independent"), rtol=1e-3)


def class_labels(counts: list[int], seed: int) -> torch.Tensor:
    """Labels with counts[c] rows of class c, shuffled."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("surplus", ["draw", "cheapest"])
def test_label_ot_never_pairs_across_classes(seed, surplus):
    g = torch.Generator().manual_seed(seed)
    labels0, labels1 = torch.randint(5, (96,), generator=g), torch.randint(5, (96,), generator=g)
    labels0[:5] = torch.arange(5)  # every class has a source row
    x0, x1 = batches(96, (3,), seed=seed)
    i, j = LabelOT(surplus).indices(x0, x1, g, labels0, labels1)
    assert torch.equal(j, torch.arange(96)) and torch.equal(labels0[i], labels1)
    pairs = LabelOT(surplus).pair(x0, x1, torch.Generator().manual_seed(0), labels0, labels1)
    assert torch.equal(pairs.labels0, pairs.labels1) and torch.equal(pairs.x1, x1)


COUNTS0, COUNTS1 = [10, 14, 8, 1], [10, 6, 16, 1]  # equal, more sources, fewer sources, a single pair


def class_costs(x0, x1, labels0, labels1, i):
    """Per class c: (the pairs' cost sum_j M[i_j, j] over x1 rows of class c, its rows, its sources)."""
    m = pot_cost(x0, x1)
    for c in range(len(COUNTS0)):
        rows1 = np.flatnonzero(labels1.numpy() == c)
        yield c, m[i[rows1], rows1].sum(), rows1, np.flatnonzero(labels0.numpy() == c), m


def test_label_ot_draw_has_the_cost_of_pot_emd_on_each_class():
    x0, x1 = batches(33, (2,), seed=7)
    labels0, labels1 = class_labels(COUNTS0, 1), class_labels(COUNTS1, 2)
    i, _ = LabelOT().indices(x0, x1, torch.Generator().manual_seed(0), labels0, labels1)
    i = i.numpy()
    for c, cost, rows1, rows0, m in class_costs(x0, x1, labels0, labels1, i):
        used = np.bincount(i[rows1], minlength=33)[rows0]  # how often each source of the class partners
        n1, n0 = len(rows1), len(rows0)
        assert set(used.tolist()) <= {n1 // n0, -(-n1 // n0)} and used.sum() == n1, (c, used)
        sources = i[rows1]  # the drawn multiset: emd between it and the class's data is the assignment's cost
        reference = ot.emd2(ot.unif(n1), ot.unif(n1), m[np.ix_(np.sort(sources), rows1)]) * n1
        assert abs(cost - reference) <= 1e-9 * max(1.0, reference), (c, cost, reference)
        if n0 == n1:  # the class's exact OT: POT's emd on the class's rows
            assert abs(cost - ot.emd2(ot.unif(n0), ot.unif(n1), m[np.ix_(rows0, rows1)]) * n1) <= 1e-9 * cost


def test_label_ot_cheapest_has_the_cost_of_pot_partial_emd_on_each_class():
    """With more sources than data in a class, the rectangular assignment equals POT's emd with a dummy
    data row taking the unused sources' mass at zero cost (partial OT of the n1 data rows)."""
    x0, x1 = batches(33, (2,), seed=8)
    labels0, labels1 = class_labels(COUNTS0, 3), class_labels(COUNTS1, 4)
    i, _ = LabelOT("cheapest").indices(x0, x1, torch.Generator().manual_seed(0), labels0, labels1)
    i = i.numpy()
    for c, cost, rows1, rows0, m in class_costs(x0, x1, labels0, labels1, i):
        n1, n0 = len(rows1), len(rows0)
        if n0 < n1:
            continue  # drawn duplicates as under surplus="draw" (tested there)
        block = np.concatenate([m[np.ix_(rows0, rows1)], np.zeros((n0, 1))], axis=1)
        b = np.concatenate([np.ones(n1), [n0 - n1]]) / n0
        reference = ot.emd2(ot.unif(n0), b, block) * n0
        assert abs(cost - reference) <= 1e-9 * max(1.0, reference), (c, cost, reference)
        assert len(set(i[rows1].tolist())) == n1  # distinct sources


@pytest.mark.parametrize("n1,n0", [(1, 2), (3, 7), (20, 21), (16, 16)])
def test_the_assignment_equals_pot_emd_with_a_dummy_row_for_the_unused_columns(n1, n0):
    """assignment(cost [n1, n0]) gives each row its own column at the least total cost: POT's emd with the
    n0 - n1 unused columns' mass sent to a dummy row at zero cost (its reduction of the cost must not
    change the optimum: column minima may only be subtracted when every column is used)."""
    cost = torch.rand(n1, n0, generator=torch.Generator().manual_seed(n0), dtype=torch.float64).numpy() ** 2
    cols = assignment(cost)
    assert len(set(cols.tolist())) == n1
    padded = np.concatenate([cost, np.zeros((1, n0))])
    reference = ot.emd2(np.concatenate([np.ones(n1), [n0 - n1]]) / n0, ot.unif(n0), padded) * n0
    assert abs(cost[np.arange(n1), cols].sum() - reference) <= 1e-12 * max(1.0, reference)


def test_label_ot_cheapest_takes_the_nearer_source():
    """Class 0: one data row at 0, sources at 2 and 1; class 1: two data rows, one source (used twice)."""
    x0, x1 = torch.tensor([[2.0], [1.0], [5.0]]), torch.tensor([[0.0], [5.1], [4.9]])
    labels0, labels1 = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    i, _ = LabelOT("cheapest").indices(x0, x1, None, labels0, labels1)
    assert i.tolist() == [1, 2, 2]


def test_label_ot_unlabelled_source_takes_the_data_labels():
    x0, x1 = batches(40, (2,))
    labels1 = class_labels([13, 27], 0)
    pairs = LabelOT().pair(x0, x1, None, None, labels1)
    assert pairs.labels0 is None and torch.equal(pairs.labels1, labels1)
    i, _ = LabelOT().indices(x0, x1, None, None, labels1)
    assert torch.equal(labels1[i], labels1) and sorted(i.tolist()) == list(range(40))  # a permutation per class
    m = pot_cost(x0, x1)
    for c in (0, 1):
        rows = np.flatnonzero(labels1.numpy() == c)
        reference = ot.emd2(ot.unif(len(rows)), ot.unif(len(rows)), m[np.ix_(rows, rows)]) * len(rows)
        assert abs(m[i.numpy()[rows], rows].sum() - reference) <= 1e-9 * reference


def test_label_ot_plan_is_the_pairs_measure_and_blocks_classes():
    x0, x1 = batches(33, (2,), seed=9)
    labels0, labels1 = class_labels(COUNTS0, 5), class_labels(COUNTS1, 6)
    p = plan(x0, x1, "label_ot", torch.Generator().manual_seed(0), labels0, labels1)
    assert abs(float(p.sum()) - 1) < 1e-12 and bool((p.sum(0) == 1 / 33).all())
    assert float(p[labels0[:, None] != labels1[None, :]].abs().sum()) == 0


def test_label_ot_refuses_what_it_cannot_pair():
    x0, x1 = batches(6, (2,))
    with pytest.raises(ValueError, match="label_ot: labels1 .* is required"):
        LabelOT().pair(x0, x1)
    with pytest.raises(ValueError, match="label_ot: class 2 has 1 data rows .* but no source rows"):
        LabelOT().pair(x0, x1, None, torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels1 must be integer class labels, got dtype torch.float32"):
        LabelOT().pair(x0, x1, None, None, torch.zeros(6))
    with pytest.raises(ValueError, match="LabelOT: surplus must be 'draw' or 'cheapest', got 'random'"):
        LabelOT("random")


def test_the_independent_coupling_and_its_plan():
    x0, x1 = batches(8, (2,))
    pairs = Independent().pair(x0, x1, labels1=torch.arange(8))
    assert pairs.x0 is x0 and pairs.x1 is x1  # the rows themselves, not copies
    assert torch.equal(pairs.labels1, torch.arange(8)) and pairs.labels0 is None
    assert torch.equal(plan(x0, x1, "independent"), torch.full((8, 8), 1 / 64, dtype=torch.float64))


def test_registered_couplings_and_ranges():
    assert registered("coupling")["coupling"] == ["exact_ot", "independent", "label_ot", "sinkhorn"]
    assert isinstance(build("coupling", {"type": "sinkhorn", "reg": 0.5}), Sinkhorn)
    assert build("coupling", {"type": "exact_ot", "replace": True}).replace is True
    for kwargs, message in [({"reg": 0.0}, "Sinkhorn: reg must be > 0, got 0.0"),
                            ({"reg": -1.0}, "Sinkhorn: reg must be > 0, got -1.0"),
                            ({"iterations": 0}, "Sinkhorn: iterations must be >= 1, got 0"),
                            ({"tolerance": -1e-3}, "Sinkhorn: tolerance must be >= 0, got -0.001")]:
        with pytest.raises(ValueError, match=message):
            Sinkhorn(**kwargs)
    with pytest.raises(ConfigError, match=r"coupling.reg: expected float > 0, got float -0.5"):
        build("coupling", {"type": "sinkhorn", "reg": -0.5})
    with pytest.raises(ConfigError, match="unknown coupling 'exact'"):
        build("coupling", "exact")
    with pytest.raises(TypeError, match="plan: method must be a Coupling"):
        plan(*batches(4, (2,)), method=3)


@pytest.mark.parametrize("name", ["independent", "exact_ot", "sinkhorn", "label_ot"])
def test_bad_shapes_are_refused(name):
    coupling = build("coupling", name)
    x0, x1 = batches(6, (2,))
    with pytest.raises(ValueError, match=f"{name}: x0 has 5 rows and x1 has 6"):
        coupling.pair(x0[:5], x1, labels1=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels1 must have shape \[6\] \(one label per row\), got \[5\]"):
        coupling.pair(x0, x1, labels1=torch.zeros(5, dtype=torch.long))
    if name != "independent":
        with pytest.raises(ValueError, match="a row of x0 has 3 values and a row of x1 2"):
            coupling.pair(torch.zeros(6, 3), x1, labels1=torch.zeros(6, dtype=torch.long))


def test_non_finite_samples_are_refused_by_the_exact_solver():
    x0, x1 = batches(6, (2,))
    x0[2, 1] = math.nan
    with pytest.raises(ValueError, match="exact_ot: the cost matrix has 6 non-finite entries"):
        ExactOT().pair(x0, x1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["independent", "exact_ot", "sinkhorn", "label_ot"])
def test_pairs_keep_the_inputs_dtype_and_device(name, dtype):
    x0, x1 = batches(16, (1, 2, 2), dtype=dtype)
    labels = class_labels([7, 9], 0)
    options = {"exact_ot": {"replace": True}, "sinkhorn": {"reg": 50.0}}.get(name, {})
    pairs = build("coupling", {"type": name, **options}).pair(x0, x1, torch.Generator().manual_seed(0), labels, labels)
    for out in pairs[:2]:
        assert (out.dtype, out.device, out.shape) == (dtype, x0.device, x0.shape)
    assert pairs.labels0.dtype == labels.dtype
    # float32 inputs: the plan is still solved in float64, so it matches the float64 inputs' plan
    if name == "exact_ot":
        assert torch.equal(plan(x0, x1, name), plan(x0.double(), x1.double(), name))


def test_independent_coupling_runs_on_the_meta_device():
    """The solvers of exact_ot, sinkhorn (its convergence check) and label_ot need values: CPU only above."""
    x0, x1 = torch.empty(5, 3, device="meta"), torch.empty(5, 3, device="meta")
    with DeviceAudit():
        pairs = Independent().pair(x0, x1, generator_on("meta"))
        p = Independent().plan(x0, x1)
    assert all(v.device.type == "meta" and v.shape == (5, 3) for v in pairs[:2]) and p.device.type == "meta"


def test_sinkhorn_without_a_tolerance_runs_on_the_meta_device():
    x0, x1 = torch.empty(5, 3, device="meta"), torch.empty(5, 3, device="meta")
    with DeviceAudit() as audit:
        pairs = Sinkhorn(reg=1.0, iterations=3, tolerance=0.0).pair(x0, x1, generator_on("meta"))
    assert all(v.device.type == "meta" for v in pairs[:2]) and audit.draws == 1


def test_a_user_coupling_needs_only_indices():
    class Reverse(Coupling):
        def indices(self, x0, x1, generator=None, labels0=None, labels1=None):
            k = torch.arange(len(x0))
            return k.flip(0), k

    x0, x1 = batches(4, (2,))
    assert torch.equal(Reverse().pair(x0, x1).x0, x0.flip(0))
    assert torch.equal(Reverse().plan(x0, x1), torch.eye(4, dtype=torch.float64).flip(0) / 4)
