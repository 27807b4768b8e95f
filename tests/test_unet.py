from __future__ import annotations

import pytest
import torch

from genlab.core.errors import ConfigError, ShapeError
from genlab.core.registry import build
from genlab.models.unet import UNet




def _model(**kwargs) -> UNet:
    """A tiny UNet (widths 32, 64) with non-zero output layers, in eval mode."""
    torch.manual_seed(0)
    return UNet(**{"preset": "tiny", "norm_groups": 8, "zero_init": False, **kwargs}).eval()


def _x(b: int = 2, size: int = 16, c: int = 3) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("preset", "size"),
    [("tiny", 8), ("small", 8),
     pytest.param("base", 16, marks=pytest.mark.slow), pytest.param("adm_cifar10", 16, marks=pytest.mark.slow),
     pytest.param("adm_imagenet64", 16, marks=pytest.mark.slow)],
)
def test_presets_shapes(preset: str, size: int) -> None:
    model = UNet(preset=preset, num_classes=10, out_channels=6)
    with torch.no_grad():
        out = model(_x(2, size), torch.tensor([3.0, 700.0]), torch.tensor([1, -1]))
    assert out.shape == (2, 6, size, size)
    assert torch.equal(out, torch.zeros_like(out))  # ADM: zero-initialised output conv


@pytest.mark.slow
def test_base_preset_is_ddpm_cifar10_size() -> None:
    assert sum(p.numel() for p in UNet(preset="base").parameters()) == pytest.approx(35.7e6, rel=2e-3)  # DDPM Tab. 1


def test_preset_overrides() -> None:
    model = UNet(preset="small", channels=32, attention_levels=(), norm_groups=8)
    config = model.config
    assert (config["channels"], config["channel_mult"], config["num_res_blocks"]) == (32, (1, 2, 2), 2)
    small = dict(channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), norm_groups=8)
    adm = UNet(preset="adm_imagenet64", **small)
    assert adm.config["head_dim"] == 64 and adm.config["scale_shift_norm"] and adm.config["resample"] == "resblock"
    assert adm.down[1].attns[0].attn.heads == 2  # 128 channels / head_dim 64
    heads = UNet(preset="adm_imagenet64", num_heads=4, **small)  # num_heads alone clears the preset's head_dim
    assert heads.config["head_dim"] is None and heads.down[1].attns[0].attn.heads == 4
    with pytest.raises(ValueError, match="not divisible by head_dim=48"):
        UNet(preset="tiny", attention_levels=(1,), head_dim=48)
    with pytest.raises(ValueError, match=r"attention_levels \[2\] out of range"):
        UNet(preset="tiny", attention_levels=(2,))


def test_build_from_config() -> None:
    model = build("model", {"type": "unet", "preset": "tiny", "channel_mult": [1, 2], "attention_levels": [1]})
    assert isinstance(model, UNet) and model.config["attention_levels"] == (1,)
    with pytest.raises(ConfigError, match="preset"):
        build("model", {"type": "unet", "preset": "huge"})


def test_time_forms() -> None:
    model, x = _model(), _x()
    with torch.no_grad():
        out = model(x, torch.full((2,), 250.0))
        torch.testing.assert_close(model(x, 250.0), out)
        torch.testing.assert_close(model(x, torch.tensor(250)), out)
        torch.testing.assert_close(model(x, torch.tensor([250.0])), out)
        assert not torch.allclose(model(x, torch.tensor([250.0, 10.0])), out)
        assert not torch.allclose(model(x, 0.5), out)


def test_class_labels_and_null_class() -> None:
    model, x = _model(num_classes=3, class_dropout=1.0), _x()
    with torch.no_grad():
        a, b = model(x, 5.0, torch.tensor([0, 0])), model(x, 5.0, torch.tensor([1, 1]))
        null = model(x, 5.0, torch.tensor([-1, -1]))
        assert not torch.allclose(a, b) and not torch.allclose(a, null)
        torch.testing.assert_close(model(x, 5.0), null)  # None is the null class
        torch.testing.assert_close(model.train()(x, 5.0, torch.tensor([0, 2])), null)  # class_dropout=1: all dropped
    assert model.label_embed.embedding.num_embeddings == 4
    with pytest.raises(ValueError, match=r"integers in \[-1, 3\)"):
        model(x, 5.0, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_classes=None"):
        _model()(x, 5.0, torch.tensor([0, 0]))


@pytest.mark.parametrize("linear_projection", [False, True])
def test_cross_attention_context(linear_projection: bool) -> None:
    model, x = _model(attention_levels=(1,), cross_attention_dim=16, linear_projection=linear_projection), _x()
    c1, c2 = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        out = model(x, 5.0, context=c1)
        assert out.shape == (2, 3, 16, 16)
        assert not torch.allclose(model(x, 5.0, context=c2), out)
    with pytest.raises(ValueError, match="needs context"):
        model(x, 5.0)
    with pytest.raises(ShapeError, match=r"expected context: \[B, L, D\] = \[2, L, 16\], got \[2, 5, 8\]"):
        model(x, 5.0, context=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="cross_attention_dim=None"):
        _model()(x, 5.0, context=c1)


def test_injection_points_and_residuals() -> None:
    model, x = _model(attention_levels=(1,)), _x()
    points = model.injection_points(x.shape)
    assert points == {"down.0": torch.Size([2, 32, 16, 16]), "down.1": torch.Size([2, 32, 16, 16]),
                      "down.2": torch.Size([2, 32, 8, 8]), "down.3": torch.Size([2, 64, 8, 8]),
                      "mid": torch.Size([2, 64, 8, 8])}
    seen: dict[str, torch.Tensor] = {}
    for name, module in (("mid", model.mid), ("up.0", model.up[0])):
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))

    def run(residuals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen.clear()
        with torch.no_grad():
            out = model(x, 5.0, residuals=residuals)
        return out, dict(seen)

    out, ref = run({})
    zeros, _ = run({name: torch.zeros(shape) for name, shape in points.items()})
    assert torch.equal(zeros, out)  # adding zeros everywhere is the identity
    for name, shape in points.items():  # every point is used, with the announced shape
        assert not torch.allclose(run({name: torch.randn(shape)})[0], out), name
    # down.k changes only the skip, not the features passed down: the middle block sees the same input;
    # up.0 (the lowest level) takes down.3 and down.2, up.1 takes down.1 and down.0
    _, hooks = run({"down.0": torch.randn(points["down.0"])})
    assert torch.equal(hooks["mid"], ref["mid"]) and torch.equal(hooks["up.0"], ref["up.0"])
    _, hooks = run({"down.3": torch.randn(points["down.3"])})
    assert torch.equal(hooks["mid"], ref["mid"]) and not torch.allclose(hooks["up.0"], ref["up.0"])
    _, hooks = run({"mid": torch.randn(points["mid"])})  # added after the middle block, before the way up
    assert torch.equal(hooks["mid"], ref["mid"]) and not torch.allclose(hooks["up.0"], ref["up.0"])
    with pytest.raises(KeyError, match="did you mean 'down.1'"):
        run({"down.11": torch.zeros(2)})
    with pytest.raises(ShapeError, match=r"residual 'mid': expected \[2, 64, 8, 8\], got \[2, 64, 4, 4\]"):
        run({"mid": torch.zeros(2, 64, 4, 4)})


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    kwargs = dict(attention_levels=(1,), cross_attention_dim=16, num_classes=2, dropout=0.1, resample="resblock")
    plain, ckpt = _model(**kwargs).train(), _model(**kwargs, gradient_checkpointing=True).train()
    x, ctx, labels = _x(), torch.randn(2, 3, 16), torch.tensor([0, 1])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(3)  # the same dropout masks; checkpointing replays the RNG state
        model(x, torch.tensor([1.0, 9.0]), labels, ctx).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_channels_last_gives_the_same_output() -> None:
    model = _model(attention_levels=(1,))
    fast = _model(attention_levels=(1,), channels_last=True)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(_x(), 5.0), model(_x(), 5.0), rtol=1e-5, atol=1e-5)


def test_attention_backends_agree() -> None:
    model, x, ctx = _model(attention_levels=(0, 1), cross_attention_dim=8, head_dim=16), _x(), torch.randn(2, 4, 8)
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        sdpa = model(x, 5.0, context=ctx)
        model.set_attention_backend("math")
        torch.testing.assert_close(model(x, 5.0, context=ctx), sdpa, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("fast")


def test_bf16_autocast_training_step() -> None:
    model = _model(attention_levels=(1,), cross_attention_dim=16, num_classes=3, scale_shift_norm=True).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, ctx = _x(), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([3.0, 900.0]), torch.tensor([0, -1]), ctx)
        loss = (out.float() - x).square().mean()
    loss.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_shape_errors() -> None:
    model = _model(num_classes=2)
    with pytest.raises(ShapeError, match=r"expected x: \[B, C, H, W\] = \[B, 3, H, W\] with H and W divisible by 2, "
                                         r"got \[2, 1, 16, 16\]"):
        model(torch.zeros(2, 1, 16, 16), 0.0)
    with pytest.raises(ShapeError, match=r"got \[2, 3, 15, 16\]"):
        model(torch.zeros(2, 3, 15, 16), 0.0)
    with pytest.raises(ShapeError, match=r"got \[3, 16, 16\]"):
        model(torch.zeros(3, 16, 16), 0.0)
    with pytest.raises(ShapeError, match=r"expected t: \[B\] = \[2\] or a scalar, got \[3\]"):
        model(torch.zeros(2, 3, 16, 16), torch.zeros(3))
    with pytest.raises(ShapeError, match=r"class_labels: \[B\] = \[2\], got \[2, 1\]"):
        model(torch.zeros(2, 3, 16, 16), 0.0, torch.zeros(2, 1, dtype=torch.long))


def test_channels_per_level() -> None:
    """Level widths given directly (not multiples of the first), from Python and from a config."""
    model = _model(channels_per_level=(32, 48), attention_levels=(1,), num_classes=2)
    assert (model.channels, model.widths, model.config["channel_mult"]) == (32, [32, 48], None)
    assert model.down[1].blocks[0].conv_1.out_channels == 48 and model.mid.res_1.conv_1.out_channels == 48
    x = _x()
    points = model.injection_points(x.shape)
    assert points["down.3"] == torch.Size([2, 48, 8, 8]) and points["mid"] == torch.Size([2, 48, 8, 8])
    again = UNet(**model.config).eval()  # the resolved config rebuilds the model
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model(x, 5.0, torch.tensor([0, 1]), residuals={"down.3": torch.ones(points["down.3"])})
        torch.testing.assert_close(again(x, 5.0, torch.tensor([0, 1]), residuals={"down.3": torch.ones(
            points["down.3"])}), out, rtol=0, atol=0)
    assert out.shape == (2, 3, 16, 16)
    built = build("model", {"type": "unet", "preset": "tiny", "channels_per_level": [16, 24], "norm_groups": 8})
    assert built.widths == [16, 24] and built.config["channels"] == 16 and built.config["num_res_blocks"] == 1
    with pytest.raises(ConfigError, match=r"channels_per_level: expected list of int >= 1 or None, got list \[16, 0\]"):
        build("model", {"type": "unet", "channels_per_level": [16, 0]})
    # channel_mult whose first entry is not 1: the way up ends at channels * channel_mult[0]
    assert _model(channels=16, channel_mult=(2, 3), norm_groups=8)(x, 1.0).shape == (2, 3, 16, 16)


def test_channels_per_level_errors() -> None:
    with pytest.raises(ValueError, match=r"give channel_mult \(\[1, 2\]\) or channels_per_level \(\[32, 48\]\), not"):
        UNet(channel_mult=(1, 2), channels_per_level=(32, 48))
    with pytest.raises(ValueError, match=r"width \[32, 48, 64\] \(channels_per_level\) must be divisible by norm_groups=32"):
        UNet(channels_per_level=(32, 48, 64))
    with pytest.raises(ValueError, match=r"channels=32 differs from channels_per_level\[0\]=16; .* omit channels"):
        UNet(channels=32, channels_per_level=(16, 24), norm_groups=8)
    with pytest.raises(ValueError, match=r"channels=12 \(conv_in's width\) must be divisible by norm_groups=8"):
        UNet(channels=12, channel_mult=(2, 4), norm_groups=8)
    with pytest.raises(ValueError, match="channels_per_level must be non-empty"):
        UNet(channels_per_level=())
    with pytest.raises(ValueError, match="attention width 48 is not divisible by head_dim=32"):
        UNet(channels_per_level=(32, 48), attention_levels=(1,), head_dim=32, norm_groups=16)
