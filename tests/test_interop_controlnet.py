"""genlab's ControlNet reproduces diffusers' ControlNetModel (+ UNet2DConditionModel) after
save_pretrained / from_pretrained, both ways, alone and several at once."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genlab.adapters.controlnet import ControlNet, MultiControlNet  # noqa: E402
from genlab.interop.diffusers import from_diffusers, to_diffusers  # noqa: E402
from genlab.models.unet import UNet  # noqa: E402

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 48),
            norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4, num_class_embeds=3,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
EMBEDDING = (8, 16)  # the conditioning image at twice the UNet's resolution


def _perturbed(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A UNet and two ControlNets made from it (perturbed: the zero convs are not zero), saved and reloaded."""
    root = tmp_path_factory.mktemp("controlnet")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET)
    unet.save_pretrained(root / "unet")
    for i in (1, 2):
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING)
        _perturbed(net, i).save_pretrained(root / f"controlnet_{i}")
    load = diffusers.ControlNetModel.from_pretrained
    return root, diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval(), \
        [load(root / f"controlnet_{i}").eval() for i in (1, 2)]


def _inputs():
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    conds = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(2)]
    return x, torch.tensor([7, 913]), torch.tensor([0, 2]), ctx, conds


def _controlled(unet, down, mid, x, t, y, ctx):
    return unet(x, t, encoder_hidden_states=ctx, class_labels=y, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


@torch.no_grad()
def test_controlnet_matches_diffusers_both_ways(saved) -> None:
    root, peer_unet, (peer, _) = saved
    unet, net = from_diffusers(root / "unet"), from_diffusers(root / "controlnet_1")
    assert isinstance(net, ControlNet) and net.widths == [32, 48] and net.embedding_channels == EMBEDDING
    x, t, y, ctx, (cond, _) = _inputs()
    down, mid = peer(x, t, ctx, cond, conditioning_scale=0.7, class_labels=y, return_dict=False)
    ours = net(x, t, cond, y, ctx, conditioning_scale=0.7)
    assert list(ours) == [f"down.{k}" for k in range(len(down))] + ["mid"] and mid.abs().max() > 0.01
    for k, r in enumerate(down):
        torch.testing.assert_close(ours[f"down.{k}"], r, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["mid"], mid, rtol=0, atol=1e-5)
    ref = _controlled(peer_unet, down, mid, x, t, y, ctx)
    assert (ref - _controlled(peer_unet, None, None, x, t, y, ctx)).abs().max() > 1e-3  # the control matters
    torch.testing.assert_close(unet(x, t, y, ctx, residuals=ours), ref, rtol=0, atol=1e-5)
    back = to_diffusers(net)
    assert isinstance(back, diffusers.ControlNetModel)
    original, converted = peer.state_dict(), back.state_dict()
    assert original.keys() == converted.keys() and all(torch.equal(converted[k], original[k]) for k in original)


@torch.no_grad()
def test_several_controlnets_match_multicontrolnet(saved) -> None:
    root, peer_unet, peers = saved
    unet = from_diffusers(root / "unet")
    nets = MultiControlNet([from_diffusers(root / f"controlnet_{i}") for i in (1, 2)])
    x, t, y, ctx, conds = _inputs()
    multi = diffusers.models.controlnets.MultiControlNetModel(peers)
    down, mid = multi(x, t, ctx, conds, [1.0, 0.4], class_labels=y, return_dict=False)
    ours = nets(x, t, conds, y, ctx, conditioning_scales=[1.0, 0.4])
    torch.testing.assert_close(ours["mid"], mid, rtol=0, atol=1e-5)
    torch.testing.assert_close(unet(x, t, y, ctx, residuals=ours), _controlled(peer_unet, down, mid, x, t, y, ctx),
                               rtol=0, atol=1e-5)


def test_from_unet_matches_diffusers_from_unet(saved) -> None:
    """genlab's ControlNet.from_unet copies what diffusers' ControlNetModel.from_unet copies."""
    root, peer_unet, _ = saved
    ours = to_diffusers(ControlNet.from_unet(from_diffusers(root / "unet"), embedding_channels=EMBEDDING))
    theirs = diffusers.ControlNetModel.from_unet(peer_unet, conditioning_embedding_out_channels=EMBEDDING)
    for key, value in theirs.state_dict().items():
        if not key.startswith("controlnet_cond_embedding.") or "conv_out" in key:  # random there, zero at conv_out
            assert torch.equal(ours.state_dict()[key], value), key


def test_what_cannot_convert_is_named() -> None:
    torch.manual_seed(0)
    small = {k: v for k, v in UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    for option, value in (("global_pool_conditions", True), ("controlnet_conditioning_channel_order", "bgr")):
        with pytest.raises(ValueError, match=f"ControlNetModel: option {option}={value!r} is not supported"):
            from_diffusers(diffusers.ControlNetModel(**small, **{option: value}))
    with pytest.raises(ValueError, match="ControlNetModel: option only_cross_attention=True"):
        from_diffusers(diffusers.ControlNetModel(**small, only_cross_attention=True))
    plain = ControlNet(dict(preset="tiny", norm_groups=8))
    with pytest.raises(ValueError, match="ControlNetModel always cross-attends in its middle block"):
        to_diffusers(plain)
    wide = ControlNet(dict(preset="tiny", norm_groups=8, cross_attention_dim=8, time_embed_dim=64))
    with pytest.raises(ValueError, match="time embedding width to 4 \\* channels = 128, got time_embed_dim=64"):
        to_diffusers(wide)
    assert isinstance(to_diffusers(ControlNet(dict(preset="tiny", norm_groups=8, cross_attention_dim=8))),
                      diffusers.ControlNetModel)
    assert not isinstance(plain, UNet)
