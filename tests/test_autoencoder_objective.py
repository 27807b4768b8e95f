"""The autoencoder objective: VQGAN's adaptive weight against its formula by hand, the GAN losses against
closed forms, disc_start, which optimizer's loss reaches which module, the commitment loss reaching the
encoder only, the metrics, the PatchGAN discriminator's layout, and a short run through the Trainer
(two optimizers, the latent scaling factor in the checkpoint, exact resume)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from genlab.core.checkpoint import load_weights
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.models.autoencoders import AutoencoderKL, VQAutoencoder
from genlab.models.autoencoders.discriminator import NLayerDiscriminator
from genlab.models.autoencoders.kl import gaussian_kl
from genlab.models.autoencoders.perceptual import LPIPS
from genlab.objectives import BuildContext
from genlab.objectives.autoencoder import (AutoencoderObjective, adaptive_weight, code_statistics,
                                           discriminator_loss, generator_loss)
from genlab.training import Experiment, Trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(in_channels=1, block_out_channels=(8, 8), layers_per_block=1, norm_groups=4, mid_attention=False)
DISC = {"type": "patchgan", "ndf": 8, "n_layers": 2}


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _objective(model: nn.Module, **kw) -> AutoencoderObjective:
    torch.manual_seed(0)
    obj = AutoencoderObjective(**kw)
    obj.build(BuildContext(model=model, data_shape=(1, 16, 16)))
    model.train()
    for m in obj.modules().values():
        m.train()
    return obj


def _kl() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**SMALL, kl_weight=1e-3)


def _vq(**quantizer) -> VQAutoencoder:
    torch.manual_seed(0)
    return VQAutoencoder(**SMALL, latent_channels=4, quantizer={"type": "vq", "codebook_size": 16, **quantizer})


# ---- the formulas ----------------------------------------------------------------------------------------

def test_adaptive_weight_is_eq7_in_closed_form() -> None:
    """rec = <W, a>, gan = <W, b>^2 / 2: grad rec = a, grad gan = <W, b> b, so lambda = |a| / (|<W, b>| |b| + 1e-4)."""
    g = _g(3)
    w = nn.Parameter(torch.randn(3, 4, generator=g))
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    rec, gan = (w * a).sum(), 0.5 * (w * b).sum().square()
    lam = adaptive_weight(rec, gan, w)
    want = a.norm() / ((w * b).sum().abs() * b.norm() + 1e-4)
    torch.testing.assert_close(lam, want.detach())
    assert not lam.requires_grad
    assert adaptive_weight((w * a).sum() * 1e9, 0.5 * (w * b).sum().square() * 1e-9, w).item() == 1e4  # clamped


def test_gan_losses_against_closed_forms() -> None:
    real, fake = torch.tensor([-2.0, 0.5, 1.5]), torch.tensor([-1.5, 0.2, 3.0])
    hinge = 0.5 * (sum(max(0.0, 1 - r) for r in real.tolist()) / 3 + sum(max(0.0, 1 + f) for f in fake.tolist()) / 3)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    vanilla = 0.5 * (sum(-math.log(sig(r)) for r in real.tolist()) / 3
                     + sum(-math.log(1 - sig(f)) for f in fake.tolist()) / 3)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(hinge, rel=1e-6)
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(vanilla, rel=1e-6)
    assert generator_loss(fake, "hinge").item() == pytest.approx(-sum(fake.tolist()) / 3, rel=1e-6)
    assert generator_loss(fake, "vanilla").item() == pytest.approx(
        sum(-math.log(sig(f)) for f in fake.tolist()) / 3, rel=1e-6)


def test_code_statistics_closed_form() -> None:
    usage, perplexity = code_statistics(torch.tensor([[0, 0], [1, 2]]), 8)  # p = 1/2, 1/4, 1/4
    assert usage == 3 / 8
    assert perplexity == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25))))


# ---- the model's loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_model_loss_is_reconstruction_regularisation_and_adaptively_weighted_gan(kind: str) -> None:
    model = _kl()
    obj = _objective(model, discriminator=DISC, disc_weight=0.7, disc_loss=kind)
    obj.at_step(0, 10)
    mods, x = obj.modules(), _x()
    loss = obj.loss(mods, {"x": x}, _g())
    loss.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    assert all(p.grad is None for p in mods["discriminator"].parameters())  # the model's loss trains the model only

    model.zero_grad()
    x_hat, enc = model(x, _g())  # the same posterior draw
    rec = (x_hat - x).abs().mean()
    logits = mods["discriminator"](x_hat)
    gan = -logits.mean() if kind == "hinge" else -torch.nn.functional.logsigmoid(logits).mean()
    d_rec, = torch.autograd.grad(rec, model.last_layer(), retain_graph=True)
    d_gan, = torch.autograd.grad(gan, model.last_layer(), retain_graph=True)
    lam = (torch.linalg.vector_norm(d_rec) / (torch.linalg.vector_norm(d_gan) + 1e-4)).item()
    want = rec + enc.losses["kl"] + 0.7 * lam * gan  # lambda a constant: no gradient through it
    torch.testing.assert_close(loss, want)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    for got, w in zip(got_grads, want_grads):
        torch.testing.assert_close(got, w)


def test_perceptual_term_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}  # random weights,
    save_file(state, str(tmp_path / "lpips.safetensors"))  # lin weights >= 0 as LPIPS's: the term's plumbing
    model = _kl()
    obj = _objective(model, perceptual_weights=str(tmp_path / "lpips.safetensors"), perceptual_weight=0.3)
    assert obj.frozen == ("perceptual",) and set(obj.optimizers()) == {"model"}
    x = _x()
    loss = obj.loss(obj.modules(), {"x": x}, _g())
    x_hat, enc = model(x, _g())
    lpips = obj.modules()["perceptual"](x_hat, x)
    assert lpips.shape == (4,) and (lpips > 0).all()
    torch.testing.assert_close(loss, (x_hat - x).abs().mean() + 0.3 * lpips.mean() + enc.losses["kl"])


def test_disc_start_is_respected() -> None:
    model = _kl()
    obj = _objective(model, discriminator=DISC, disc_start=5, reconstruction="l2")
    mods, x, disc = obj.modules(), _x(), obj.modules()["discriminator"]
    obj.at_step(4, 10)
    assert obj.schedule(4) == ("model",)
    loss = obj.loss(mods, {"x": x}, _g())
    x_hat, enc = model(x, _g())
    torch.testing.assert_close(loss, (x_hat - x).square().mean() + enc.losses["kl"])  # no GAN term
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.num_batches_tracked.item() == 0 for m in bn)  # the discriminator was not even called
    obj.at_step(5, 10)
    assert obj.schedule(5) == ("model", "discriminator")
    assert not torch.allclose(obj.loss(mods, {"x": x}, _g()), loss)


def test_discriminator_loss_trains_the_discriminator_only_and_leaves_the_codebook() -> None:
    model = _vq()
    obj = _objective(model, discriminator=DISC)
    obj.at_step(0, 10)
    mods, x = obj.modules(), _x(8)
    obj.loss(mods, {"x": x}, _g())  # a training forward: initialises and updates the EMA codebook
    model.zero_grad()
    codebook = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    loss = obj.loss(mods, {"x": x}, _g(), "discriminator")
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in mods["discriminator"].parameters())
    assert model.training  # put back in training mode
    for k, v in model.quantizer.state_dict().items():  # not updated a second time by the discriminator's pass
        torch.testing.assert_close(v, codebook[k], rtol=0, atol=0)


def test_commitment_loss_reaches_the_vq_encoder_only() -> None:
    """The quantizer's part is tests/test_quantizers.py's; here the autoencoder's: the commitment term's gradient
    reaches the encoder and quant_conv, not the decoder, post_quant_conv or the codebook; the codebook term
    reaches the codebook only."""
    model = _vq(learning="gradient").train()
    enc = model.encode(_x())
    named = dict(model.named_parameters())
    for term, reaches in (("commitment", ("encoder.", "quant_conv.")), ("codebook", ("quantizer.codebook",))):
        grads = torch.autograd.grad(enc.losses[term], list(named.values()), retain_graph=True, allow_unused=True)
        for (name, _), grad in zip(named.items(), grads):
            if name.startswith(reaches):
                assert grad is not None and grad.abs().sum() > 0, (term, name)
            else:
                assert grad is None or grad.abs().sum() == 0, (term, name)


# ---- metrics ---------------------------------------------------------------------------------------------

def test_metrics_by_hand() -> None:
    x = _x(6)
    kl, vq = _kl().eval(), _vq().eval()
    obj = _objective(kl)
    m = obj.metrics({"model": kl.eval()}, x, torch.zeros(6), _g())
    x_hat = kl.decode(kl.encode(x, sample=False).latent)
    mse = ((x_hat.clamp(-1, 1) - x) / 2).square().mean().item()
    assert m["reconstruction_mse"] == pytest.approx(mse, rel=1e-5)
    assert m["reconstruction_psnr"] == pytest.approx(-10 * math.log10(mse), rel=1e-5)
    mean, logvar = kl.posterior(x)
    assert m["kl_per_image"] == pytest.approx(gaussian_kl(mean, logvar).mean().item(), rel=1e-5)
    obj = _objective(vq)
    m = obj.metrics({"model": vq.eval()}, x, torch.zeros(6), _g())
    indices = vq.encode(x).stats["indices"]
    assert m["codebook_usage"] == indices.unique().numel() / 16
    pictures, rows, _ = obj.pictures({"model": vq}, x, torch.zeros(6), _g())
    assert rows == 2 and pictures.shape == (12, 1, 16, 16)


# ---- discriminator ---------------------------------------------------------------------------------------

def test_patchgan_layout() -> None:
    """pix2pix's 70x70 PatchGAN (n_layers 3, ndf 64, BatchNorm): 2,765,633 parameters, 30x30 logits for 256x256."""
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, 3)
    assert sum(p.numel() for p in d.parameters()) == 3136 + 131072 + 256 + 524288 + 512 + 2097152 + 1024 + 8193
    assert d.output_size(256) == 30 and d.output_size(32) == 2 and d.output_size(16) == 0
    assert d(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 2, 2)
    convs = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(convs.std().item() - 0.02) < 1e-3 and abs(convs.mean().item()) < 1e-3  # N(0, 0.02)
    for norm in ("actnorm", "group"):
        assert NLayerDiscriminator(1, 8, 2, norm=norm)(torch.randn(2, 1, 16, 16)).shape == (2, 1, 2, 2)


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="leave it no output patches; lower discriminator.n_layers"):
        _objective(_kl(), discriminator={"type": "patchgan", "n_layers": 3})
    with pytest.raises(ValueError, match="trains an Autoencoder"):
        AutoencoderObjective().build(BuildContext(model=nn.Linear(2, 2), data_shape=(1, 16, 16)))
    with pytest.raises(ConfigError, match="objective.disc_loss"):
        _experiment("objective.disc_loss=wgan")

    class Tensors(torch.utils.data.Dataset):  # a map-style data set without images(indices)
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(1, 16, 16)

    with pytest.raises(ValueError, match="images\\(indices\\), which Tensors lacks.*or set scaling_images: 0"):
        AutoencoderObjective().build(BuildContext(model=_kl(), data_shape=(1, 16, 16), data=Tensors()))
    AutoencoderObjective(scaling_images=0).build(BuildContext(model=_kl(), data_shape=(1, 16, 16), data=Tensors()))


# ---- through the Trainer ---------------------------------------------------------------------------------

TINY = ["data.image_size=16", "model.block_out_channels=[8,8]", "model.norm_groups=4", "train.batch_size=8",
        "train.steps=4", "train.checkpoint_every=2", "train.warmup_steps=1", "train.log_every=1",
        "objective.scaling_images=64", f"objective.discriminator={json.dumps(DISC)}", "objective.disc_start=2"]


def _experiment(*overrides: str) -> Experiment:
    return Experiment.from_config(load_config(ROOT / "configs/autoencoders/vae_digits.yaml", [*TINY, *overrides]))


def test_run_two_optimizers_scaling_in_checkpoint_report_and_exact_resume(tmp_path: Path, capsys) -> None:
    from genlab.cli import main

    initial = _experiment().objective.discriminator.state_dict()  # the run's initial weights: from its seed
    assert main(["train", str(ROOT / "configs/autoencoders/vae_digits.yaml"), *TINY, "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    banner = next(line for line in out.splitlines() if line.startswith("training "))
    assert " on " not in banner  # an autoencoder trains on no noise process (the config's default VP is unused)
    for line in ("picture: ", "held-out reconstruction MSE (pixels in [0, 1]): ", "KL(q(z|x) || N(0, I)) per held-out "
                 "image: ", "latent scaling factor: "):
        assert line in out
    metrics = json.loads((tmp_path / "run" / "samples.json").read_text())
    ckpts = tmp_path / "run" / "checkpoints"
    before = load_weights(ckpts / "step_0000002" / "discriminator.safetensors")
    after = load_weights(ckpts / "step_0000004" / "discriminator.safetensors")
    for k, v in initial.items():  # no discriminator step before disc_start; steps after it
        torch.testing.assert_close(before[k], v, rtol=0, atol=0)
    assert any(not torch.equal(after[k], v) for k, v in initial.items() if v.is_floating_point())
    ema = load_weights(ckpts / "step_0000004" / "ema.safetensors")
    assert ema["scaling_factor"].item() == pytest.approx(metrics["scaling_factor"]) and metrics["scaling_factor"] != 1
    assert {"reconstruction_mse", "kl_per_image", "image"} <= metrics.keys()
    assert (tmp_path / "run" / "samples.png").exists()

    shutil.copytree(tmp_path / "run", tmp_path / "resumed")  # as if killed after the step-2 checkpoint
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000004")
    with Trainer(_experiment(), tmp_path / "resumed", progress=False, resume=True) as tr:
        tr.fit()
    for name in ("model", "ema", "discriminator"):
        a = load_weights(ckpts / "step_0000004" / f"{name}.safetensors")
        b = load_weights(tmp_path / "resumed" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
