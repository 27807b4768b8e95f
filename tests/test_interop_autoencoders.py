"""diffusers' AutoencoderKL and VQModel as oracles: small random models saved and loaded as a user has them,
converted to genlab and back; posterior, latents, indices, decoder, forward and losses equal to 1e-5."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVQ  # noqa: E402

from genlab.interop.diffusers import from_diffusers, to_diffusers  # noqa: E402
from genlab.models.autoencoders import AutoencoderKL, VQAutoencoder  # noqa: E402
from genlab.models.quantizers import FSQ, VectorQuantizer  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
THREE = dict(block_out_channels=(8, 16, 16), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _saved(cls: type, tmp_path, **config):
    """A diffusers model with random weights (a spread-out codebook for a VQModel), saved and loaded back."""
    torch.manual_seed(0)
    model = cls(**{**SMALL, **config})
    if cls is diffusers.VQModel:
        with torch.no_grad():
            model.quantize.embedding.weight.normal_()
    model.save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path).eval()


def _x(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(2, channels, size, size, generator=_g(1)) * 2 - 1


def _config(model) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("config", [
    {},
    {"use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False},
    {"in_channels": 1, "out_channels": 2, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
     "force_upcast": False},
    THREE,
], ids=["sd", "no_convs_no_mid_attention", "flux_like", "three_levels"])
def test_autoencoder_kl_both_ways(tmp_path, config: dict) -> None:
    peer = _saved(diffusers.AutoencoderKL, tmp_path, **config)
    ours = from_diffusers(tmp_path).eval()
    assert isinstance(ours, AutoencoderKL)
    assert float(ours.scaling_factor) == pytest.approx(peer.config.scaling_factor)
    assert float(ours.shift_factor) == pytest.approx(peer.config.shift_factor or 0.0)
    x = _x(peer.config.in_channels)
    back = to_diffusers(ours).eval()
    with torch.no_grad():
        posterior = peer.encode(x).latent_dist
        enc = ours.encode(x, _g(5))
        torch.testing.assert_close(enc.stats["mean"], posterior.mean, **TOL)
        torch.testing.assert_close(enc.stats["logvar"], posterior.logvar, **TOL)
        torch.testing.assert_close(enc.latent, posterior.sample(_g(5)), **TOL)
        torch.testing.assert_close(ours.encode(x, sample=False).latent, posterior.mode(), **TOL)
        ours.kl_weight = 1.0
        torch.testing.assert_close(ours.encode(x).losses["kl"], posterior.kl().mean(), rtol=1e-5, atol=0)
        z = torch.randn(enc.latent.shape, generator=_g(2))
        torch.testing.assert_close(ours.decode(z), peer.decode(z).sample, **TOL)
        torch.testing.assert_close(ours(x, _g(3))[0], peer(x, sample_posterior=True, generator=_g(3)).sample, **TOL)
        torch.testing.assert_close(back(x, sample_posterior=True, generator=_g(3)).sample,
                                   peer(x, sample_posterior=True, generator=_g(3)).sample, **TOL)
    assert _config(back) == _config(peer)
    _same_state(back, peer)
    _same_state(from_diffusers(back), ours)


@pytest.mark.parametrize("config", [
    {},
    {"vq_embed_dim": 6, "num_vq_embeddings": 32, "latent_channels": 4, "scaling_factor": 0.5,
     "lookup_from_codebook": True},
    {**THREE, "mid_block_add_attention": False, "in_channels": 1, "out_channels": 1},
], ids=["default", "embed_dim", "three_levels"])
def test_vq_model_both_ways(tmp_path, config: dict) -> None:
    peer = _saved(diffusers.VQModel, tmp_path, **config)
    ours = from_diffusers(tmp_path).eval()
    assert isinstance(ours, VQAutoencoder) and isinstance(ours.quantizer, VectorQuantizer)
    x = _x(peer.config.in_channels)
    back = to_diffusers(ours).eval()
    with torch.no_grad():
        h = peer.encode(x).latents
        z_q, legacy_loss, (_, _, indices) = peer.quantize(h)
        enc = ours.encode(x)
        torch.testing.assert_close(ours.features(x), h, **TOL)
        torch.testing.assert_close(enc.latent, z_q, **TOL)
        assert torch.equal(enc.stats["indices"].flatten(), indices.flatten())
        assert len(indices.unique()) > 1  # a real test of the nearest-code search
        torch.testing.assert_close(ours.decode(enc.latent), peer.decode(h).sample, **TOL)
        if peer.config.lookup_from_codebook:  # diffusers' decode from indices is genlab's decode_indices
            b, e, hh, ww = z_q.shape
            torch.testing.assert_close(ours.decode_indices(enc.stats["indices"]), peer.decode(
                indices.flatten(), force_not_quantize=True, shape=(b, hh, ww, e)).sample, **TOL)
        else:
            torch.testing.assert_close(ours.decode(z_q), peer.decode(z_q, force_not_quantize=True).sample, **TOL)
        torch.testing.assert_close(ours(x)[0], peer(x).sample, **TOL)
        torch.testing.assert_close(back(x).sample, peer(x).sample, **TOL)
        torch.testing.assert_close(sum(enc.losses.values()), legacy_loss, rtol=1e-5, atol=0)  # equal in value
    # in gradient, genlab's beta weighs the commitment term: diffusers' VectorQuantizer(legacy=False)
    fixed = DiffusersVQ(peer.config.num_vq_embeddings, h.shape[1], beta=0.25, legacy=False)
    fixed.embedding.load_state_dict(peer.quantize.embedding.state_dict())
    grads = {}
    for name, fn, codebook in (("ours", lambda v: sum(ours.quantizer(v).losses.values()), ours.quantizer.codebook),
                               ("fixed", lambda v: fixed(v)[1], fixed.embedding.weight),
                               ("legacy", lambda v: peer.quantize(v)[1], peer.quantize.embedding.weight)):
        v = h.clone().requires_grad_(True)
        grads[name] = torch.autograd.grad(fn(v), (v, codebook))
    for ours_grad, fixed_grad, legacy_grad in zip(grads["ours"], grads["fixed"], grads["legacy"]):
        torch.testing.assert_close(ours_grad, fixed_grad, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(ours_grad, legacy_grad, rtol=1e-2, atol=0)
    assert _config(back) == _config(peer)
    _same_state(back, peer)
    _same_state(from_diffusers(back), ours)


@pytest.mark.parametrize("cls, config, match", [
    ("AutoencoderKL", {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ("AutoencoderKL", {"act_fn": "relu"}, "act_fn='relu'"),
    ("VQModel", {"norm_type": "spatial", "block_out_channels": (32, 32), "norm_num_groups": 32},
     "norm_type='spatial'"),
    ("AutoencoderKL", {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)},
     "down_block_types"),
])
def test_what_cannot_convert_is_refused_by_name(tmp_path, cls: str, config: dict, match: str) -> None:
    torch.manual_seed(0)
    peer = getattr(diffusers, cls)(**{**SMALL, **config})
    with pytest.raises(ValueError, match=match):
        from_diffusers(peer)


def test_quantizers_diffusers_cannot_express_are_refused() -> None:
    small = dict(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8)
    with pytest.raises(ValueError, match="cosine"):
        to_diffusers(VQAutoencoder(**small, quantizer={"type": "vq", "codebook_size": 8, "distance": "cosine"}))
    with pytest.raises(ValueError, match="projection"):
        to_diffusers(VQAutoencoder(**small, quantizer={"type": "vq", "codebook_size": 8, "codebook_dim": 2}))
    with pytest.raises(ValueError, match="FSQ"):
        to_diffusers(VQAutoencoder(**small, quantizer=FSQ(levels=[5, 5, 5])))
    ema = VQAutoencoder(**small, quantizer={"type": "vq", "codebook_size": 8})  # EMA codebook: a buffer, exported
    torch.testing.assert_close(to_diffusers(ema).quantize.embedding.weight, ema.quantizer.codebook, rtol=0, atol=0)
