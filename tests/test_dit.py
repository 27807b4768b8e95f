"""DiT (Peebles & Xie 2023): presets and parameter counts, adaLN-Zero, conditioning paths, adapters'
injection points, gradient checkpointing, attention backends, bf16 autocast, shape errors."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from genlab.core.errors import ConfigError, ShapeError
from genlab.core.registry import build
from genlab.models import dit as dit_module
from genlab.models.dit import PRESETS, DiT, Preset, sincos_pos_embed_2d
from genlab.models.layers import TimestepEmbedding

SMALL = dict(input_size=8, in_channels=3, patch_size=2, hidden=32, depth=2, num_heads=2)




def _model(perturb: bool = True, **kwargs) -> DiT:
    """A small DiT; ``perturb`` adds noise to every parameter, so zero-initialised layers are not zero."""
    torch.manual_seed(0)
    model = DiT(**(SMALL | kwargs))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.rand(batch, generator=g) * 1000


# Paper, Table 1 (layers, hidden, heads) and the parameter counts reported with it (Table 4).
@pytest.mark.parametrize("size, arch, params", [
    ("S", (12, 384, 6), 33e6), ("B", (12, 768, 12), 130e6), ("L", (24, 1024, 16), 458e6), ("XL", (28, 1152, 16), 675e6),
])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_presets_match_the_paper(size, arch, params, patch) -> None:
    with torch.device("meta"):  # no memory, no initialisation cost
        model = DiT(f"{size}/{patch}", num_classes=1000, learn_sigma=True)
    c = model.config
    assert (c["depth"], c["hidden"], c["num_heads"], c["patch_size"]) == (*arch, patch)
    count = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()  # the paper counts pos_embed
    if patch == 2:
        assert abs(count - params) / params < 0.01, count


def test_preset_literal_lists_every_preset_and_explicit_arguments_override() -> None:
    assert set(get_args(Preset)) == set(PRESETS) and len(PRESETS) == 12
    with torch.device("meta"):
        model = DiT("B/4", depth=2, num_heads=4)
        default = DiT()
    assert (model.config["depth"], model.config["hidden"], model.config["num_heads"], model.patch_size) == (2, 768, 4, 4)
    assert {k: default.config[k] for k in PRESETS["S/2"]} == PRESETS["S/2"]
    rebuilt = DiT(**_model().config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in _model().state_dict().items()}


def test_built_from_config_with_checked_types() -> None:
    model = build("model", {"type": "dit", "preset": "S/8", "depth": 1, "input_size": 16, "attention_backend": "math"})
    assert isinstance(model, DiT) and len(model.blocks) == 1 and model.patch_size == 8
    with pytest.raises(ConfigError, match="preset: expected one of 'S/2'"):
        build("model", {"type": "dit", "preset": "S/3"})
    with pytest.raises(ConfigError, match="attention_backend: expected one of 'auto'"):
        build("model", {"type": "dit", "attention_backend": "fast"})


def test_output_shapes_and_time_forms() -> None:
    x, t = _inputs(3)
    model = _model()
    out = model(x, t)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(model(x, 5.0), model(x, torch.full((3,), 5.0)))
    assert not torch.allclose(model(x, 5.0), model(x, 500.0))  # t matters
    assert _model(learn_sigma=True)(x, t).shape == (3, 6, 8, 8)
    assert _model(out_channels=5, learn_sigma=True, patch_size=4)(x, t).shape == (3, 10, 8, 8)
    assert _model().double()(x.double(), t).dtype == torch.float64


def test_pos_embed_is_2d_sincos() -> None:
    pe = sincos_pos_embed_2d(8, 3)  # columns: sin(x w), cos(x w), sin(y w), cos(y w) with w = (1, 1e-2)
    row, col = 1, 2
    w = torch.tensor([1.0, 1e-2])
    expected = torch.cat([(col * w).sin(), (col * w).cos(), (row * w).sin(), (row * w).cos()])
    torch.testing.assert_close(pe[row * 3 + col], expected)


def test_time_embedding_frequency_shift() -> None:
    torch.manual_seed(0)
    plain = TimestepEmbedding(16)
    shifted = TimestepEmbedding(16, freq_shift=0.0)
    shifted.load_state_dict(plain.state_dict())
    t = torch.cat([torch.arange(0, 1000, 37).float(), torch.linspace(-2.5, 2.5, 11)])
    assert torch.equal(shifted(t), plain(t))  # shift 0 is timestep_embedding, bit for bit
    shifted.freq_shift = 1.0  # f_i = 10000^(-i / 127): the lowest frequency is exactly 1e-4
    features = {}
    shifted.linear_1.register_forward_hook(lambda module, args, out: features.update(emb=args[0]))
    shifted(torch.tensor([1.0]))
    lowest = torch.tensor(1e-4)  # features are [cos(t f_0 .. t f_127), sin(t f_0 .. t f_127)]
    torch.testing.assert_close(features["emb"][0, [0, 127, 128, 255]], torch.stack([
        torch.tensor(1.0).cos(), lowest.cos(), torch.tensor(1.0).sin(), lowest.sin()]))


def test_adaln_zero_makes_a_fresh_model_output_zero() -> None:
    model = _model(perturb=False, num_classes=4, cross_attention_dim=6, learn_sigma=True)
    x, t = _inputs()
    out = model(x, t, torch.tensor([0, 3]), torch.randn(2, 5, 6))
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:  # every residual branch starts closed
        assert not block.modulation[-1].weight.any() and not block.cross_attn.to_out.weight.any()


def test_class_labels_and_null_class() -> None:
    model, (x, t) = _model(num_classes=4), _inputs()
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    null = model(x, t, torch.tensor([-1, -1]))
    torch.testing.assert_close(model(x, t), null)  # None means the null class
    torch.testing.assert_close(model(x, t, torch.tensor([3, -1]))[1], null[1])
    assert model.label_embed.embedding.num_embeddings == 5
    with pytest.raises(ValueError, match=r"integers in \[-1, 4\)"):
        model(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="num_classes=None"):
        _model()(x, t, torch.tensor([0, 1]))


def test_context_cross_attention() -> None:
    model, (x, t) = _model(cross_attention_dim=6), _inputs()
    ctx = torch.randn(2, 5, 6)
    with_ctx = model(x, t, context=ctx)
    assert not torch.allclose(with_ctx, model(x, t, context=ctx.flip(0)))
    assert not torch.allclose(with_ctx, model(x, t))  # no context: the cross-attention sub-blocks are skipped
    assert model(x, t, context=torch.randn(2, 7, 6)).shape == with_ctx.shape  # any context length L
    with pytest.raises(ShapeError, match=r"expected context: \[B, L, D_ctx\] = \[2, L, 6\], got \[2, 5, 4\]"):
        model(x, t, context=torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="cross_attention_dim=None"):
        _model()(x, t, context=ctx)


def test_residual_injection_points() -> None:
    model, (x, t) = _model(), _inputs()
    points = model.injection_points(x.shape)
    assert points == {"block.0": torch.Size([2, 16, 32]), "block.1": torch.Size([2, 16, 32])}
    r = torch.randn(points["block.0"])
    hook = model.blocks[0].register_forward_hook(lambda module, args, out: out + r)
    expected = model(x, t)
    hook.remove()
    torch.testing.assert_close(model(x, t, residuals={"block.0": r}), expected)
    assert not torch.allclose(model(x, t, residuals={"block.1": r}), model(x, t))
    torch.testing.assert_close(model(x, t, residuals={"block.1": torch.zeros_like(r)}), model(x, t))
    with pytest.raises(ValueError, match="unknown injection point 'blocks.1'; did you mean 'block.1'"):
        model(x, t, residuals={"blocks.1": r})
    with pytest.raises(ShapeError, match=r"residuals\['block.0'\]: \[B, N, hidden\] = \[2, 16, 32\], got \[2, 16, 8\]"):
        model(x, t, residuals={"block.0": r[..., :8]})


def test_gradients_reach_every_parameter() -> None:
    model, (x, t) = _model(num_classes=4, cross_attention_dim=6), _inputs()
    model(x, t, torch.tensor([1, -1]), torch.randn(2, 5, 6)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch) -> None:
    x, t = _inputs()
    grads, calls = [], []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(dit_module, "checkpoint", counting_checkpoint)
    ctx = torch.randn(2, 5, 6)
    for flag in (False, True, "selective"):
        model = _model(num_classes=4, class_dropout=0.0, cross_attention_dim=6, gradient_checkpointing=flag).train()
        model(x, t, torch.tensor([1, 2]), ctx).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls[:2] == [{"use_reentrant": False}] * 2  # one per block, only in the checkpointed runs
    assert len(calls) == 4 and all("context_fn" in c for c in calls[2:])  # selective: a save policy
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
        torch.testing.assert_close(grads[2][name], grads[0][name], msg=name)
    with torch.no_grad():  # not when no gradient is needed
        model(x, t)
    assert len(calls) == 4


def test_sdpa_and_math_attention_agree() -> None:
    x, t = _inputs()
    ctx = torch.randn(2, 5, 6)
    outs = [_model(cross_attention_dim=6, attention_backend=b)(x, t, context=ctx) for b in ("sdpa", "math")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_bf16_autocast_training_step(backend) -> None:
    model = _model(num_classes=4, cross_attention_dim=6, gradient_checkpointing=True, attention_backend=backend).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([1, -1]), torch.randn(2, 5, 6), {"block.0": torch.randn(2, 16, 32)})
        loss = (out.float() - x).square().mean()
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_shape_errors() -> None:
    model, (x, t) = _model(num_classes=2), _inputs()
    with pytest.raises(ShapeError, match=r"expected x: \[B, C, H, W\] = \[B, 3, 8, 8\], got \[2, 4, 8, 8\]"):
        model(torch.zeros(2, 4, 8, 8), t)
    with pytest.raises(ShapeError, match=r"expected x: \[B, C, H, W\] = \[B, 3, 8, 8\], got \[2, 3, 16, 16\]"):
        model(torch.zeros(2, 3, 16, 16), t)
    with pytest.raises(ShapeError, match=r"got \[3, 8, 8\]"):
        model.injection_points((3, 8, 8))
    with pytest.raises(ShapeError, match=r"expected t: \[B\] = \[2\] or a scalar, got \[3\]"):
        model(x, torch.zeros(3))
    with pytest.raises(ShapeError, match=r"class_labels: \[B\] = \[2\], got \[2, 1\]"):
        model(x, t, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(input_size=10, patch_size=4)


def test_per_block_embedding() -> None:
    """Blocks 1.. keep their own time/label embedders (diffusers' layout); labels are dropped once."""
    shared, model = _model(num_classes=4), _model(num_classes=4, per_block_embedding=True, class_dropout=0.5)
    assert not any(".time_embed." in k or ".label_embed." in k for k in shared.state_dict())  # default unchanged
    own = {k for k in model.state_dict() if k.startswith("blocks.") and "_embed." in k}
    assert own == {"blocks.1.time_embed.linear_1.weight", "blocks.1.time_embed.linear_1.bias",
                   "blocks.1.time_embed.linear_2.weight", "blocks.1.time_embed.linear_2.bias",
                   "blocks.1.label_embed.embedding.weight"}
    x, t = _inputs()
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        out = model(x, t, labels)
        block_1 = model.blocks[1].time_embed.linear_2.bias
        block_1.add_(1.0)  # block 1's own embedder is used
        assert not torch.allclose(model(x, t, labels), out)
        block_1.sub_(1.0)
        model.train()
        torch.manual_seed(1)
        dropped = model(x, t, labels)  # in training: one draw for all embedders (two would give [True, False])
        torch.manual_seed(1)
        mask = torch.rand(2) < 0.5
        assert mask.tolist() == [False, True]
        torch.testing.assert_close(dropped, model.eval()(x, t, torch.where(mask, -1, labels)), rtol=0, atol=0)
        every = _model(num_classes=4, per_block_embedding=True, class_dropout=1.0).train()
        torch.testing.assert_close(every(x, t, labels), every.eval()(x, t), rtol=0, atol=0)
    fresh = DiT(**(SMALL | dict(num_classes=4, per_block_embedding=True, interval_embedding=True)))
    assert torch.equal(fresh(x, t, labels, interval=0.5), torch.zeros(2, 3, 8, 8))  # adaLN-Zero as before
    assert fresh.blocks[1].time_embed.linear_1.weight.std().item() == pytest.approx(0.02, rel=0.2)  # the paper's init
    built = build("model", {"type": "dit", **SMALL, "num_classes": 4, "per_block_embedding": True})
    assert built.config["per_block_embedding"] and built.blocks[1].label_embed is not None
