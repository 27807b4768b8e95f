"""ControlNet on genlab's UNet: identity at initialisation, the copied encoder, residuals and scale,
several ControlNets, errors. (Against diffusers: tests/test_interop_controlnet.py.)"""

from __future__ import annotations

import pytest
import torch

from genlab.adapters.controlnet import ControlNet, MultiControlNet
from genlab.core.errors import ShapeError
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
