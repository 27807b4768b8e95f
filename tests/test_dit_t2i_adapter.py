"""T2I-Adapter on genlab's DiT (``DiTT2IAdapter``): identity at initialisation and at scale 0, the network
equal to the UNet adapter's single-scale blocks, tokens in the DiT's order, residuals summed with a
DiTControlNet's in ``ControlledModel``, training with the DiT frozen, errors."""

from __future__ import annotations

import re

import pytest
import torch
from einops import rearrange

from genlab.adapters import DiTT2IAdapter, MultiDiTT2IAdapter
from genlab.adapters.controlled import ControlledModel
from genlab.adapters.dit_controlnet import DiTControlNet
from genlab.adapters.t2i_adapter import T2IAdapter, unet_points
from genlab.core.errors import ShapeError
from genlab.models.dit import DiT

CONFIG = dict(input_size=8, in_channels=3, depth=4, hidden=32, num_heads=2, patch_size=2, num_classes=3)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dit() -> DiT:
    """A DiT whose zero-initialised layers (adaLN-Zero, output) are random, so that residuals matter."""
    dit = DiT(**CONFIG).eval()
    with torch.no_grad():
        for i, p in enumerate(dit.parameters()):
            p.copy_(_rand(*p.shape, seed=100 + i) * 0.2)
    return dit


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Give a module's (zero-initialised) parameters known random values."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            assert not p.any()
            p.copy_(_rand(*p.shape, seed=seed + i) * 0.1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rand(2, 3, 8, 8, seed=1), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])


@torch.no_grad()
def test_identity_at_init_scale_and_reuse() -> None:
    dit, (x, t, y) = _dit(), _inputs()
    torch.manual_seed(0)
    adapter = DiTT2IAdapter.from_dit(dit, in_channels=1, channels=(16, 32), num_res_blocks=1)
    assert adapter.blocks == (0, 1)  # default: the first half of the depth
    cond = _rand(2, 1, 8, 8, seed=2)
    plain = dit(x, t, y)
    assert torch.equal(dit(x, t, y, residuals=adapter(cond)), plain)  # fresh: bit-exact
    points = dit.injection_points(x.shape)
    assert {k: v.shape for k, v in adapter(cond).items()} == {k: points[k] for k in ("block.0", "block.1")}
    _fill(adapter.projections, seed=10)
    assert torch.equal(dit(x, t, y, residuals=adapter(cond, conditioning_scale=0.0)), plain)
    residuals = adapter(cond)
    assert (dit(x, t, y, residuals=residuals) - plain).abs().max() > 1e-3
    features = adapter.features(cond)  # computed once, reused at every step: no x, no t
    half = adapter(cond, conditioning_scale=0.5)
    assert all(torch.equal(residuals[k], features[k]) and torch.equal(half[k], 0.5 * features[k]) for k in features)
    every_other = DiTT2IAdapter(CONFIG, 1, (16, 32), 1, 4, "light_adapter", blocks=range(0, 4, 2))
    shapes = {k: v.shape for k, v in every_other(_rand(2, 1, 32, 32, seed=3)).items()}  # f = 4: at 4x the input
    assert shapes == {"block.0": points["block.0"], "block.2": points["block.2"]}


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter"])
@torch.no_grad()
def test_network_is_the_unet_adapters_single_scale_and_token_order(kind: str) -> None:
    torch.manual_seed(0)
    adapter = DiTT2IAdapter(CONFIG, 3, (16,), 1, 2, kind, blocks=(1, 3))
    _fill(adapter.projections, seed=20)
    reference = T2IAdapter(3, (16,), 1, 4, kind)  # one width: the full layout does not downsample; f p = 4
    layers = {k: v for k, v in adapter.state_dict().items() if not k.startswith("projections.")}
    if kind == "light_adapter":  # the UNet's light layout has an extra, downsampling, block: not the DiT's
        reference.body = reference.body[:1]
    reference.load_state_dict(layers)
    cond = _rand(2, 3, 16, 16, seed=4)
    grid = reference.features(cond)[-1]  # [B, 16, 4, 4]
    tokens = rearrange(grid, "b c h w -> b (h w) c")
    out = adapter(cond, conditioning_scale=0.7)
    for i, j in (("block.1", 0), ("block.3", 1)):
        proj = adapter.projections[j]
        torch.testing.assert_close(out[i], 0.7 * (tokens @ proj.weight.T + proj.bias), rtol=0, atol=1e-6)
    # row-major tokens: a change in the top-right 4x4 pixels (token row 0, column 3) reaches token 3 and its
    # neighbours up to 2 tokens away (two 3x3 convs), not the bottom-left token 12 (as it would column-major)
    moved = cond.clone()
    moved[:, :, :4, 12:] += 1.0
    delta = (adapter.tokens(moved) - adapter.tokens(cond)).abs().amax(dim=(0, 2))
    assert delta[3] > 1e-3 and delta[12] == 0


@torch.no_grad()
def test_composes_with_a_controlnet() -> None:
    dit, (x, t, y) = _dit(), _inputs()
    net = DiTControlNet.from_dit(dit, num_blocks=2, conditioning_channels=1)
    _fill(torch.nn.ModuleList([net.cond_embed, net.zero_linears]), seed=30)
    torch.manual_seed(0)
    adapter = DiTT2IAdapter(CONFIG, 2, (16,), 1, blocks=(1, 3))
    _fill(adapter.projections, seed=40)
    control, hint = _rand(2, 1, 8, 8, seed=5), _rand(2, 2, 8, 8, seed=6)
    from_cn, from_t2i = net(x, t, control, y), adapter(hint)
    assert from_cn["block.1"].abs().sum() > 0 and from_t2i["block.1"].abs().sum() > 0
    by_hand = {**from_cn, **from_t2i, "block.1": from_cn["block.1"] + from_t2i["block.1"]}
    got = ControlledModel(dit, net)(x, t, y, control=control, residuals=from_t2i)
    torch.testing.assert_close(got, dit(x, t, y, residuals=by_hand), rtol=0, atol=1e-6)
    for overwritten in ({**from_cn, **from_t2i}, {**from_t2i, **from_cn}):  # either one alone at block.1 differs
        assert not torch.allclose(got, dit(x, t, y, residuals=overwritten), atol=1e-4)


def test_trains_with_the_dit_frozen() -> None:
    dit, (x, t, y) = _dit(), _inputs()
    dit.requires_grad_(False)
    torch.manual_seed(0)
    adapter = DiTT2IAdapter(CONFIG, 1, (16,), 1)
    cond, target = _rand(2, 1, 8, 8, seed=7), _rand(2, 3, 8, 8, seed=8)
    with torch.no_grad():
        before = dit(x, t, y, residuals=adapter(cond))
    loss = torch.nn.functional.mse_loss(dit(x, t, y, residuals=adapter(cond)), target)
    loss.backward()
    assert all(p.grad is None for p in dit.parameters())
    assert all(p.grad is not None for p in adapter.parameters())
    assert all(p.grad.abs().sum() > 0 for p in adapter.projections.parameters())
    torch.optim.Adam(adapter.parameters(), lr=1e-2).step()
    with torch.no_grad():
        after = dit(x, t, y, residuals=adapter(cond))
    assert (after - before).abs().max() > 1e-4


def test_errors() -> None:
    adapter = DiTT2IAdapter(CONFIG, 3, (16,), 1, downscale_factor=2)
    with pytest.raises(ValueError, match=r"expected cond: \[B, 3, 16, 16\] \(the DiT's input_size 8 times "
                                         r"downscale_factor 2\), got \[2, 3, 8, 8\]"):
        adapter(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ShapeError, match=r"got \[2, 1, 16, 16\]"):
        adapter(torch.zeros(2, 1, 16, 16))
    for blocks in ((4,), (-1,), (1, 1), ()):
        with pytest.raises(ValueError, match=r"blocks must be distinct block indices in \[0, 3\] \(the DiT's depth "
                                             rf"is 4\), at least one, got {re.escape(str(list(blocks)))}"):
            DiTT2IAdapter(CONFIG, blocks=blocks)
    with pytest.raises(ValueError, match="unknown adapter_type 'full_adapter_xl'; expected one of full_adapter, "
                                         "light_adapter"):
        DiTT2IAdapter(CONFIG, adapter_type="full_adapter_xl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"widths >= 4 \(light_adapter works at width // 4\), got \[2\]"):
        DiTT2IAdapter(CONFIG, channels=(2,), adapter_type="light_adapter")
    with pytest.raises(ValueError, match="downscale_factor must be"):
        DiTT2IAdapter(CONFIG, downscale_factor=0)
    with pytest.raises(ValueError, match="patch_size"):
        DiTT2IAdapter({**CONFIG, "patch_size": 3})  # the DiT's own check
    with pytest.raises(TypeError, match="expected a genlab DiT, got T2IAdapter"):
        DiTT2IAdapter.from_dit(T2IAdapter())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="for a DiT, use genlab.adapters.dit_t2i_adapter.DiTT2IAdapter"):
        unet_points(DiT(**CONFIG))  # type: ignore[arg-type]
    preset = DiTT2IAdapter({"preset": "S/8", "input_size": 32}, channels=(8,))  # resolves the preset
    assert preset.blocks == tuple(range(6)) and preset.factor == 8 and preset.projections[0].out_features == 384
    assert next(DiTT2IAdapter.from_dit(DiT(**CONFIG).double(), channels=(8,)).parameters()).dtype == torch.float64


@torch.no_grad()
def test_several_adapters_sum_their_weighted_residuals_per_block() -> None:
    dit, (x, t, y) = _dit(), _inputs()
    torch.manual_seed(0)
    a = DiTT2IAdapter.from_dit(dit, in_channels=1, channels=(16,), num_res_blocks=1, blocks=(0, 1))
    b = DiTT2IAdapter.from_dit(dit, in_channels=3, channels=(8,), num_res_blocks=1, blocks=(1, 3),
                               downscale_factor=2, adapter_type="light_adapter")
    _fill(a.projections, seed=10)
    _fill(b.projections, seed=20)
    ca, cb = _rand(2, 1, 8, 8, seed=2), _rand(2, 3, 16, 16, seed=3)
    both = MultiDiTT2IAdapter([a, b])([ca, cb], weights=[0.7, 0.2], conditioning_scale=0.5)
    fa, fb = a.features(ca), b.features(cb)
    assert sorted(both) == ["block.0", "block.1", "block.3"]
    torch.testing.assert_close(both["block.0"], 0.5 * 0.7 * fa["block.0"], rtol=0, atol=1e-6)
    torch.testing.assert_close(both["block.1"], 0.5 * (0.7 * fa["block.1"] + 0.2 * fb["block.1"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(both["block.3"], 0.5 * 0.2 * fb["block.3"], rtol=0, atol=1e-6)
    assert not torch.allclose(dit(x, t, y, residuals=both), dit(x, t, y))
    with_one = MultiDiTT2IAdapter([a, b])([ca, cb], weights=[1.0, 0.0])
    torch.testing.assert_close(dit(x, t, y, residuals=with_one), dit(x, t, y, residuals=a(ca)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"one cond and one weight per adapter \(2\), got 1 conds and 2 weights"):
        MultiDiTT2IAdapter([a, b])([ca], weights=[1.0, 1.0])
    other = DiTT2IAdapter({**CONFIG, "hidden": 16}, in_channels=1, channels=(16,), num_res_blocks=1)
    with pytest.raises(ValueError, match="built for one DiT"):
        MultiDiTT2IAdapter([a, other])
    with pytest.raises(ValueError, match=r"expected one or more DiTT2IAdapters, got \['T2IAdapter'\]"):
        MultiDiTT2IAdapter([T2IAdapter()])
