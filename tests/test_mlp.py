from __future__ import annotations

import pytest
import torch

from genlab.core.errors import ShapeError
from genlab.models import MLP, timestep_embedding


@pytest.mark.parametrize("dim", [2, 7, 64, 128])
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_timestep_embedding_matches_diffusers(dim: int, max_period: float) -> None:
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.cat([torch.arange(0, 1000, 37).float(), torch.linspace(-2.5, 2.5, 11)])
    ref = embeddings.get_timestep_embedding(
        t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period
    )
    got = timestep_embedding(t, dim, max_period=max_period)
    assert got.shape == (t.shape[0], dim)
    assert torch.equal(got, ref)


def test_timestep_embedding_scalar_and_errors() -> None:
    assert torch.equal(timestep_embedding(3.0, 16), timestep_embedding(torch.tensor([3.0]), 16))
    with pytest.raises(ShapeError, match=r"expected t: \[B\] or a scalar, got \[2, 2\]"):
        timestep_embedding(torch.zeros(2, 2), 16)


def _model(**kwargs) -> MLP:
    torch.manual_seed(0)
    return MLP(dim=3, hidden=32, depth=2, time_dim=16, **kwargs)


def test_output_shape_and_time_forms() -> None:
    model, x = _model(), torch.randn(5, 3)
    out = model(x, torch.full((5,), 0.3))
    assert out.shape == (5, 3)
    torch.testing.assert_close(model(x, 0.3), out)
    torch.testing.assert_close(model(x, torch.tensor(0.3)), out)
    assert not torch.allclose(model(x, torch.linspace(0, 999, 5)), out)  # t matters
    assert model.double()(x.double(), 0.3).dtype == torch.float64


def test_gradient_flows_to_every_parameter() -> None:
    model = _model(num_classes=4)
    x = torch.randn(6, 3, requires_grad=True)
    model(x, torch.rand(6), torch.tensor([0, 1, 2, 3, -1, 0])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_class_labels() -> None:
    model, x, t = _model(num_classes=3), torch.randn(4, 3), torch.rand(4)
    a = model(x, t, torch.tensor([0, 0, 0, 0]))
    b = model(x, t, torch.tensor([1, 1, 1, 1]))
    assert not torch.allclose(a, b)
    null = model(x, t, torch.tensor([-1, -1, -1, -1]))
    torch.testing.assert_close(model(x, t), null)  # None means the null class
    assert model.label_embed.embedding.num_embeddings == 4
    with pytest.raises(ValueError, match=r"integers in \[-1, 3\)"):
        model(x, t, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=None"):
        _model()(x, t, torch.tensor([0, 0, 0, 0]))


def test_shape_errors() -> None:
    model = _model(num_classes=2)
    with pytest.raises(ShapeError, match=r"expected x: \[B, dim\] = \[B, 3\], got \[4, 2\]"):
        model(torch.zeros(4, 2), 0.0)
    with pytest.raises(ShapeError, match=r"expected t: \[B\] = \[4\] or a scalar, got \[3\]"):
        model(torch.zeros(4, 3), torch.zeros(3))
    with pytest.raises(ShapeError, match=r"class_labels: \[B\] = \[4\], got \[4, 1\]"):
        model(torch.zeros(4, 3), 0.0, torch.zeros(4, 1, dtype=torch.long))




def test_loads_state_dicts_with_the_old_key_names() -> None:
    """Checkpoints written before MLP used the shared layers (``time_mlp.0``, ``time_mlp.2``, ``label_emb``)."""
    model, x, t, labels = _model(num_classes=3), torch.randn(4, 3), torch.rand(4), torch.tensor([0, 1, 2, -1])
    renames = {"time_embed.linear_1.": "time_mlp.0.", "time_embed.linear_2.": "time_mlp.2.",
               "label_embed.embedding.": "label_emb."}
    old = {next((o + k[len(n):] for n, o in renames.items() if k.startswith(n)), k): v
           for k, v in model.state_dict().items()}
    assert {"time_mlp.0.weight", "time_mlp.2.bias", "label_emb.weight"} <= set(old)
    fresh = MLP(dim=3, hidden=32, depth=2, time_dim=16, num_classes=3)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(x, t, labels), model(x, t, labels), rtol=0, atol=0)


def test_fits_a_tiny_regression() -> None:
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=64, depth=2, time_dim=32)
    x, t = torch.randn(256, 2), torch.rand(256) * 4 - 2
    target = torch.stack([torch.sin(2 * x[:, 0]) * t, x[:, 1] * torch.cos(t)], dim=-1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = (model(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


@pytest.mark.parametrize("float64_kernel", [True, False])
def test_selu_equals_torch_selu_in_values_gradients_and_jvps(monkeypatch, float64_kernel: bool) -> None:
    """genlab's SELU (float64 kernel on AVX-512 CPUs, torch.selu elsewhere; both paths forced here) has
    nn.SELU's values, gradients, double gradients and JVPs to float32 rounding, and keeps the dtype."""
    from genlab.models import layers

    monkeypatch.setattr(layers, "_avx512_float32_selu_is_slow", lambda: float64_kernel)
    torch.manual_seed(0)
    x = (3 * torch.randn(64, 16)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ours, ref = layers.SELU()(x), torch.nn.SELU()(x_ref)
    def close(a, b, rel=2.4e-7):  # two float32 roundings of values of b's size (at least 1)
        return bool(((a - b).abs() <= rel * b.abs().clamp_min(1)).all())

    assert ours.dtype == torch.float32 and close(ours, ref)
    weight = torch.randn(64, 16)
    (g,) = torch.autograd.grad((ours * weight).sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), x_ref, create_graph=True)
    assert close(g, g_ref)
    gg, gg_ref = torch.autograd.grad(g.square().sum(), x)[0], torch.autograd.grad(g_ref.square().sum(), x_ref)[0]
    assert (gg - gg_ref).abs().max() <= 1e-5 * gg_ref.abs().max()
    tangent = torch.randn(64, 16)
    _, jvp = torch.func.jvp(layers.SELU(), (x.detach(),), (tangent,))
    _, jvp_ref = torch.func.jvp(torch.selu, (x.detach(),), (tangent,))
    assert close(jvp, jvp_ref, 1e-6)
    assert layers.SELU()(x.detach().double()).dtype == torch.float64
