"""VQ training against vector-quantize-pytorch over many steps: from the same initial codebook and the same
random state, the EMA statistics, k-means initialisation and dead-code replacement (when they run, what they
are computed from, the order within a forward, the statistics a replaced code restarts with) give the same
codes and codebooks step after step, so differences along training come from the initial draw alone."""

from __future__ import annotations

import pytest
import torch

from genlab.models.quantizers import VectorQuantizer


@pytest.mark.parametrize("setting", ["plain", "kmeans", "dead_codes", "kmeans_and_dead_codes",
                                     "cosine_kmeans_and_dead_codes"])
def test_training_steps_equal_vector_quantize_pytorch(setting: str) -> None:
    """decay 0.9, threshold 1 (vqp's ``threshold_ema_dead_code``): 25 steps on drifting batches of two
    clusters of different spread, with ``torch.manual_seed`` set alike before each library's forward (the
    k-means seeds and replacement vectors are random batch rows). Dead codes are replaced at most steps."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kmeans, dead, cosine = "kmeans" in setting, 1.0 if "dead" in setting else 0.0, "cosine" in setting
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=32, decay=0.9, eps=1e-5, commitment_weight=0.25,
                                kmeans_init=kmeans, kmeans_iters=4, threshold_ema_dead_code=dead,
                                use_cosine_sim=cosine, rotation_trick=False).train()
    ours = VectorQuantizer(8, 32, decay=0.9, eps=1e-5, kmeans_init=kmeans, kmeans_iters=4,
                           dead_code_threshold=dead, distance="cosine" if cosine else "l2", channel_last=True).train()
    cb = theirs._codebook
    with torch.no_grad():
        ours.codebook.copy_(cb.embed[0])
        ours.embed_sum.copy_(cb.embed_avg[0])
        ours.cluster_size.copy_(cb.cluster_size[0])
    g = torch.Generator().manual_seed(1)
    replaced = 0
    for step in range(25):
        centre = torch.randn(2, 1, 8, generator=g) * 3 + 0.1 * step
        x = centre + torch.randn(2, 60, 8, generator=g) * torch.tensor([0.3, 1.5]).view(2, 1, 1)
        torch.manual_seed(100 + step)
        q_ref, idx_ref, loss_ref = theirs(x)
        torch.manual_seed(100 + step)
        q, idx, losses = ours(x)
        assert torch.equal(idx, idx_ref), step
        torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(losses["commitment"], loss_ref, atol=1e-5, rtol=1e-5)
        for mine, ref in ((ours.cluster_size, cb.cluster_size[0]), (ours.embed_sum, cb.embed_avg[0]),
                          (ours.codebook, cb.embed[0])):
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        replaced += int((ours.cluster_size == dead).sum()) if dead else 0
    if dead:
        assert replaced > 50, replaced  # the replacement path ran, many times


def test_initial_codebook_is_vector_quantize_pytorchs_draw() -> None:
    """The same seed gives the same initial codebook (kaiming-uniform over the table) and statistics, so the
    two libraries' starts are draws from one distribution: genlab from seed s trains exactly as vqp from s."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(3)
    ours = VectorQuantizer(8, 32)
    torch.manual_seed(3)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=32)
    cb = theirs._codebook
    assert torch.equal(ours.codebook, cb.embed[0]) and ours.codebook.abs().max() > 0.05
    assert torch.equal(ours.cluster_size, cb.cluster_size[0]) and torch.equal(ours.embed_sum, cb.embed_avg[0])
