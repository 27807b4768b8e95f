"""Quantizers: vector-quantize-pytorch as the oracle (indices, quantized values, one EMA step, FSQ / LFQ codes,
residual VQ, grouped codebooks, the rotation trick's gradient), straight-through gradients, the commitment
loss's gradient, k-means initialisation, dead-code replacement, two gloo ranks, the config path, bad input."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.nn.functional as F

from genlab.core.errors import ConfigError, ShapeError
from genlab.core.registry import build
from genlab.models.quantizers import FSQ, LFQ, GroupedQuantizer, ResidualQuantizer, VectorQuantizer, rotation_trick



@pytest.fixture(scope="module")
def vqp():
    """The oracle, imported by the tests that use it only (not by the spawned ranks, which import this module)."""
    return pytest.importorskip("vector_quantize_pytorch")

TOL = dict(atol=1e-6, rtol=0)


def _copy_vq(theirs, ours: VectorQuantizer, head: int = 0) -> None:
    """Their codebook and EMA statistics (and projections) into ours."""
    cb = theirs._codebook
    with torch.no_grad():
        ours.codebook.copy_(cb.embed[head])
        ours.embed_sum.copy_(cb.embed_avg[head])
        ours.cluster_size.copy_(cb.cluster_size[head])
        if ours.projected:
            ours.project_in.load_state_dict(theirs.project_in.state_dict())
            ours.project_out.load_state_dict(theirs.project_out.state_dict())


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- oracle: VectorQuantize, FSQ, LFQ, ResidualVQ


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("codebook_dim", [None, 4], ids=["no_projection", "projection"])
def test_vq_equals_vector_quantize_pytorch(vqp, cosine: bool, codebook_dim: int | None) -> None:
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=32, codebook_dim=codebook_dim, use_cosine_sim=cosine,
                                rotation_trick=False, commitment_weight=0.25).eval()
    ours = VectorQuantizer(8, 32, codebook_dim, distance="cosine" if cosine else "l2", channel_last=True).eval()
    _copy_vq(theirs, ours)
    x = _x(4, 50, 8)
    q_ref, idx_ref, _ = theirs(x)
    q, idx, _ = ours(x)
    assert torch.equal(idx, idx_ref) and idx.unique().numel() > 8
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(ours.codes(idx), theirs.get_output_from_indices(idx), **TOL)


def test_vq_image_layout_equals_accept_image_fmap(vqp) -> None:
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=6, codebook_size=16, accept_image_fmap=True, rotation_trick=False).eval()
    ours = VectorQuantizer(6, 16).eval()  # channel-first [B, D, H, W]
    _copy_vq(theirs, ours)
    x = _x(2, 6, 5, 7)
    q_ref, idx_ref, _ = theirs(x)
    q, idx, _ = ours(x)
    assert idx.shape == (2, 5, 7) and torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, **TOL)
    assert torch.equal(ours.codes(idx), q)  # without a gradient, quantized is exactly the codes


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
def test_one_ema_step_equals_vector_quantize_pytorch(vqp, cosine: bool) -> None:
    """Training mode, decay 0.9: the counts, sums and codebook after one step; the commitment loss."""
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, decay=0.9, eps=1e-5, use_cosine_sim=cosine,
                                rotation_trick=False, commitment_weight=0.3).train()
    ours = VectorQuantizer(8, 16, distance="cosine" if cosine else "l2", decay=0.9, eps=1e-5, beta=0.3,
                           channel_last=True).train()
    _copy_vq(theirs, ours)
    x = _x(4, 40, 8)
    q_ref, idx_ref, loss_ref = theirs(x)
    q, idx, losses = ours(x)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(losses["commitment"], loss_ref, **TOL)
    cb = theirs._codebook
    torch.testing.assert_close(ours.cluster_size, cb.cluster_size[0], **TOL)
    torch.testing.assert_close(ours.embed_sum, cb.embed_avg[0], **TOL)
    torch.testing.assert_close(ours.codebook, cb.embed[0], **TOL)
    assert (ours.codebook - x.new_tensor(0)).abs().sum() > 0 and not torch.equal(ours.codebook, ours.embed_sum)


def test_grouped_vq_equals_separate_codebooks_per_head(vqp) -> None:
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, codebook_dim=4, heads=2, separate_codebook_per_head=True, decay=0.9,
                                rotation_trick=False).train()
    ours = GroupedQuantizer(VectorQuantizer(4, 16, decay=0.9), groups=2, channel_last=True).train()
    for g, group in enumerate(ours.groups):
        _copy_vq(theirs, group, head=g)
    x = _x(3, 20, 8)
    q_ref, idx_ref, loss_ref = theirs(x)
    q, idx, losses = ours(x)
    assert idx.shape == (3, 20, 2) and torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(losses["commitment"] / 0.25, loss_ref, **TOL)  # theirs: commitment weight 1
    for g, group in enumerate(ours.groups):
        torch.testing.assert_close(group.codebook, theirs._codebook.embed[g], **TOL)
    out = ours.eval()(x)
    assert torch.equal(ours.codes(out.indices), out.quantized)


def test_rotation_trick_equals_vector_quantize_pytorch_forward_and_gradient(vqp) -> None:
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, rotation_trick=True, ema_update=False).train()
    ours = VectorQuantizer(8, 16, gradient="rotation", channel_last=True).train()
    _copy_vq(theirs, ours)
    x, g = _x(2, 30, 8), _x(2, 30, 8, seed=1)
    x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    q_ref, idx_ref, _ = theirs(x_ref)
    q, idx, _ = ours(x_ours)
    (q_ref * g).sum().backward()
    (q * g).sum().backward()
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_rotation_trick_is_a_scaled_rotation() -> None:
    """Fifty et al. 2024: the Jacobian is |q| / |e| R with R orthogonal and R e_hat = q_hat."""
    e, q = _x(5, 6), 3 * _x(5, 6, seed=1)
    e.requires_grad_(True)
    out = rotation_trick(e, q)
    torch.testing.assert_close(out, q, atol=1e-5, rtol=1e-5)
    scale = q.norm(dim=-1, keepdim=True) / e.norm(dim=-1, keepdim=True)
    (grad,) = torch.autograd.grad(out, e, F.normalize(q, dim=-1), retain_graph=True)
    torch.testing.assert_close(grad, scale * F.normalize(e.detach(), dim=-1), atol=1e-5, rtol=1e-5)  # R^T q_hat = e_hat
    g = _x(5, 6, seed=2)
    (grad,) = torch.autograd.grad(out, e, g)
    torch.testing.assert_close(grad.norm(dim=-1, keepdim=True), scale * g.norm(dim=-1, keepdim=True))  # a rotation
    assert not torch.allclose(grad, scale * g, atol=1e-3)  # and not straight-through


@pytest.mark.parametrize("levels,dim", [([8, 5, 5, 5], None), ([7, 6, 5], 10)], ids=["8555", "765_projected"])
def test_fsq_equals_vector_quantize_pytorch(vqp, levels: list[int], dim: int | None) -> None:
    torch.manual_seed(0)
    theirs = vqp.FSQ(levels, dim=dim)
    ours = FSQ(levels, dim=dim, channel_last=True)
    if ours.projected:
        ours.project_in.load_state_dict(theirs.project_in.state_dict())
        ours.project_out.load_state_dict(theirs.project_out.state_dict())
    x = 2 * _x(3, 500, dim or len(levels))
    q_ref, idx_ref = theirs(x)
    q, idx, losses = ours(x)
    assert losses == {} and torch.equal(idx, idx_ref.long()) and idx.unique().numel() > 100
    torch.testing.assert_close(q, q_ref, **TOL)
    all_idx = torch.arange(ours.codebook_size).reshape(1, -1)
    torch.testing.assert_close(ours.codes(all_idx), theirs.indices_to_codes(all_idx), **TOL)
    codes = ours.lookup(all_idx)  # in code space (before the projection)
    assert torch.equal(ours.indices_of(codes), all_idx)  # the round trip
    assert torch.equal(ours.indices_of(codes), theirs.codes_to_indices(codes).long())


def test_lfq_equals_vector_quantize_pytorch(vqp) -> None:
    """Codes, indices (first channel most significant) and the entropy + commitment loss, in training mode."""
    theirs = vqp.LFQ(dim=6, codebook_size=64, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                     diversity_gamma=1.3).train()
    ours = LFQ(6, entropy_weight=0.1, commitment_weight=0.25, diversity_gamma=1.3, channel_last=True).train()
    x = 0.05 * _x(4, 64, 6)  # small: soft assignments, so the entropy terms matter
    q_ref, idx_ref, loss_ref = theirs(x)
    q, idx, losses = ours(x)
    assert torch.equal(idx, idx_ref) and idx.unique().numel() > 32
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(losses["entropy"] + losses["commitment"], loss_ref, **TOL)
    all_idx = torch.arange(64).reshape(1, -1)
    torch.testing.assert_close(ours.codes(all_idx), theirs.indices_to_codes(all_idx), **TOL)
    assert torch.equal(ours(ours.codes(all_idx)).indices, all_idx)


def test_residual_vq_equals_residual_vq_of_vector_quantize_pytorch(vqp) -> None:
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, decay=0.9, rotation_trick=False,
                            commitment_weight=0.25)
    ours = ResidualQuantizer(VectorQuantizer(8, 16, decay=0.9), num_quantizers=3, channel_last=True)
    for layer, stage in zip(theirs.layers, ours.stages):
        _copy_vq(layer, stage)
    x = _x(2, 64, 8)
    q_ref, idx_ref, _ = theirs.eval()(x)
    q, idx, _ = ours.eval()(x)
    assert idx.shape == (2, 64, 3) and torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(ours.codes(idx), theirs.get_output_from_indices(idx), **TOL)
    q_ref, idx_ref, losses_ref = theirs.train()(x)  # one EMA step of every stage on its own residuals
    q, idx, losses = ours.train()(x)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(losses["commitment"], losses_ref.sum(), **TOL)
    for layer, stage in zip(theirs.layers, ours.stages):
        torch.testing.assert_close(stage.codebook, layer._codebook.embed[0], **TOL)


# ---------------------------------------------------------------- gradients and losses


def _quantizers() -> dict[str, object]:
    torch.manual_seed(0)
    return {"vq_ema": VectorQuantizer(8, 16), "vq_gradient": VectorQuantizer(8, 16, learning="gradient"),
            "lfq": LFQ(8), "residual": ResidualQuantizer(VectorQuantizer(8, 16), 3),
            "grouped": GroupedQuantizer([VectorQuantizer(4, 16), LFQ(4)])}


@pytest.mark.parametrize("name", sorted(_quantizers()))
def test_straight_through_gradient_is_the_identity(name: str) -> None:
    q = _quantizers()[name].train()
    z, g = _x(2, 8, 3, 5).requires_grad_(True), _x(2, 8, 3, 5, seed=1)
    out = q(z)
    out.quantized.backward(g)
    assert torch.equal(z.grad, g)
    with torch.no_grad():  # without a gradient, the value is exactly the codes (of the codebook before the update)
        q.eval()
        out = q(z)
    assert torch.equal(q.codes(out.indices), out.quantized) and out.indices.shape[:3] == (2, 3, 5)


def test_fsq_rounds_straight_through_and_bounds_with_tanh() -> None:
    """The gradient is that of the bound tanh(z + s) h / floor(L / 2) (Mentzer et al. 2023, A.1): the round is skipped."""
    q = FSQ([8, 5, 5, 5], channel_last=True)
    z, g = _x(3, 10, 4).requires_grad_(True), _x(3, 10, 4, seed=1)
    q(z).quantized.backward(g)
    levels = torch.tensor([8.0, 5, 5, 5])
    half_l, offset = (levels - 1) * (1 + 1e-3) / 2, torch.tensor([0.5, 0, 0, 0])
    slope = (1 - torch.tanh(z.detach() + torch.atanh(offset / half_l)) ** 2) * half_l / torch.floor(levels / 2)
    torch.testing.assert_close(z.grad, g * slope)


def test_commitment_loss_trains_the_encoder_only_and_codebook_loss_the_codebook_only() -> None:
    """Eq. 3 of van den Oord et al.: beta weighs |z - sg(e)|^2 (encoder), not |sg(z) - e|^2 (codebook) as in
    taming-transformers' legacy quantizer: the codebook's gradient does not change with beta."""
    grads = {}
    for beta in (0.25, 1.0):
        torch.manual_seed(0)
        q = VectorQuantizer(8, 16, learning="gradient", beta=beta, channel_last=True).train()
        z = _x(4, 20, 8).requires_grad_(True)
        out = q(z)
        codes = q.codes(out.indices).detach()
        torch.testing.assert_close(out.losses["commitment"], beta * F.mse_loss(z.detach(), codes))
        torch.testing.assert_close(out.losses["codebook"], F.mse_loss(z.detach(), codes))
        z_commit, cb_commit = torch.autograd.grad(out.losses["commitment"], (z, q.codebook), retain_graph=True,
                                                  allow_unused=True)
        z_book, cb_book = torch.autograd.grad(out.losses["codebook"], (z, q.codebook), retain_graph=True,
                                              allow_unused=True)
        assert cb_commit is None and z_book is None  # no path at all
        torch.testing.assert_close(z_commit, beta * 2 * (z.detach() - codes) / z.numel())
        assert cb_book.abs().sum() > 0
        grads[beta] = (z_commit, cb_book)
    torch.testing.assert_close(grads[1.0][1], grads[0.25][1])  # beta is not on the codebook term
    torch.testing.assert_close(grads[1.0][0], 4 * grads[0.25][0])


# ---------------------------------------------------------------- k-means and dead codes

CENTERS = 4 + torch.randn(16, 8, generator=torch.Generator().manual_seed(0))  # far from the codebook's N(0, I)


def _clusters(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (CENTERS[torch.randint(0, 16, (n,), generator=g)] + 0.05 * torch.randn(n, 8, generator=g))[None]


def _usage_and_error(q: VectorQuantizer) -> tuple[int, float]:
    x = _clusters(4096, seed=999)
    with torch.no_grad():
        out = q.eval()(x)
    return out.indices.unique().numel(), F.mse_loss(out.quantized, x).item()


def test_kmeans_initialisation_finds_the_clusters_of_the_first_batch() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(8, 16, kmeans_init=True, channel_last=True)
    random_used, random_error = _usage_and_error(q)  # the random codebook: a few codes near the data
    q.train()(_clusters(512, seed=1))
    used, error = _usage_and_error(q)
    assert bool(q.initialized) and used >= 14 and error < random_error / 50, (used, error, random_error)  # measured: 15, 0.14, 13.9
    assert random_used <= 6


@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_dead_code_replacement_keeps_the_codebook_in_use(learning: str) -> None:
    """16 tight clusters far from a N(0, I) codebook collapse it onto a few codes; with codes whose EMA count
    falls below 1 replaced by batch vectors, at least 12 of 16 codes stay in use (measured: 16) and the error
    falls below a quarter of the collapsed one."""
    results = {}
    for threshold in (0.0, 1.0):
        torch.manual_seed(1)
        q = VectorQuantizer(8, 16, learning=learning, decay=0.9, dead_code_threshold=threshold, channel_last=True)
        opt = torch.optim.SGD(q.parameters(), lr=1.0) if learning == "gradient" else None
        for step in range(40):
            out = q.train()(_clusters(256, seed=step))
            if opt is not None:
                opt.zero_grad()
                out.losses["codebook"].backward()
                opt.step()
        results[threshold] = _usage_and_error(q)
    (plain_used, plain_error), (used, error) = results[0.0], results[1.0]
    assert plain_used <= 4 and used >= 12 and error < plain_error / 4, results


def test_dead_codes_get_batch_vectors_and_fresh_statistics() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(4, 8, decay=0.5, dead_code_threshold=0.8, channel_last=True).train()
    x = torch.full((1, 10, 4), 5.0) + 0.01 * _x(1, 10, 4)  # one cluster: all codes but one go dead
    q(x)
    replaced = q.cluster_size == 0.8
    assert int(replaced.sum()) >= 6
    rows = q.codebook[replaced]
    assert all(bool((row == x[0]).all(-1).any()) for row in rows)  # each one a vector of the batch
    torch.testing.assert_close(q.embed_sum[replaced], 0.8 * rows)


@pytest.mark.parametrize("threshold,count", [(0.0, 1.0), (0.5, 0.5)])
def test_codes_idle_for_w_batches_expire(threshold: float, count: float) -> None:
    """SoundStream's expiry: a code no vector chose in W = 3 consecutive batches is replaced at the third,
    not before, whatever its EMA count (0.99^3 > 0.5 here): by a batch vector, with count the threshold (1
    with none) and sum the vector times it; a code chosen in between starts its count of idle batches again."""
    q = VectorQuantizer(2, 4, decay=0.99, dead_code_threshold=threshold, dead_code_batches=3,
                        channel_last=True).train()
    start = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]])
    with torch.no_grad():
        q.codebook.copy_(start)
        q.embed_sum.copy_(start)
    near = [torch.tensor([[[0.1, 0.0], [9.9, 0.0], [0.0, 9.9]]]), torch.tensor([[[0.1, 0.0], [9.9, 0.0]]])]
    for step, x in enumerate([near[0], near[1], near[1]]):  # code 2 is idle at steps 2-3 only; code 3 at 1-3
        before = q.codebook.clone()
        q(x)
        assert q.idle.tolist() == [[0, 0, 0, 1], [0, 0, 1, 2], [0, 0, 2, 0]][step]
        if step < 2:
            assert (q.codebook[3] - before[3]).abs().max() < 0.1 and q.cluster_size[3] > 0.97  # not yet
    row = q.codebook[3]
    assert bool((row == near[1][0]).all(-1).any()), row  # a vector of the batch
    assert q.cluster_size[3].item() == count
    torch.testing.assert_close(q.embed_sum[3], count * row)
    assert q.cluster_size[2] > 0.97  # idle for two batches only: kept
    copy_ = VectorQuantizer(2, 4, dead_code_threshold=threshold, dead_code_batches=3, channel_last=True)
    copy_.load_state_dict(q.state_dict())  # the idle counts are state: a resumed run expires the same codes
    assert copy_.idle.tolist() == q.idle.tolist() == [0, 0, 2, 0]


def test_expiry_frees_codes_abandoned_by_the_data() -> None:
    """After 20 batches on one set of 16 clusters the data move to 16 new ones. With the EMA count alone
    (threshold 1, decay 0.99) the codes of the old clusters keep counts above the threshold for ~100 batches,
    so 10 batches later at most 4 codes serve the new clusters; with expiry after 2 idle batches at least 14 of
    16 do (measured: 1 and 16) and the error is below a tenth of the other's (measured: 1/57)."""
    moved = CENTERS + 8.0
    results = {}
    for batches in (0, 2):
        torch.manual_seed(1)
        q = VectorQuantizer(8, 16, decay=0.99, kmeans_init=True, dead_code_threshold=1.0,
                            dead_code_batches=batches, channel_last=True).train()
        for step in range(30):
            x = _clusters(256, seed=step)
            q(x if step < 20 else x + 8.0)
        g = torch.Generator().manual_seed(999)
        x = (moved[torch.randint(0, 16, (4096,), generator=g)] + 0.05 * torch.randn(4096, 8, generator=g))[None]
        with torch.no_grad():
            out = q.eval()(x)
        results[batches] = (out.indices.unique().numel(), F.mse_loss(out.quantized, x).item())
    (held_used, held_error), (used, error) = results[0], results[2]
    assert held_used <= 4 and used >= 14 and error < held_error / 10, results


# ---------------------------------------------------------------- two gloo ranks


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Each rank: the same initial modules, its own data and random draws; k-means, EMA steps, dead codes."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    # a timeout: ranks that fall out of step (different collectives) fail instead of waiting for ever
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        synced = VectorQuantizer(8, 16, kmeans_init=True, dead_code_threshold=2.0, decay=0.8, channel_last=True)
        torch.manual_seed(0)
        plain = VectorQuantizer(8, 16, decay=0.8, channel_last=True)
        torch.manual_seed(0)
        expiring = VectorQuantizer(8, 16, decay=0.8, dead_code_batches=1, channel_last=True)
        torch.manual_seed(100 + rank)  # different data and different draws on each rank
        data = torch.stack([2.0 * rank + torch.randn(2, 32, 8) for _ in range(4)])
        replaced = 0
        for x in data:
            synced.train()(x)
            plain.train()(x)
            expiring.train()(x)
            replaced = max(replaced, int((synced.cluster_size == 2.0).sum()))
        z = 0.05 * torch.randn(2, 32, 6)
        entropy = LFQ(6, channel_last=True).train()(z).losses["entropy"]
        torch.save({"synced": synced.codebook, "plain": plain.codebook, "expiring": expiring.codebook,
                    "data": data, "replaced": replaced,
                    "z": z, "entropy": entropy.detach()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_codebooks(tmp_path) -> None:
    """k-means initialisation, EMA statistics and dead-code replacement are shared: the ranks' codebooks are
    identical, and (without k-means and dead codes) equal to one process's on the two ranks' batches together;
    LFQ's batch entropy is that of both ranks' probabilities."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["replaced"] > 0 and r1["replaced"] == r0["replaced"]  # dead codes were replaced on the way
    assert torch.equal(r0["synced"], r1["synced"]) and torch.equal(r0["plain"], r1["plain"])
    # idle batches are counted over both ranks' choices: the same codes expire (some do: it differs from
    # plain, its twin from the same start), replaced by the same vectors
    assert torch.equal(r0["expiring"], r1["expiring"]) and not torch.equal(r0["expiring"], r0["plain"])
    torch.manual_seed(0)
    single = VectorQuantizer(8, 16, decay=0.8, channel_last=True).train()
    for x0, x1 in zip(r0["data"], r1["data"]):
        single(torch.cat([x0, x1]))
    torch.testing.assert_close(r0["plain"], single.codebook, atol=1e-5, rtol=1e-5)
    entropy = LFQ(6, channel_last=True).train()(torch.cat([r0["z"], r1["z"]])).losses["entropy"]
    torch.testing.assert_close((r0["entropy"] + r1["entropy"]) / 2, entropy, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- configs, layouts, dtypes, bad input


def test_built_from_config_with_nested_quantizers() -> None:
    q = build("quantizer", {"type": "residual", "num_quantizers": 2, "dim": 16,
                            "quantizer": {"type": "grouped", "groups": 2, "quantizer": {"type": "fsq", "levels": [5, 5]}}})
    assert isinstance(q, ResidualQuantizer) and q.index_shape == (2, 2) and q.projected
    stages = [g.groups for g in q.stages]
    assert all(isinstance(f, FSQ) for groups in stages for f in groups)
    out = q.eval()(_x(2, 16, 3, 3))
    assert out.quantized.shape == (2, 16, 3, 3) and out.indices.shape == (2, 3, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(q.codes(out.indices), q(_x(2, 16, 3, 3)).quantized)
    a, b = build("quantizer", {"type": "grouped", "groups": 2, "quantizer": {"type": "vq", "dim": 4, "codebook_size": 8}}).groups
    assert not torch.equal(a.codebook, b.codebook)  # copies get fresh codebooks
    with pytest.raises(ConfigError, match="codebook_sise.*did you mean 'codebook_size'"):
        build("quantizer", {"type": "vq", "dim": 4, "codebook_sise": 8})
    with pytest.raises(ConfigError, match="decay: expected float >= 0 and < 1"):
        build("quantizer", {"type": "vq", "dim": 4, "codebook_size": 8, "decay": 1.0})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_outputs_keep_the_input_dtype(dtype: torch.dtype) -> None:
    for name, q in _quantizers().items():
        out = q.train()(_x(2, 8, 4).to(dtype))
        assert out.quantized.dtype == dtype and out.indices.dtype == torch.long, name
        assert all(torch.isfinite(v) for v in out.losses.values()), name


def test_outputs_keep_the_memory_format_of_z() -> None:
    """``quantized`` of a contiguous ``[B, D, H, W]`` is contiguous (not the channels-last view the vectors come
    back in, which makes the next conv run other kernels), of a channels-last ``z`` channels-last; ``codes``
    is contiguous."""
    for name, q in _quantizers().items():
        for grad in (False, True):
            z = _x(2, 8, 3, 5).requires_grad_(grad)
            out = q.train()(z)
            assert out.quantized.is_contiguous(), (name, grad)
            last = q(z.detach().to(memory_format=torch.channels_last)).quantized
            assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous(), name
        assert q.codes(out.indices).is_contiguous(), name


@pytest.mark.parametrize("make,match", [
    (lambda: VectorQuantizer(8, 0), "codebook_size must be >= 1"),
    (lambda: VectorQuantizer(8, 16, distance="l1"), "distance must be one of 'l2', 'cosine', got 'l1'"),
    (lambda: VectorQuantizer(8, 16, learning="adam"), "learning must be one of 'ema', 'gradient'"),
    (lambda: VectorQuantizer(8, 16, decay=1.0), "decay must be >= 0 and < 1"),
    (lambda: VectorQuantizer(8, 16, dead_code_threshold=-1.0), "dead_code_threshold must be >= 0"),
    (lambda: VectorQuantizer(8, 16, dead_code_batches=-1), "dead_code_batches must be >= 0, got -1"),
    (lambda: FSQ([8, 2, 5]), "levels must be a non-empty list of ints >= 3"),
    (lambda: FSQ([]), "levels must be a non-empty list"),
    (lambda: LFQ(20), "2\\^20 codes per vector; use bits <= 16, entropy_weight=0, or a grouped quantizer"),
    (lambda: ResidualQuantizer(VectorQuantizer(8, 16, codebook_dim=4), 2), "projects 8 -> 4 itself; build it with dim = 4"),
    (lambda: ResidualQuantizer([VectorQuantizer(8, 16), VectorQuantizer(4, 16)]), "share one dim, got \\[8, 4\\]"),
    (lambda: GroupedQuantizer([FSQ([5, 5])], groups=3), "1 quantizers given but n = 3"),
])
def test_bad_construction_says_what_is_wrong_and_what_is_right(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_at_call_time() -> None:
    with pytest.raises(TypeError, match="expected a Quantizer or a non-empty list"):
        ResidualQuantizer("vq", 2)
    with pytest.raises(TypeError, match="codebook_size must be an int, got 16.0"):
        VectorQuantizer(8, 16.0)
    with pytest.raises(TypeError, match="dead_code_batches must be an int, got True"):
        VectorQuantizer(8, 16, dead_code_batches=True)
    with pytest.raises(TypeError, match="dim must be an int, got 8.0"):
        LFQ(8.0)
    with pytest.raises(ValueError, match="the groups' indices differ in shape"):
        GroupedQuantizer([VectorQuantizer(4, 8), ResidualQuantizer(VectorQuantizer(4, 8), 2)])
    q = VectorQuantizer(8, 16)
    with pytest.raises(ShapeError, match=r"expected z: \[B, D, ...\] with D = 8, got \[2, 5, 8\]; pass channel_last=True"):
        q(_x(2, 5, 8))
    assert LFQ(20, entropy_weight=0.0)(_x(2, 20)).indices.shape == (2,)
    r = ResidualQuantizer(VectorQuantizer(8, 16), 3)
    with pytest.raises(ShapeError, match=r"expected indices: \[B, ..., 3\], got \[2, 4\]"):
        r.codes(torch.zeros(2, 4, dtype=torch.long))


def test_autocast_does_not_change_the_codes_or_the_losses() -> None:
    """Under bf16 autocast the distances, statistics and entropies are still computed in float32."""
    x = _x(2, 64, 8)
    for name, q in _quantizers().items():
        ref_q = copy.deepcopy(q).train()
        ref = ref_q(x.transpose(1, 2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q.train()(x.transpose(1, 2))
        assert torch.equal(out.indices, ref.indices), name
        torch.testing.assert_close(out.quantized, ref.quantized, atol=1e-6, rtol=0, msg=name)
        for key in ref.losses:
            torch.testing.assert_close(out.losses[key], ref.losses[key], msg=name)
        for a, b in zip(q.buffers(), ref_q.buffers()):
            torch.testing.assert_close(a, b, msg=name)
