"""ControlNet on genlab's UNet: identity at initialisation, the copied encoder, residuals and scale,
several ControlNets, errors; the controlled model (``ControlledModel``, model ``controlled_unet``) through
a Denoiser and a sampler. (Against diffusers: tests/test_interop_controlnet.py; training:
tests/test_controlnet_training.py.) ControlNet for the DiT: identity at initialisation, copied blocks, residuals."""

from __future__ import annotations

import pytest
import torch

from genlab.adapters.controlled import ControlledModel
from genlab.adapters.controlnet import ControlNet, MultiControlNet
from genlab.adapters.dit_controlnet import DiTControlNet
from genlab.core.errors import ConfigError, ShapeError
from genlab.core.registry import build
from genlab.diffusion import VP, Denoiser
from genlab.diffusion.samplers.ddim import DDIM
from genlab.models.dit import DiT
from genlab.models.unet import UNet

CONFIG = dict(preset="tiny", norm_groups=8, attention_levels=(1,), cross_attention_dim=16, num_classes=3,
              zero_init=False)


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(**CONFIG).eval()


def _perturbed(net: ControlNet, seed: int = 1) -> ControlNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def _inputs(f: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    return x, torch.tensor([4.0, 600.0]), torch.tensor([0, 2]), ctx, torch.rand(2, 3, 8 * f, 8 * f, generator=g)


def test_identity_at_initialisation_and_copied_encoder() -> None:
    unet = _unet()
    net = ControlNet.from_unet(unet, embedding_channels=(8, 16))
    x, t, y, ctx, cond = _inputs()
    for name, value in net.state_dict().items():  # the way down is the UNet's; the rest starts at zero
        if name.startswith(("zero_convs.", "mid_conv.", "cond_embed.conv_out.")):
            assert not value.any(), name
        elif not name.startswith("cond_embed."):
            assert torch.equal(value, unet.state_dict()[name]), name
    residuals = net(x, t, cond, y, ctx)
    assert {k: r.shape for k, r in residuals.items()} == unet.injection_points(x.shape)
    with torch.no_grad():
        assert torch.equal(unet(x, t, y, ctx, residuals=residuals), unet(x, t, y, ctx))
    unet(x, t, y, ctx, residuals=residuals).square().mean().backward()  # the zero convs still learn
    assert net.zero_convs[0].weight.grad.abs().sum() > 0 and net.mid_conv.weight.grad.abs().sum() > 0


def test_residuals_scale_and_several_controlnets() -> None:
    unet = _unet()
    nets = [_perturbed(ControlNet.from_unet(unet, 1, (8,)), seed) for seed in (1, 2)]
    x, t, y, ctx, _ = _inputs()
    conds = [torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)]  # embedding_channels (8,): the UNet's resolution
    with torch.no_grad():
        one = nets[0](x, t, conds[0], y, ctx)
        half = nets[0](x, t, conds[0], y, ctx, conditioning_scale=0.5)
        assert all(torch.equal(half[k], one[k] * 0.5) and one[k].abs().max() > 0 for k in one)
        assert not torch.allclose(unet(x, t, y, ctx, residuals=one), unet(x, t, y, ctx))
        both = MultiControlNet(nets)(x, t, conds, y, ctx, conditioning_scales=[1.0, 0.3])
        other = nets[1](x, t, conds[1], y, ctx, conditioning_scale=0.3)
        assert all(torch.equal(both[k], one[k] + other[k]) for k in one)
        assert not torch.allclose(nets[0](x, t, conds[1], y, ctx)["mid"], one["mid"])  # the condition matters


def test_channels_per_level_and_plain_unet() -> None:
    """A UNet without cross-attention or classes, with uneven level widths."""
    torch.manual_seed(0)
    unet = UNet(channels_per_level=(16, 24), num_res_blocks=1, norm_groups=8, zero_init=False).eval()
    net = _perturbed(ControlNet.from_unet(unet, embedding_channels=(8, 16)))
    x, t, _, _, cond = _inputs()
    with torch.no_grad():
        residuals = net(x, t, cond)
        assert residuals["mid"].shape == (2, 24, 4, 4) and unet(x, t, residuals=residuals).shape == x.shape


def test_bad_inputs_are_named() -> None:
    unet = _unet()
    net = ControlNet.from_unet(unet, embedding_channels=(8, 16))
    x, t, y, ctx, cond = _inputs()
    with pytest.raises(ShapeError, match=r"cond: \[B, C_cond, 2 H, 2 W\] = \[2, 3, 16, 16\] .* got \[2, 3, 8, 8\]"):
        net(x, t, cond[..., :8, :8], y, ctx)
    with pytest.raises(ShapeError, match=r"ControlNet: expected x: \[B, C, H, W\] = \[B, 3, H, W\]"):
        net(x[:, :2], t, cond, y, ctx)
    with pytest.raises(ValueError, match="ControlNet: this model cross-attends"):
        net(x, t, cond, y)
    with pytest.raises(ValueError, match=r"embedding_channels must be a non-empty list of widths >= 1, got \[\]"):
        ControlNet(CONFIG, embedding_channels=())
    with pytest.raises(ValueError, match="conditioning_channels must be >= 1, got 0"):
        ControlNet(CONFIG, conditioning_channels=0)
    with pytest.raises(ValueError, match="not divisible by num_heads"):  # checked as the UNet checks it
        ControlNet({**CONFIG, "num_heads": 5})
    with pytest.raises(ValueError, match=r"one cond and one conditioning scale per ControlNet \(2\), got 1 conds"):
        MultiControlNet([net, net])(x, t, [cond], y, ctx)


def test_the_controlled_unet_is_the_unet_at_initialisation_through_a_sampler() -> None:
    """Zero convolutions: exactly the UNet's output, and exactly its DDIM samples with the control in ``cond``."""
    unet = _unet()
    nets = [ControlNet.from_unet(unet, 3, (8, 16)), ControlNet.from_unet(unet, 1, (8, 16))]
    model = ControlledModel(unet, nets)
    x, t, y, ctx, cond = _inputs()
    control = torch.cat([cond, cond[:, :1]], dim=1)  # the two ControlNets' images stacked on channels
    with torch.no_grad():
        assert torch.equal(model(x, t, y, ctx, control=control), unet(x, t, y, ctx))
        g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        plain = DDIM(4).sample(Denoiser(unet, VP(), "v"), shape=(2, 3, 8, 8), generator=g(), progress=False,
                               cond={"class_labels": y, "context": ctx})
        steered = DDIM(4).sample(Denoiser(model, VP(), "v"), shape=(2, 3, 8, 8), generator=g(), progress=False,
                                 cond={"class_labels": y, "context": ctx, "control": control})
    assert torch.equal(plain, steered) and plain.abs().max() > 0


def test_the_controlled_unet_adds_each_controlnets_scaled_residuals() -> None:
    unet = _unet()
    nets = [_perturbed(ControlNet.from_unet(unet, c, (8,)), seed) for c, seed in ((1, 1), (2, 2))]
    model = ControlledModel(unet, nets, conditioning_scale=[1.0, 0.5])
    x, t, y, ctx, _ = _inputs()
    c1, c2 = torch.rand(2, 1, 8, 8), torch.rand(2, 2, 8, 8)
    extra = {"mid": torch.randn(2, 64, 4, 4)}  # another adapter's residual
    with torch.no_grad():
        r1, r2 = nets[0](x, t, c1, y, ctx), nets[1](x, t, c2, y, ctx, conditioning_scale=0.5)
        expected = unet(x, t, y, ctx, residuals={k: r1[k] + r2[k] for k in r1})
        assert torch.equal(model(x, t, y, ctx, control=torch.cat([c1, c2], 1)), expected)
        assert torch.equal(model(x, t, y, ctx, control=[c1, c2]), expected)  # one tensor per ControlNet
        same = ControlledModel(unet, MultiControlNet(nets), conditioning_scale=[1.0, 0.5])
        assert torch.equal(same(x, t, y, ctx, control=[c1, c2]), expected)
        assert not torch.allclose(expected, unet(x, t, y, ctx))
        r2 = nets[1](x, t, c2, y, ctx, conditioning_scale=2.0)
        expected = unet(x, t, y, ctx, residuals={k: 2 * r1[k] + r2[k] for k in r1})
        assert torch.allclose(model(x, t, y, ctx, control=[c1, c2], control_scale=[2.0, 2.0]), expected, atol=1e-6)
        with_extra = unet(x, t, y, ctx, residuals={k: r1[k] * 2 + r2[k] + extra.get(k, 0) for k in r1})
        assert torch.allclose(model(x, t, y, ctx, control=[c1, c2], control_scale=2.0, residuals=extra), with_extra,
                              atol=1e-6)
        assert torch.equal(model(x, t, y, ctx), unet(x, t, y, ctx))  # no control: the UNet alone
    assert model.num_classes == 3


def test_the_controlled_unet_from_a_config() -> None:
    unet = {"preset": "tiny", "norm_groups": 8, "num_classes": 10, "zero_init": False}
    cfg = {"type": "controlled_unet", "unet": unet,
           "controlnets": [{"conditioning_channels": 1, "embedding_channels": [8]}]}
    model = build("model", cfg, in_channels=1)
    assert isinstance(model, ControlledModel) and model.backbone.in_channels == 1
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([3.0, 500.0]), y, control=torch.rand(2, 1, 16, 16)),
                           model.backbone(x, torch.tensor([3.0, 500.0]), y))
    with pytest.raises(ConfigError, match=r"model.unet.chanels: unknown key; did you mean 'channels'"):
        build("model", {**cfg, "unet": {"chanels": 8}}, in_channels=1)
    with pytest.raises(ConfigError, match=r"controlnets\[0\].conditioning_chanels: unknown key"):
        build("model", {**cfg, "controlnets": [{"conditioning_chanels": 1}]}, in_channels=1)


def test_controlled_unet_bad_inputs_are_named() -> None:
    unet = _unet()
    net = ControlNet.from_unet(unet, 1, (8,))
    with pytest.raises(TypeError, match="the backbone must be a genlab UNet or DiT, got ControlNet"):
        ControlledModel(net, [net])
    with pytest.raises(TypeError, match=r"controlnets\[1\] must be a ControlNet \(the backbone is a UNet\), got UNet"):
        ControlledModel(unet, [net, unet])
    other = ControlNet.from_unet(UNet(**{**CONFIG, "channels": 16}), 1, (8,))
    with pytest.raises(ValueError, match=r"controlnets\[0\] was built for another UNet \(widths \[16, 32\], the "
                                         r"UNet's \[32, 64\]\); copy it from this backbone \(ControlNet.from_unet\)"):
        ControlledModel(unet, other)
    with pytest.raises(ValueError, match=r"one control scale or one per ControlNet \(2\), got 3"):
        ControlledModel(unet, [net, net], conditioning_scale=[1.0, 1.0, 1.0])
    model = ControlledModel(unet, [net, ControlNet.from_unet(unet, 2, (8, 16))])
    x, t, y, ctx, _ = _inputs()
    with pytest.raises(ShapeError, match=r"expected control: \[B, 1 \+ 2, H', W'\] .* got \[2, 2, 8, 8\]"):
        model(x, t, y, ctx, control=torch.rand(2, 2, 8, 8))
    with pytest.raises(ShapeError, match="at different resolutions; give control as a list"):
        model(x, t, y, ctx, control=torch.rand(2, 3, 8, 8))


def _dit() -> DiT:
    """A small DiT whose adaLN and output layers are not zero (so that residuals show in its output)."""
    torch.manual_seed(0)
    dit = DiT(input_size=8, in_channels=2, patch_size=2, hidden=32, depth=3, num_heads=4, num_classes=5,
              cross_attention_dim=16, per_block_embedding=True).eval()
    return _perturbed(dit, seed=4)


def test_dit_controlnet_is_the_identity_at_initialisation_and_copies_the_first_blocks() -> None:
    dit = _dit()
    net = DiTControlNet.from_dit(dit, num_blocks=2, conditioning_channels=1)
    source = dit.state_dict()
    for name, value in net.state_dict().items():
        if name.startswith("dit."):
            assert torch.equal(value, source[name[4:]]), name
        else:  # cond_embed, zero_linears
            assert not value.any(), name
    assert not any(k.startswith(("dit.blocks.2.", "dit.proj_out")) for k in net.state_dict())
    g = torch.Generator().manual_seed(3)
    x, ctx, c = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.rand(2, 1, 8, 8)
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    residuals = net(x, t, c, y, ctx)
    points = dit.injection_points(x.shape)
    assert {k: r.shape for k, r in residuals.items()} == {f"block.{i}": points[f"block.{i}"] for i in (0, 1)}
    with torch.no_grad():
        assert torch.equal(dit(x, t, y, ctx, residuals=residuals), dit(x, t, y, ctx))
    dit(x, t, y, ctx, residuals=residuals).square().mean().backward()  # the zero linears still learn
    assert net.zero_linears[1].weight.grad.abs().sum() > 0


def test_dit_controlnet_residuals_follow_the_blocks_the_condition_and_the_scale() -> None:
    dit = _dit()
    net = _perturbed(DiTControlNet.from_dit(dit, num_blocks=2, conditioning_channels=1), seed=5)
    g = torch.Generator().manual_seed(3)
    x, ctx, c = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.rand(2, 1, 8, 8)
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    with torch.no_grad():
        one, half = net(x, t, c, y, ctx), net(x, t, c, y, ctx, conditioning_scale=0.5)
        assert all(torch.equal(half[k], 0.5 * one[k]) for k in one)
        # by hand: the copy's blocks from the control-shifted tokens, each followed by its zero linear
        copy = net.dit
        h = copy.tokens(x) + net.cond_embed(c).flatten(2).transpose(1, 2)
        cs = copy.conditions(x, t, y)
        for i in range(2):
            h = copy.blocks[i](h, cs[i], ctx)
            assert torch.allclose(one[f"block.{i}"], net.zero_linears[i](h), atol=1e-6)
        assert not torch.allclose(net(x, t, torch.rand(2, 1, 8, 8), y, ctx)["block.1"], one["block.1"])
        assert not torch.allclose(dit(x, t, y, ctx, residuals=one), dit(x, t, y, ctx))


def test_dit_controlnet_bad_inputs_are_named() -> None:
    dit = _dit()
    with pytest.raises(ValueError, match=r"num_blocks must be in \[1, 3\] \(the DiT's depth\), got 4"):
        DiTControlNet.from_dit(dit, num_blocks=4)
    with pytest.raises(ValueError, match="conditioning_channels must be >= 1, got 0"):
        DiTControlNet(dit.config, conditioning_channels=0)
    with pytest.raises(TypeError, match="expected a genlab DiT, got UNet"):
        DiTControlNet.from_dit(_unet())
    net = DiTControlNet.from_dit(dit, 1, 1)
    with pytest.raises(ShapeError, match=r"expected cond: \[B, C_cond, H, W\] = \[2, 1, 8, 8\], got \[2, 1, 4, 4\]"):
        net(torch.randn(2, 2, 8, 8), 1.0, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), torch.randn(2, 5, 16))


def test_a_controlled_dit_is_the_dit_at_initialisation_and_checks_its_controlnets() -> None:
    dit = _dit()
    nets = [DiTControlNet.from_dit(dit, 2, 1), DiTControlNet.from_dit(dit, 1, 2)]
    model = ControlledModel(dit, nets)
    g = torch.Generator().manual_seed(3)
    x, ctx, c = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.rand(2, 3, 8, 8)
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(model(x, t, y, ctx, control=c), dit(x, t, y, ctx))
        _perturbed(nets[1], seed=6)
        r = nets[1](x, t, c[:, 1:], y, ctx, conditioning_scale=0.5)
        assert torch.equal(model(x, t, y, ctx, control=c, control_scale=[1.0, 0.5]), dit(x, t, y, ctx, residuals=r))
    with pytest.raises(TypeError, match=r"controlnets\[0\] must be a DiTControlNet \(the backbone is a DiT\), got "
                                        "ControlNet"):
        ControlledModel(dit, ControlNet.from_unet(_unet()))
    other = DiT(**{**dit.config, "hidden": 64})
    with pytest.raises(ValueError, match=r"built for another DiT \(hidden 64, the DiT's 32\); copy it from this "
                                         r"backbone \(DiTControlNet.from_dit\)"):
        ControlledModel(dit, DiTControlNet.from_dit(other))
