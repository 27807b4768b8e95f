"""genlab's DiT reproduces diffusers' DiTTransformer2DModel exactly, both ways, after save/load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiTTransformer2DModel  # noqa: E402

from genlab.interop.diffusers import from_diffusers, to_diffusers  # noqa: E402
from genlab.interop.dit_weights import dit_from_diffusers, dit_to_diffusers  # noqa: E402
from genlab.models.dit import DiT  # noqa: E402

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            num_embeds_ada_norm=10)


def _diffusers_dit(tie: bool = True, **kwargs) -> DiTTransformer2DModel:
    """Random weights, every parameter perturbed (so that zero-initialised layers matter); with ``tie``,
    every block's time/label embedder is block 0's, as in converted checkpoints."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**(TINY | kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for block in model.transformer_blocks[1:] if tie else []:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.0, 417.5, 999.0])
    return x, t, torch.tensor([3, 9, 10])  # 10 = diffusers' null class, -1 in genlab


@torch.no_grad()
def _outputs(model: DiTTransformer2DModel, dit: DiT) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, y = _inputs()
    x = x.to(dit.proj_out.weight.dtype)
    return model(x, t, y).sample, dit(x, t, torch.where(y == 10, -1, y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> DiTTransformer2DModel:
    """The perturbed tiny model (learn_sigma: out_channels = 2 * in_channels), saved and reloaded."""
    path = tmp_path_factory.mktemp("dit")
    _diffusers_dit(out_channels=8).save_pretrained(path)
    return DiTTransformer2DModel.from_pretrained(path).eval()


def test_from_diffusers_matches_outputs(saved) -> None:
    dit = dit_from_diffusers(saved)
    assert dit.config["learn_sigma"] and dit.out_channels == 8 and dit.config["time_freq_shift"] == 1.0
    assert not dit.config["per_block_embedding"]  # equal copies: the paper's one embedder
    assert not dit.training
    torch.testing.assert_close(dit.pos_embed, saved.pos_embed.pos_embed[0], rtol=0, atol=0)
    ref, out = _outputs(saved, dit)
    assert ref.shape == out.shape == (3, 8, 8, 8) and ref.std() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    dit.time_embed.freq_shift = 0.0  # the paper's time embedding differs measurably: the test can fail
    assert (_outputs(saved, dit)[1] - ref).abs().max() > 1e-4


def test_round_trip(saved) -> None:
    back = dit_to_diffusers(dit_from_diffusers(saved))
    for key in TINY | {"out_channels": 8, "norm_eps": saved.config.norm_eps, "attention_bias": True}:
        assert back.config[key] == saved.config[key], key
    original, converted = saved.state_dict(), back.state_dict()
    assert original.keys() == converted.keys()
    for key in original:
        assert torch.equal(converted[key], original[key]), key
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, y).sample, saved(x, t, y).sample)


def test_default_out_channels_and_no_attention_bias() -> None:
    model = _diffusers_dit(attention_bias=False, norm_eps=1e-6)
    dit = dit_from_diffusers(model)
    assert not dit.config["learn_sigma"] and dit.out_channels == 4 and dit.blocks[0].attn.to_q.bias is None
    ref, out = _outputs(model, dit)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert dit_to_diffusers(dit).config.attention_bias is False


def test_per_block_embedders_convert_exactly(tmp_path) -> None:
    """A DiT trained with diffusers (each block's embedder its own) converts both ways, float32 and float64."""
    _diffusers_dit(tie=False, num_layers=3, out_channels=8).save_pretrained(tmp_path)
    saved = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    dit = from_diffusers(tmp_path)
    assert isinstance(dit, DiT) and dit.config["per_block_embedding"] and dit.blocks[0].time_embed is None
    ref, out = _outputs(saved, dit)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    tied = dit_from_diffusers(_diffusers_dit(tie=True, num_layers=3, out_channels=8))
    assert (_outputs(saved, tied)[1] - ref).abs().max() > 1e-3  # the blocks' own embedders matter
    back = to_diffusers(dit)
    original, converted = saved.state_dict(), back.state_dict()
    assert original.keys() == converted.keys()
    assert all(torch.equal(converted[key], original[key]) for key in original)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, y).sample, ref)
    ref, out = _outputs(saved.double(), dit_from_diffusers(saved.double()))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_what_genlab_cannot_express_raises() -> None:
    with pytest.raises(ValueError, match="supports only activation_fn='gelu-approximate', got 'geglu'"):
        dit_from_diffusers(_diffusers_dit(activation_fn="geglu"))
    with pytest.raises(ValueError, match="supports only dropout=0.0"):
        dit_from_diffusers(_diffusers_dit(dropout=0.1))
    small = dict(input_size=8, in_channels=4, hidden=32, depth=1, num_heads=2, time_freq_shift=1)
    for kwargs, message in [
        ({"num_classes": None}, "num_classes=None"),
        ({"num_classes": 10, "cross_attention_dim": 8}, "cross_attention_dim=8"),
        ({"num_classes": 10, "mlp_ratio": 2.0}, "mlp_ratio=2.0"),
        ({"num_classes": 10, "time_freq_shift": 0}, "time_freq_shift=0"),
        ({"num_classes": 10, "time_embedding": "fourier"}, "time_embedding='fourier'"),
        ({"num_classes": 10, "per_block_embedding": True, "interval_embedding": True}, "interval_embedding=True"),
    ]:
        with pytest.raises(ValueError, match=f"cannot express {message}"):
            dit_to_diffusers(DiT(**(small | kwargs)))
