"""Autoencoders in Stable Diffusion's layout: shapes, the KL term against torch.distributions, posterior
sample and mode, generator reproducibility, float64, the config path (channels from the data), bad
construction arguments, fit_scaling, VQ indices. diffusers as the oracle: tests/test_interop_autoencoders.py."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from genlab.core.errors import ConfigError, ShapeError
from genlab.core.registry import build
from genlab.models.autoencoders import AutoencoderKL, VQAutoencoder
from genlab.models.quantizers import FSQ, VectorQuantizer
from genlab.training.experiment import item_shape, model_extra

SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=_g(seed)) * 2 - 1


def _kl(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**{**SMALL, **kw}).eval()


def _vq(**kw) -> VQAutoencoder:
    torch.manual_seed(0)
    return VQAutoencoder(**{**SMALL, "quantizer": {"type": "vq", "codebook_size": 32}, **kw}).eval()


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("widths", [(16, 32), (16, 16, 32)])
def test_shapes(size: int, widths: tuple) -> None:
    f = 2 ** (len(widths) - 1)
    x = _x(2, 3, size, size)
    kl = _kl(block_out_channels=widths)
    vq = _vq(block_out_channels=widths, latent_channels=4, embed_dim=6)
    assert (kl.downsample, vq.downsample, kl.latent_channels, vq.latent_channels) == (f, f, 4, 6)
    for model, c in ((kl, 4), (vq, 6)):
        enc = model.encode(x, _g())
        assert enc.latent.shape == (2, c, size // f, size // f)
        assert model.decode(enc.latent).shape == x.shape
        x_hat, enc = model(x, _g())
        assert x_hat.shape == x.shape and all(v.ndim == 0 for v in enc.losses.values())
    assert vq.encode(x).stats["indices"].shape == (2, size // f, size // f)
    assert set(kl.encode(x).stats) == {"mean", "logvar"} and set(kl.encode(x).losses) == {"kl"}
    gray = _kl(in_channels=1, out_channels=2, block_out_channels=widths)
    assert gray.decode(gray.encode(_x(2, 1, size, size)).latent).shape == (2, 2, size, size)


def test_kl_term_is_the_closed_form_and_logvar_is_clamped() -> None:
    model = _kl(kl_weight=0.3)
    x = _x(3, 3, 16, 16)
    enc = model.encode(x, _g())
    mean, logvar = enc.stats["mean"], enc.stats["logvar"]
    q = Normal(mean, torch.exp(0.5 * logvar))
    expected = kl_divergence(q, Normal(torch.zeros_like(mean), torch.ones_like(mean))).flatten(1).sum(1).mean()
    torch.testing.assert_close(enc.losses["kl"], 0.3 * expected, rtol=1e-5, atol=0)
    with torch.no_grad():  # push every logvar far above 20 and below -30
        model.quant_conv.bias[4:].fill_(1e3)
        assert float(model.encode(x).stats["logvar"].min()) == 20.0
        model.quant_conv.bias[4:].fill_(-1e3)
        assert float(model.encode(x).stats["logvar"].max()) == -30.0


def test_sample_and_mode() -> None:
    model, x = _kl(), _x(2, 3, 16, 16)
    mode = model.encode(x, sample=False)
    torch.testing.assert_close(mode.latent, mode.stats["mean"], rtol=0, atol=0)
    enc = model.encode(x, _g(5))
    eps = torch.randn(enc.latent.shape, generator=_g(5))
    expected = enc.stats["mean"] + torch.exp(0.5 * enc.stats["logvar"]) * eps
    torch.testing.assert_close(enc.latent, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.encode(x, _g(5)).latent, enc.latent, rtol=0, atol=0)
    assert not torch.equal(model.encode(x, _g(6)).latent, enc.latent)
    x_hat, _ = model(x, _g(5))
    torch.testing.assert_close(x_hat, model.decode(enc.latent), rtol=0, atol=0)


def test_float64_and_the_decoders_last_layer() -> None:
    for model in (_kl().double(), _vq().double()):
        x_hat, enc = model(_x(2, 3, 16, 16).double(), _g())
        assert x_hat.dtype == enc.latent.dtype == torch.float64 and bool(x_hat.isfinite().all())
    model = _kl().train()
    x_hat, enc = model(_x(2, 3, 16, 16), _g())
    (x_hat.square().mean() + sum(enc.losses.values())).backward()
    assert model.last_layer() is model.decoder.conv_out.weight and model.last_layer().grad is not None


def test_checkpointing_gives_the_same_values_and_gradients() -> None:
    plain, ckpt = _kl(), _kl(gradient_checkpointing=True)
    x, calls = _x(2, 3, 16, 16), []
    for m in (plain, ckpt):
        block = m.decoder.up[0].blocks[0]
        hook = block.register_forward_pre_hook(lambda *_, m=m: calls.append(m is ckpt))
        x_hat, enc = m.train()(x, _g())
        (x_hat.square().mean() + enc.losses["kl"]).backward()
        hook.remove()
    assert calls == [False, True, True]  # checkpointed blocks run again in the backward pass
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_vq_latents_are_the_codes_of_their_indices() -> None:
    model, x = _vq(), _x(2, 3, 16, 16)
    with torch.no_grad():  # with autograd the latent is straight-through: h + (q - h), q to rounding
        enc = model.encode(x)
    torch.testing.assert_close(model.quantizer.codes(enc.stats["indices"]), enc.latent, rtol=0, atol=0)
    torch.testing.assert_close(model.decode_indices(enc.stats["indices"]), model.decode(enc.latent), rtol=0, atol=0)
    assert set(enc.losses) == {"commitment"}
    fsq = VQAutoencoder(**SMALL, latent_channels=3, quantizer=FSQ(levels=[5, 5, 5]))
    assert fsq.encode(x).stats["indices"].max() < 125
    rvq = VQAutoencoder(**SMALL, embed_dim=4, quantizer={"type": "residual", "num_quantizers": 2,
                                                        "quantizer": {"type": "vq", "dim": 2, "codebook_size": 8}})
    assert rvq.quantizer.dim == 4 and rvq.quantizer.projected  # the stages' dim 2, projected from embed_dim
    enc = rvq.encode(x)
    assert enc.stats["indices"].shape == (2, 8, 8, 2) and rvq.decode_indices(enc.stats["indices"]).shape == x.shape


def test_the_config_path_takes_the_images_channels_from_the_data() -> None:
    config = {"data": {"type": "digits", "image_size": 16},
              "model": {"type": "autoencoder_vq", "quantizer": {"type": "vq", "codebook_size": 64, "beta": 0.5},
                        "block_out_channels": [16, 32], "norm_groups": 8, "layers_per_block": 1}}
    data = build("dataset", config["data"])
    extra = model_extra(config, item_shape(data))
    assert extra == {"in_channels": 1}
    model = build("model", config["model"], path="model", **extra)
    assert isinstance(model.quantizer, VectorQuantizer) and model.quantizer.dim == 3 and model.quantizer.beta == 0.5
    assert model.encoder.conv_in.in_channels == 1 and model.decoder.conv_out.out_channels == 1
    kl = build("model", {"type": "autoencoder_kl", **{k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in SMALL.items()}}, in_channels=1)
    assert kl(torch.zeros(1, 1, 16, 16))[0].shape == (1, 1, 16, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_out_channels=[]), "block_out_channels"),
    (dict(block_out_channels=(16, 0)), "block_out_channels"),
    (dict(block_out_channels=(16, 20)), "norm_groups"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(kl_weight=-1.0), "kl_weight"),
])
def test_bad_kl_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(**{**SMALL, **kwargs})


def test_bad_vq_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="embed_dim = 3"):
        VQAutoencoder(**SMALL, quantizer=VectorQuantizer(dim=4, codebook_size=8))
    with pytest.raises(ValueError, match="channel_last"):
        VQAutoencoder(**SMALL, quantizer=VectorQuantizer(dim=3, codebook_size=8, channel_last=True))
    with pytest.raises(ConfigError, match="model.quantizer.type: unknown quantizer 'vqq'"):
        VQAutoencoder(**SMALL, quantizer={"type": "vqq", "codebook_size": 8})
    with pytest.raises(ConfigError, match="codebook_size"):
        VQAutoencoder(**SMALL, quantizer={"type": "vq"})
    with pytest.raises(TypeError, match="quantizer"):
        VQAutoencoder(**SMALL, quantizer=torch.nn.Linear(3, 3))
    model = _vq()
    with pytest.raises(ShapeError, match="multiples of 2"):
        model.encode(_x(1, 3, 15, 16))
    with pytest.raises(ShapeError, match=r"\[B, 3, H, W\]"):
        model.encode(_x(1, 1, 16, 16))
    with pytest.raises(ShapeError, match=r"z: \[B, 3, h, w\]"):
        model.decode(_x(1, 4, 8, 8))


@pytest.mark.parametrize("shift", [False, True])
def test_fit_scaling_gives_unit_std_latents(shift: bool) -> None:
    model, x = _kl(), _x(8, 3, 16, 16)
    model.fit_scaling(x, _g(3), shift=shift)
    z = model.to_latent(x, _g(3)).detach().double()
    assert abs(float(z.pow(2).mean().sqrt() if not shift else z.std(unbiased=False)) - 1) < 1e-5
    if shift:
        assert abs(float(z.mean())) < 1e-6
    torch.testing.assert_close(model.from_latent(model.to_latent(x, sample=False)),
                               model.decode(model.encode(x, sample=False).latent), rtol=1e-5, atol=1e-5)
    vq = _vq()
    vq.fit_scaling(x)
    assert abs(float(vq.to_latent(x).detach().double().pow(2).mean().sqrt()) - 1) < 1e-5


def test_both_run_on_the_meta_device_with_draws_on_the_generators_device() -> None:
    from genlab.testing.devices import DeviceAudit, generator_on

    x = torch.empty(2, 3, 16, 16, device="meta")
    for model in (_kl().to("meta"), _vq(quantizer={"type": "fsq", "levels": [5, 5, 5]}).to("meta")):
        with DeviceAudit():
            x_hat, enc = model(x, generator_on("meta"))
        assert x_hat.device.type == enc.latent.device.type == "meta" and x_hat.shape == x.shape
