"""The attention backends agree with each other and with the formula."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.models.attention import attention, available_backends
from genlab.models.layers import LabelEmbedding, modulate


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("masked", [False, True])
def test_backends_agree_with_the_formula(backend, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    if masked:
        scores = scores.masked_fill(~mask, float("-inf"))
    expected = scores.softmax(-1) @ v
    assert torch.allclose(attention(q, k, v, backend, mask), expected, atol=1e-12)


def test_every_available_backend_agrees_in_float32():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    outs = {b: attention(q, k, v, b) for b in available_backends() if b != "flash" or q.is_cuda}
    ref = outs["math"]
    for b, out in outs.items():
        assert torch.allclose(out, ref, atol=1e-5), b
    assert torch.allclose(attention(q, k, v, "auto"), ref, atol=1e-5)


def test_errors():
    q = torch.randn(2, 4, 16, 32)
    with pytest.raises(ValueError, match="expected q"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention(q, q, q, "fast")
    if "flash" not in available_backends():
        with pytest.raises(RuntimeError, match="needs the flash_attn package"):
            attention(q, q, q, "flash")


def test_label_embedding_null_class_and_modulate():
    emb = LabelEmbedding(10, 4, dropout=1.0).eval()
    null = emb(torch.tensor([-1, 3]))
    assert torch.equal(null[0], emb.embedding.weight[10]) and torch.equal(null[1], emb.embedding.weight[3])
    assert torch.equal(emb(None, batch=2), emb.embedding.weight[[10, 10]])
    emb.train()
    assert torch.equal(emb(torch.tensor([1, 2])), emb.embedding.weight[[10, 10]])  # dropout 1: all null
    x, shift, scale = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale) + shift)
