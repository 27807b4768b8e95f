"""VQ training against vector-quantize-pytorch over many steps: from the same initial codebook and the same
random state, the EMA statistics, k-means initialisation and dead-code replacement (when they run, what they
are computed from, the order within a forward, the statistics a replaced code restarts with) give the same
codes and codebooks step after step, bit for bit with an L2 codebook (the distances, sums and k-means add in
vqp's order), so differences along training come from the initial draw alone."""

from __future__ import annotations

import copy

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
        for mine, ref in ((q, q_ref), (losses["commitment"], loss_ref.reshape(())), (ours.cluster_size,
                          cb.cluster_size[0]), (ours.embed_sum, cb.embed_avg[0]), (ours.codebook, cb.embed[0])):
            if cosine and step > 0:  # vqp normalises a replacement vector twice: the same to rounding
                torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)
            else:  # bit for bit: the same arithmetic in the same order (cosine: unit codes not normalised again)
                assert torch.equal(mine, ref), step
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


def _conv_autoencoder(dim: int) -> torch.nn.Module:
    """32x32 -> dim x 8 x 8 -> 32x32 (the benchmark's small autoencoder)."""
    nn = torch.nn
    return nn.ModuleDict({
        "encoder": nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                 nn.Conv2d(64, dim, 1)),
        "decoder": nn.Sequential(nn.Conv2d(dim, 64, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1),
                                 nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1))})


@pytest.mark.parametrize("setting", ["plain", "kmeans_and_dead_codes"])
def test_autoencoder_training_equals_vector_quantize_pytorch_bit_for_bit(setting: str) -> None:
    """A conv autoencoder on 32x32 digits trained with each library's quantizer from the same seed (the same
    initial codebook, k-means seeds, replacement vectors and batches) is the same run, bit for bit: weights,
    codes and codebook after 60 steps. Images make the near-ties the random batches above lack: the background
    repeats one latent vector, which sits at its k-means code (a distance below the 1e-8 floor, or negative by
    rounding), and the decoder sees ``quantized`` in the memory format of ``z`` (a channels-last view would
    run other conv kernels)."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from genlab.data import Digits

    data, dim, kmeans, dead = Digits(image_size=32).data, 16, "kmeans" in setting, 1.0 if "dead" in setting else 0.0
    torch.manual_seed(0)
    base = _conv_autoencoder(dim)
    runs = []
    for lib in ("genlab", "vqp"):
        torch.manual_seed(11)
        q = (VectorQuantizer(dim, 256, decay=0.99, beta=0.25, kmeans_init=kmeans, kmeans_iters=10,
                             dead_code_threshold=dead) if lib == "genlab" else
             vqp.VectorQuantize(dim=dim, codebook_size=256, decay=0.99, commitment_weight=0.25, kmeans_init=kmeans,
                                kmeans_iters=10, threshold_ema_dead_code=dead, rotation_trick=False,
                                accept_image_fmap=True))
        model = torch.nn.ModuleDict({**copy.deepcopy(base), "quantizer": q})
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g, codes = torch.Generator().manual_seed(1), []
        torch.manual_seed(61)
        for _ in range(60):
            x = data[torch.randint(len(data), (32,), generator=g)]
            quantized, indices, losses = model["quantizer"](model["encoder"](x))
            loss = sum(losses.values()) if isinstance(losses, dict) else losses.sum()
            (torch.nn.functional.mse_loss(model["decoder"](quantized), x) + loss).backward()
            opt.step()
            opt.zero_grad()
            codes.append(indices)
        runs.append((model, torch.stack(codes)))
    (ours, codes_ours), (theirs, codes_theirs) = runs
    assert torch.equal(codes_ours, codes_theirs)
    assert len(codes_ours.unique()) > (60 if dead else 5)  # the replacement ran
    assert torch.equal(ours["quantizer"].codebook, theirs["quantizer"]._codebook.embed[0])
    for part in ("encoder", "decoder"):
        for (name, a), b in zip(ours[part].named_parameters(), theirs[part].parameters(), strict=True):
            assert torch.equal(a, b), f"{part}.{name}"
