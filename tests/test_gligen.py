"""GLIGEN on genlab's UNet and DiT: identity at initialisation, attach/detach, the gate and scale, class
grounding, errors; against diffusers' GatedSelfAttentionDense, GLIGENTextBoundingboxProjection and a
UNet2DConditionModel of attention_type="gated"."""

from __future__ import annotations

import pytest
import torch

from genlab.adapters.gligen import GLIGEN, GatedSelfAttention, PositionNet, box_fourier_features
from genlab.core.errors import ShapeError
from genlab.models.dit import DiT
from genlab.models.unet import UNet


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(preset="tiny", norm_groups=8, attention_levels=(1,), cross_attention_dim=16, zero_init=False).eval()


def _dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, depth=2, hidden=32, num_heads=2, patch_size=2, **kwargs).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero: make every block do something
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model


def _entities(b: int = 2, n: int = 3, dim: int = 16, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(b, n, 2, generator=g) * 0.5
    boxes = torch.cat([corner, corner + 0.1 + 0.4 * torch.rand(b, n, 2, generator=g)], dim=-1)
    masks = torch.tensor([[1.0] * n, [1.0] * (n - 1) + [0.0]])[:b]  # the second sample pads its last entity
    return boxes, masks, torch.randn(b, n, dim, generator=g)


def _open_gates(gligen: GLIGEN, seed: int = 2) -> GLIGEN:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gligen.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for fuser in gligen.fusers:
            fuser.alpha_attn.fill_(0.7), fuser.alpha_dense.fill_(-0.4)
    return gligen


@pytest.mark.parametrize("backbone", ["unet", "dit", "dit_cross"])
def test_identity_at_initialisation_attach_detach(backbone: str) -> None:
    g = torch.Generator().manual_seed(0)
    if backbone == "unet":
        model, ctx, x = _unet(), torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    else:
        model = _dit(cross_attention_dim=16) if backbone == "dit_cross" else _dit()
        ctx = torch.randn(2, 5, 16, generator=g) if backbone == "dit_cross" else None
        x = torch.randn(2, 3, 8, 8, generator=g)
    t, keys = torch.tensor([3.0, 700.0]), set(model.state_dict())
    gligen = GLIGEN(model, embedding_dim=16, hidden=32)
    assert len(gligen.fusers) == (1 + 1 + 2 if backbone == "unet" else 2)  # UNet: level 1 down, mid, level 1 up
    boxes, masks, e = _entities()
    with torch.no_grad():
        ref = model(x, t, context=ctx)
        gligen.attach()
        assert gligen.attached and {k for k in model.state_dict() if ".fuser." in k}
        with gligen.grounding(boxes, masks, e):
            assert torch.equal(model(x, t, context=ctx), ref)  # tanh(gamma) = 0 at initialisation
    with gligen.grounding(boxes, masks, e):  # the gates still learn
        model(x, t, context=ctx).square().mean().backward()
    assert all(f.alpha_attn.grad.abs() > 0 for f in gligen.fusers)
    _open_gates(gligen)
    with torch.no_grad():
        with gligen.grounding(boxes, masks, e) as tokens:
            grounded = model(x, t, context=ctx)
            assert tokens.shape == (2, 3, gligen.position_net.linears[-1].out_features)
            with gligen.grounding(boxes, masks, e, scale=0.0):  # beta = 0: scheduled sampling's second phase
                assert torch.equal(model(x, t, context=ctx), ref)
            assert torch.equal(model(x, t, context=ctx), grounded)  # the outer grounding is back
        assert (grounded - ref).abs().max() > 1e-3 and torch.equal(model(x, t, context=ctx), ref)  # no tokens
        other = _entities(seed=5)
        with gligen.grounding(*other):
            assert not torch.allclose(model(x, t, context=ctx), grounded)  # the boxes and phrases matter
        gligen.detach()
        assert set(model.state_dict()) == keys and not gligen.attached
        with gligen.grounding(boxes, masks, e):
            assert torch.equal(model(x, t, context=ctx), ref)


def test_class_grounding_padding_and_errors() -> None:
    net = PositionNet(embedding_dim=8, token_dim=16, hidden=32, num_classes=5)
    boxes, masks, _ = _entities()
    labels = torch.tensor([[0, 3, 4], [1, 1, 2]])
    tokens = net(boxes, masks, labels=labels)
    changed = labels.clone()
    changed[1, 2] = 4  # a padding entity: its label and box do not matter
    moved = boxes.clone()
    moved[1, 2] += 0.2
    assert torch.equal(net(moved, masks, labels=changed), tokens)
    changed[0, 2] = 1
    assert not torch.allclose(net(boxes, masks, labels=changed)[0, 2], tokens[0, 2])
    with pytest.raises(ValueError, match=r"give labels \(built with num_classes\), not the other"):
        net(boxes, masks, embeddings=torch.zeros(2, 3, 8))
    with pytest.raises(ShapeError, match=r"expected boxes: \[B, N, 4\] and masks: \[B, N\], got \[2, 3, 4\] and \[2\]"):
        net(boxes, masks[:, 0], labels=labels)
    with pytest.raises(ShapeError, match=r"expected embeddings: \[B, N, 16\] = \[2, 3, 16\], got \[2, 3, 8\]"):
        PositionNet(16, 16)(boxes, masks, torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="embedding_dim must be >= 1, got 0"):
        PositionNet(0, 16)
    with pytest.raises(ValueError, match="no transformer blocks; build it with cross_attention_dim"):
        GLIGEN(UNet(preset="tiny", norm_groups=8, attention_levels=(1,)), 8)
    with pytest.raises(TypeError, match="expected a genlab UNet or DiT, got Linear"):
        GLIGEN(torch.nn.Linear(2, 2), 8)  # type: ignore[arg-type]
    unet = _unet()
    first = GLIGEN(unet, 16, hidden=32).attach()
    with pytest.raises(ValueError, match=r"transformer blocks \[0, 1, 2, 3\] already hold another fuser"):
        GLIGEN(unet, 16, hidden=32).attach()
    first.detach()
    with pytest.raises(ShapeError, match=r"expected grounding tokens \[B, M, 16\] with B = 2 .* got \[1, 3, 16\]"):
        first.fusers[0](torch.zeros(2, 4, 32), torch.zeros(1, 3, 16))


# --- against diffusers ----------------------------------------------------------------------------------------

def _gsa_keys(name: str) -> str:
    for a, b in (("norm_1", "norm1"), ("norm_2", "norm2"), ("ff.proj_in", "ff.net.0.proj"), ("ff.proj_out", "ff.net.2"),
                 ("attn.to_out", "attn.to_out.0")):
        name = name.replace(a, b)
    return name


@torch.no_grad()
def test_modules_match_diffusers() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection, get_fourier_embeds_from_boundingbox

    boxes, masks, e = _entities(dim=24)
    torch.testing.assert_close(box_fourier_features(boxes, 8), get_fourier_embeds_from_boundingbox(8, boxes),
                               rtol=0, atol=1e-6)
    torch.manual_seed(0)
    peer_net = GLIGENTextBoundingboxProjection(positive_len=24, out_dim=16)
    with torch.no_grad():
        peer_net.null_positive_feature.normal_(), peer_net.null_position_feature.normal_()
    net = PositionNet(24, 16)
    net.load_state_dict(peer_net.state_dict())
    tokens = net(boxes, masks, e)
    torch.testing.assert_close(tokens, peer_net(boxes, masks, positive_embeddings=e), rtol=0, atol=1e-5)
    peer = GatedSelfAttentionDense(query_dim=32, context_dim=16, n_heads=4, d_head=8)
    peer.alpha_attn.fill_(0.6), peer.alpha_dense.fill_(-0.3)
    gsa = GatedSelfAttention(32, 16, 4)
    assert {_gsa_keys(k) for k in gsa.state_dict()} == set(peer.state_dict())
    gsa.load_state_dict({k: peer.state_dict()[_gsa_keys(k)] for k in gsa.state_dict()})
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(4))
    ref = peer(x, tokens)
    assert (ref - x).abs().max() > 0.1
    torch.testing.assert_close(gsa(x, tokens), ref, rtol=0, atol=1e-5)


UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 48),
            norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@torch.no_grad()
def test_unet_matches_diffusers_gated_unet_both_ways(tmp_path) -> None:
    """A diffusers UNet of attention_type="gated" (fusers in every BasicTransformerBlock, position_net),
    saved and reloaded, against genlab's UNet + attached GLIGEN converted from it, and back."""
    diffusers = pytest.importorskip("diffusers")
    from genlab.interop.gligen_weights import gligen_from_diffusers, gligen_to_diffusers

    torch.manual_seed(0)
    peer = diffusers.UNet2DConditionModel(**UNET, attention_type="gated")
    for name, p in peer.named_parameters():
        if ".fuser." in name or name.startswith("position_net."):
            p.add_(0.1 * torch.randn(p.shape))
    peer.save_pretrained(tmp_path / "gated")
    peer = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "gated").eval()
    unet, gligen = gligen_from_diffusers(peer)
    unet.eval()
    assert gligen.attached and len(gligen.fusers) == 4
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.tensor([7, 913])
    boxes, masks, e = _entities()
    ref = peer(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={
        "gligen": {"boxes": boxes, "positive_embeddings": e, "masks": masks}}).sample
    assert (ref - peer(x, t, encoder_hidden_states=ctx).sample).abs().max() > 1e-3  # the grounding matters
    with gligen.grounding(boxes, masks, e):
        torch.testing.assert_close(unet(x, t, context=ctx), ref, rtol=0, atol=1e-5)
    back = gligen_to_diffusers(unet, gligen)
    original, converted = peer.state_dict(), back.state_dict()
    assert original.keys() == converted.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="attention_type='gated'"):
        gligen_from_diffusers(diffusers.UNet2DConditionModel(**UNET))
    small = GLIGEN(unet, 16, hidden=32)
    with pytest.raises(ValueError, match="the GLIGEN must be attached to this UNet"):
        gligen_to_diffusers(unet, small)
    gligen.detach(), small.attach()
    with pytest.raises(ValueError, match=r"position net of .* = \(512, 8, 16, True\), got \(32, 8, 16, True\)"):
        gligen_to_diffusers(unet, small)


def test_meta_device_float64_and_gradient_checkpointing() -> None:
    """Device and dtype follow the backbone (nothing on the CPU for a meta UNet; float64 stays float64), and
    with gradient checkpointing (backward inside the grounding) the gradients are those without it."""
    with torch.device("meta"):
        unet = UNet(preset="tiny", norm_groups=8, attention_levels=(1,), cross_attention_dim=16)
        boxes, masks, e = torch.rand(2, 3, 4), torch.ones(2, 3), torch.randn(2, 3, 16)
        x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 16)
    gligen = GLIGEN(unet, 16, hidden=32).attach()
    assert next(gligen.parameters()).device.type == "meta"
    with gligen.grounding(boxes, masks, e):
        assert unet(x, torch.tensor([1.0, 2.0], device="meta"), context=ctx).device.type == "meta"
    grads = []
    for ckpt in (False, True):
        unet = _unet().double().train()
        unet.gradient_checkpointing = ckpt
        gligen = _open_gates(GLIGEN(unet, 16, hidden=32)).attach()
        assert next(gligen.parameters()).dtype == torch.float64
        g = torch.Generator().manual_seed(0)
        with gligen.grounding(*(a.double() for a in _entities())):
            out = unet(torch.randn(2, 3, 16, 16, generator=g).double(), torch.tensor([3.0, 9.0]),
                       context=torch.randn(2, 5, 16, generator=g).double())
            assert out.dtype == torch.float64
            out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gligen.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
