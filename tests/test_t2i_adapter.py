"""T2I-Adapter on genlab's UNet: the UNet's ``intra.{k}`` injection points, the three variants, where
their features go, scale 0 == no adapter, several adapters, errors; against diffusers' T2IAdapter +
UNet2DConditionModel (``down_intrablock_additional_residuals``) after save_pretrained, both ways."""

from __future__ import annotations

import pytest
import torch

from genlab.adapters.t2i_adapter import MultiT2IAdapter, T2IAdapter, unet_points
from genlab.core.errors import ShapeError
from genlab.models.dit import DiT
from genlab.models.unet import UNet


def _unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(**{"preset": "tiny", "norm_groups": 8, "zero_init": False, "num_res_blocks": 2, **kwargs}).eval()


def _rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_intra_points_reach_the_skip_and_what_follows() -> None:
    unet, x = _unet(attention_levels=(1,)), _rand(2, 3, 16, 16)
    points = unet.injection_points(x.shape, intra=True)
    assert unet.injection_points(x.shape) == {k: v for k, v in points.items() if not k.startswith("intra.")}
    assert [k for k in points if k.startswith("intra.")] == [f"intra.{k}" for k in range(6)]
    seen: dict[str, torch.Tensor] = {}
    for name, module in (("mid", unet.mid), ("down.1", unet.down[1])):
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))

    def run(residuals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen.clear()
        out = unet(x, 5.0, residuals=residuals)
        return out, {k: v if isinstance(v, torch.Tensor) else v[0] for k, v in seen.items()}

    out, ref = run({})
    assert torch.equal(run({f"intra.{k}": torch.zeros(points[f"intra.{k}"]) for k in range(6)})[0], out)
    for k in range(6):  # every intra point reaches the middle block (down.k does not: tests/test_unet.py)
        r = _rand(*points[f"intra.{k}"], seed=k)
        got, hooks = run({f"intra.{k}": r})
        assert not torch.allclose(got, out) and not torch.allclose(hooks["mid"], ref["mid"]), k
    # intra.2 is level 0's downsampled feature: level 1 sees it; intra.5, level 1's last skip, is down.5
    # plus the same change of the middle block's input
    r = _rand(*points["intra.5"], seed=9)
    _, hooks = run({"intra.5": r})
    torch.testing.assert_close(hooks["down.1"], ref["down.1"] + r, rtol=0, atol=1e-6)


def _adapter(kind: str, channels: tuple[int, ...], f: int = 2, seed: int = 0) -> T2IAdapter:
    torch.manual_seed(seed)
    return T2IAdapter(3, channels, 2, f, kind).eval()


@torch.no_grad()
def test_variants_placement_and_scale() -> None:
    cond = _rand(2, 3, 32, 32)
    shapes = {kind: [tuple(f.shape[1:]) for f in _adapter(kind, ch).features(cond)]
              for kind, ch in (("full_adapter", (32, 64)), ("light_adapter", (32, 64)),
                               ("full_adapter_xl", (32, 48, 64, 64)))}
    assert shapes == {"full_adapter": [(32, 16, 16), (64, 8, 8)],
                      "light_adapter": [(32, 16, 16), (64, 8, 8), (64, 4, 4)],
                      "full_adapter_xl": [(32, 16, 16), (48, 16, 16), (64, 8, 8), (64, 8, 8)]}
    assert _adapter("light_adapter", (32, 64)).total_downscale_factor == 8
    unet = _unet(attention_levels=(0, 1), cross_attention_dim=8)  # levels 16 and 8 px for x at 16 px
    assert unet_points(unet) == ["intra.2", "intra.5", "mid"]  # last ResBlock + attention of each level
    assert unet_points(_unet()) == ["intra.3", "intra.5", "mid"]  # no attention: after the downsampler
    x, ctx, t = _rand(2, 3, 16, 16), _rand(2, 4, 8), torch.tensor([3.0, 500.0])
    adapter = _adapter("full_adapter", (32, 64))
    residuals = adapter(cond, unet)
    assert list(residuals) == ["intra.2", "intra.5"]
    plain = unet(x, t, context=ctx)
    assert torch.equal(unet(x, t, context=ctx, residuals=adapter(cond, unet, conditioning_scale=0.0)), plain)
    assert (unet(x, t, context=ctx, residuals=residuals) - plain).abs().max() > 1e-3
    half = adapter(cond, unet, conditioning_scale=0.5)
    assert all(torch.equal(half[k], 0.5 * residuals[k]) for k in residuals)
    light = _adapter("light_adapter", (32, 64), seed=1)  # 3 features: the third goes to mid (4 px)
    assert list(light(_rand(2, 3, 32, 32), unet)) == ["intra.2", "intra.5", "mid"]
    with pytest.raises(ShapeError, match=r"residual 'mid': expected \[2, 64, 8, 8\], got \[2, 64, 4, 4\]"):
        unet(x, t, context=ctx, residuals=light(cond, unet))


@torch.no_grad()
def test_several_adapters_and_errors() -> None:
    unet = _unet(attention_levels=(0, 1), cross_attention_dim=8)
    a, b = _adapter("full_adapter", (32, 64), seed=1), _adapter("full_adapter", (32, 64), seed=2)
    ca, cb = _rand(2, 3, 32, 32, seed=3), _rand(2, 3, 32, 32, seed=4)
    both = MultiT2IAdapter([a, b])(conds=[ca, cb], unet=unet, weights=[0.7, 0.2], conditioning_scale=0.5)
    fa, fb = a.features(ca), b.features(cb)
    for (name, r), x, y in zip(both.items(), fa, fb):
        torch.testing.assert_close(r, 0.5 * (0.7 * x + 0.2 * y), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one cond and one weight per adapter \\(2\\), got 1 conds"):
        MultiT2IAdapter([a, b])([ca], unet)
    with pytest.raises(ValueError, match="downscale alike"):
        MultiT2IAdapter([a, _adapter("full_adapter", (32,))])
    with pytest.raises(ValueError, match="unknown adapter_type 'full'; expected one of full_adapter, "):
        T2IAdapter(adapter_type="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"widths >= 4 \(light_adapter works at width // 4\), got \[2\]"):
        T2IAdapter(channels=(2,), adapter_type="light_adapter")
    with pytest.raises(ValueError, match="full_adapter_xl keeps the width after its third block"):
        T2IAdapter(channels=(8, 8, 16, 32), adapter_type="full_adapter_xl")
    with pytest.raises(ValueError, match="downscale_factor"):
        T2IAdapter(downscale_factor=0)
    with pytest.raises(ShapeError, match=r"expected cond: \[B, 3, H, W\] with H and W divisible by "
                                         r"downscale_factor=2, got \[2, 3, 31, 31\]"):
        a.features(torch.zeros(2, 3, 31, 31))
    with pytest.raises(ValueError, match="4 features for a UNet with 2 levels; expected at most 3"):
        _adapter("light_adapter", (32, 64, 64))(torch.zeros(1, 3, 64, 64), _unet(attention_levels=(0,)))
    dit = DiT(input_size=8, in_channels=3, depth=2, hidden=32, num_heads=2, patch_size=2)
    with pytest.raises(TypeError, match="expected a genlab UNet, got DiT"):
        a(ca, dit)  # type: ignore[arg-type]


# --- against diffusers ----------------------------------------------------------------------------------------

UNET_SD = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 48, 48),
               norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
UNET_XL = dict(UNET_SD, block_out_channels=(32, 48, 64),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
ADAPTERS = {"full": (UNET_SD, dict(channels=[32, 48, 48], adapter_type="full_adapter", downscale_factor=2)),
            "light": (UNET_SD, dict(channels=[32, 48], adapter_type="light_adapter", downscale_factor=2)),
            "xl": (UNET_XL, dict(channels=[32, 48, 64, 64], adapter_type="full_adapter_xl", downscale_factor=4))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("t2i")
    for name, config in (("unet_sd", UNET_SD), ("unet_xl", UNET_XL)):
        torch.manual_seed(0)
        diffusers.UNet2DConditionModel(**config).save_pretrained(root / name)
    for i, (name, (_, config)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i + 1)
        diffusers.T2IAdapter(in_channels=3, num_res_blocks=2, **config).save_pretrained(root / name)
    for i in (1, 2):  # two full adapters for MultiAdapter
        torch.manual_seed(10 + i)
        diffusers.T2IAdapter(in_channels=1, num_res_blocks=1, **ADAPTERS["full"][1]).save_pretrained(root / f"m{i}")
    return diffusers, root


def _inputs(channels: int = 3, seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([7, 913]), torch.randn(2, 5, 16, generator=g),
            torch.rand(2, channels, 16, 16, generator=g))


def _peer_call(unet, x, t, ctx, features):
    intra = None if features is None else [f.clone() for f in features]  # diffusers pops from the list
    return unet(x, t, encoder_hidden_states=ctx, down_intrablock_additional_residuals=intra).sample


@pytest.mark.parametrize("name", list(ADAPTERS))
@torch.no_grad()
def test_matches_diffusers_both_ways(saved, name: str) -> None:
    from genlab.interop.diffusers import from_diffusers, to_diffusers

    diffusers, root = saved
    unet_dir = "unet_xl" if name == "xl" else "unet_sd"
    peer_unet = diffusers.UNet2DConditionModel.from_pretrained(root / unet_dir).eval()
    peer = diffusers.T2IAdapter.from_pretrained(root / name).eval()
    unet, adapter = from_diffusers(root / unet_dir).eval(), from_diffusers(root / name).eval()
    assert isinstance(adapter, T2IAdapter) and adapter.adapter_type == ADAPTERS[name][1]["adapter_type"]
    x, t, ctx, cond = _inputs()  # cond at 16 px: xl (f = 4) starts at 4 px, after the first level's downsampler
    features = [0.8 * f for f in peer(cond)]
    ref = _peer_call(peer_unet, x, t, ctx, features)
    assert (ref - _peer_call(peer_unet, x, t, ctx, None)).abs().max() > 1e-3  # the adapter matters
    residuals = adapter(cond, unet, conditioning_scale=0.8)
    assert len(residuals) == len(features)
    torch.testing.assert_close(unet(x, t, context=ctx, residuals=residuals), ref, rtol=0, atol=1e-5)
    back = to_diffusers(adapter)
    assert isinstance(back, diffusers.T2IAdapter) and back.config["adapter_type"] == peer.config["adapter_type"]
    original, converted = peer.state_dict(), back.state_dict()
    assert original.keys() == converted.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    back_unet = to_diffusers(unet)
    torch.testing.assert_close(_peer_call(back_unet, x, t, ctx, [0.8 * f for f in back(cond)]), ref,
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_several_adapters_match_multiadapter(saved) -> None:
    from genlab.interop.diffusers import from_diffusers

    diffusers, root = saved
    peer_unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet_sd").eval()
    peers = [diffusers.T2IAdapter.from_pretrained(root / f"m{i}").eval() for i in (1, 2)]
    unet = from_diffusers(root / "unet_sd").eval()
    multi = MultiT2IAdapter([from_diffusers(root / f"m{i}") for i in (1, 2)]).eval()
    x, t, ctx, c1 = _inputs(1)
    c2 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    ref = _peer_call(peer_unet, x, t, ctx, diffusers.MultiAdapter(peers)([c1, c2], adapter_weights=[0.6, 0.3]))
    got = unet(x, t, context=ctx, residuals=multi([c1, c2], unet, weights=[0.6, 0.3]))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_meta_device() -> None:
    """Nothing on the CPU: a meta UNet and adapter run on meta inputs."""
    with torch.device("meta"):
        unet = UNet(preset="tiny", norm_groups=8, num_res_blocks=2, attention_levels=(0, 1), cross_attention_dim=8)
        adapter = T2IAdapter(3, (32, 64), 2, 2, "light_adapter")
        x, ctx, cond = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8), torch.rand(2, 3, 32, 32)
        t = torch.tensor([1.0, 2.0])
    residuals = adapter(cond, unet)
    del residuals["mid"]  # the light adapter's third feature is 4 px; this UNet's middle is 8 px
    assert unet(x, t, context=ctx, residuals=residuals).device.type == "meta"
