"""Vector quantization (van den Oord et al. 2017) with an EMA or gradient-learnt codebook.

For ``h: [B, N, d]`` (after the optional projection ``D -> d``, Yu et al. 2022), the code of each vector is
its nearest codebook row, ``k = argmin_i |h - e_i|^2`` (or the largest cosine, with ``h`` and ``e``
l2-normalised, ViT-VQGAN's factorised codes), and the quantized vector is ``q = e_k``. The loss is Eq. 3
of van den Oord et al. without the reconstruction term, as means over elements:

- ``commitment = beta * |h - sg(q)|^2``: its gradient reaches the encoder only;
- ``codebook = |sg(h) - q|^2`` (``learning="gradient"``): its gradient reaches the codebook only.

With ``learning="ema"`` (Razavi et al. 2019, Appendix; van den Oord et al. 2017, Appendix A.1) there is no
codebook loss; each training forward updates, with counts ``n_i`` and sums ``s_i`` of the vectors assigned
to code ``i`` in the batch, ``N_i <- decay N_i + (1 - decay) n_i``, ``m_i <- decay m_i + (1 - decay) s_i`` and
``e_i = m_i / N~_i`` with Laplace smoothing ``N~_i = (N_i + eps) / (N + K eps) N``, ``N = sum_i N_i``
(these statistics are kept in both modes: ``cluster_size`` N and ``embed_sum`` m). The batch is quantized
with the codebook from before its own update.

``kmeans_init``: the first training batch's k-means clusters become the statistics (``N_i`` their sizes,
``m_i`` their sums) and the codebook (``m_i / N~_i`` with EMA, as after every update: the cluster means up to
the smoothing, 0 for an empty cluster; the means with gradient learning).
``dead_code_threshold > 0``: after each update, codes whose ``N_i`` fell below it are replaced by random
vectors of the batch, with ``N_i`` reset to the threshold and ``m_i`` to the vector times it. All of this
is vector-quantize-pytorch's algorithm step for step, and with an L2 codebook its arithmetic too: an
autoencoder trained with either from one seed is the same run, bit for bit on CPU
(``tests/test_quantizers_vqp_training.py``).
``dead_code_batches = W > 0`` (SoundStream's expiry, Zeghidour et al. 2021, Sec. III-C): a code that no
vector chose in the last W training batches (of all ranks) is dead too, whatever its ``N_i``; it is replaced
the same way (``N_i`` reset to the threshold, or to 1, a fresh code's count, when the threshold is 0). The
EMA count alone keeps a code that was used heavily early on and then abandoned for about
``log(N_i / threshold) / (1 - decay)`` steps (hundreds at decay 0.99); expiry frees it after W.
Take W so that W batches hold several vectors per code (W x vectors per batch >> codebook size).
``gradient="rotation"``: the rotation trick (Fifty et al. 2024) instead of straight-through. When
``torch.distributed`` is initialised (and ``sync``), counts and sums are summed over ranks and the draws
shared, so the codebooks of all ranks stay identical.
"""

from __future__ import annotations

import math

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from genlab.core.registry import register
from genlab.models.quantizers.base import Quantizer
from genlab.models.quantizers.distributed import all_reduce_, sample_vectors
from genlab.models.quantizers.estimators import rotation_trick, straight_through
from genlab.models.quantizers.kmeans import cluster_sums, kmeans, nearest

Decay = Annotated[float, Range(ge=0, lt=1)]


@register("quantizer", "vq")
class VectorQuantizer(Quantizer):
    """Vector quantizer with ``codebook_size`` codes of ``codebook_dim`` (default ``dim``): see the module
    docstring. ``z: [B, dim, ...]`` (``channel_last=True``: ``[B, ..., dim]``) -> quantized of the same
    shape, indices ``[B, ...]``, losses ``commitment`` (and ``codebook`` with ``learning="gradient"``)."""

    def __init__(self, dim: PositiveInt, codebook_size: PositiveInt, codebook_dim: PositiveInt | None = None,
                 distance: Literal["l2", "cosine"] = "l2", learning: Literal["ema", "gradient"] = "ema",
                 beta: NonNegativeFloat = 0.25, decay: Decay = 0.99, eps: PositiveFloat = 1e-5,
                 kmeans_init: bool = False, kmeans_iters: NonNegativeInt = 10,
                 dead_code_threshold: NonNegativeFloat = 0.0, dead_code_batches: NonNegativeInt = 0,
                 gradient: Literal["straight_through", "rotation"] = "straight_through",
                 sync: bool = True, channel_last: bool = False) -> None:
        for name, value, allowed in (("distance", distance, ("l2", "cosine")),
                                     ("learning", learning, ("ema", "gradient")),
                                     ("gradient", gradient, ("straight_through", "rotation"))):
            if value not in allowed:
                raise ValueError(f"VectorQuantizer: {name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {value!r}")
        for name, value in (("codebook_size", codebook_size), ("kmeans_iters", kmeans_iters),
                            ("dead_code_batches", dead_code_batches)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"VectorQuantizer: {name} must be an int, got {value!r}")
        super().__init__(dim, codebook_dim, channel_last)
        self.codebook_size, self.cosine = codebook_size, distance == "cosine"
        self.learning, self.gradient = learning, gradient
        self.beta, self.decay, self.eps, self.sync = beta, decay, eps, sync
        self.kmeans_init, self.kmeans_iters, self.dead_code_threshold = kmeans_init, kmeans_iters, dead_code_threshold
        self.dead_code_batches = dead_code_batches
        shape = (codebook_size, self.codebook_dim)
        if learning == "gradient":
            self.codebook = nn.Parameter(torch.empty(shape))
        else:
            self.register_buffer("codebook", torch.empty(shape))
        self.register_buffer("cluster_size", torch.empty(codebook_size))  # N_i
        self.register_buffer("embed_sum", torch.empty(shape))  # m_i
        self.register_buffer("initialized", torch.tensor(False))
        # consecutive training batches in which no vector chose code i (with dead_code_batches only)
        self.register_buffer("idle", torch.zeros(codebook_size, dtype=torch.long) if dead_code_batches else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A small uniform codebook, U(-b, b) with b = sqrt(6 / (K d)) (kaiming-uniform over the whole table, as
        vector-quantize-pytorch; unit rows if cosine), ``N_i = 1``, ``m_i = e_i``; k-means still to run. Small
        codes are chosen by the direction of a vector more than by its norm, so a fresh codebook is spread over
        many codes: with N(0, 1) codes (|e|^2 ~ d) a plain VQ autoencoder used 1-2% of 256 codes along training
        on digits, against 8-15% for this start (``scripts/bench_autoencoders.py``)."""
        super().reset_parameters()
        with torch.no_grad():
            k, d = self.codebook.shape
            bound = math.sqrt(6.0 / (k * d))
            e = torch.empty(self.codebook.shape, device=self.codebook.device).uniform_(-bound, bound)
            self.codebook.copy_(F.normalize(e, dim=-1) if self.cosine else e)
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(self.codebook)
            if self.idle is not None:
                self.idle.zero_()
            self.initialized.fill_(not self.kmeans_init)

    def embeddings(self) -> Tensor:
        """The codebook ``[K, d]`` as used: unit rows for the cosine distance (an EMA codebook is stored so: every
        write normalises it; one learnt by gradient is normalised here)."""
        return F.normalize(self.codebook, dim=-1) if self.cosine and self.learning == "gradient" else self.codebook

    def prepare(self, h: Tensor) -> Tensor:
        return F.normalize(h, dim=-1) if self.cosine else h

    def estimate(self, h: Tensor, q: Tensor) -> Tensor:
        return rotation_trick(h, q) if self.gradient == "rotation" else straight_through(h, q)

    def lookup(self, indices: Tensor) -> Tensor:
        return self.embeddings()[indices]

    def quantize(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        x = h.reshape(-1, h.shape[-1]).to(torch.promote_types(self.codebook.dtype, torch.float32))  # [B N, d]
        if self.training and not bool(self.initialized):
            self._kmeans_(x.detach())
        indices = nearest(x.detach(), self.embeddings().detach(), self.cosine)
        q = self.lookup(indices).reshape(h.shape).to(h.dtype)
        losses = {"commitment": self.beta * F.mse_loss(h, q.detach())}
        if self.learning == "gradient":
            losses["codebook"] = F.mse_loss(h.detach(), q)
        if self.training:
            self._update_(x.detach(), indices)
        return q.detach() if self.learning == "ema" else q, indices.reshape(h.shape[:-1]), losses

    @torch.no_grad()
    def _kmeans_(self, x: Tensor) -> None:
        means, counts = kmeans(x, self.codebook_size, self.kmeans_iters, self.cosine, self.sync)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(means * counts.unsqueeze(-1))
        self.codebook.copy_(means)
        if self.learning == "ema":  # as after every update (an empty cluster's code becomes m_i / N~_i = 0)
            self._codebook_from_statistics_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_(self, x: Tensor, indices: Tensor) -> None:
        """The EMA statistics (and, with ``learning="ema"``, the codebook), then dead codes."""
        counts, sums = cluster_sums(x, indices, self.codebook_size)
        all_reduce_(counts, self.sync)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if self.learning == "ema":
            self.embed_sum.lerp_(all_reduce_(sums, self.sync), 1 - self.decay)
            self._codebook_from_statistics_()
        dead = self.cluster_size < self.dead_code_threshold
        if self.idle is not None:
            self.idle.copy_(torch.where(counts > 0, 0, self.idle + 1))
            dead |= self.idle >= self.dead_code_batches
        if (self.dead_code_threshold > 0 or self.idle is not None) and bool(dead.any()):
            self._replace_(x, dead)

    def _codebook_from_statistics_(self) -> None:
        """``e_i = m_i / N~_i``, ``N~_i = (N_i + eps) / (N + K eps) N`` (unit rows if cosine)."""
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        e = self.embed_sum / smoothed.unsqueeze(-1)
        self.codebook.copy_(F.normalize(e, dim=-1) if self.cosine else e)

    def _replace_(self, x: Tensor, dead: Tensor) -> None:
        """Dead codes become random vectors of the batch (from all ranks), with fresh statistics."""
        fresh = sample_vectors(x, int(dead.sum()), self.sync)
        count = self.dead_code_threshold or 1.0
        self.codebook[dead] = fresh
        self.cluster_size[dead] = count
        self.embed_sum[dead] = fresh * count
        if self.idle is not None:
            self.idle[dead] = 0
