"""The autoencoder objective: reconstruction, the autoencoder's own regularisation (a KL term, a quantizer's
commitment / codebook / entropy terms), an optional LPIPS perceptual loss and a PatchGAN adversarial loss
with VQGAN's adaptive weight (Esser et al. 2021, Sec. 3.1; latent diffusion's ``LPIPSWithDiscriminator`` and
``VQLPIPSWithDiscriminator``, Rombach et al. 2022, Appendix G).

Two optimizers (the Trainer's multi-optimizer support): ``model`` (the autoencoder) every step, and
``discriminator`` from step ``disc_start`` on, after ``model`` in the same step (:meth:`schedule`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..core.bounds import NonNegativeFloat, NonNegativeInt, PositiveInt
from ..core.devices import module_device
from ..core.registry import build, register
from ..models.autoencoders.base import Autoencoder
from ..models.autoencoders.kl import gaussian_kl
from ..models.autoencoders.discriminator import Discriminator  # (and registers patchgan)
from ..models.autoencoders.perceptual import LPIPS
from .base import Batch, BuildContext, Objective

DELTA = 1e-4  # Eq. 7's delta
MAX_WEIGHT = 1e4  # taming's clamp of the adaptive weight


def bare(module: nn.Module) -> nn.Module:
    """``module`` without a DDP wrapper (``.module``) or torch.compile's (``._orig_mod``)."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7), detached:
    ``lambda = ||grad_GL[L_rec]|| / (||grad_GL[L_GAN]|| + 1e-4)``, clamped to [0, 1e4], where GL is the
    decoder's last layer; both losses keep their graphs."""
    g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + DELTA)).clamp(0.0, MAX_WEIGHT).detach()


def discriminator_loss(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    """The discriminator's loss on logits of real and reconstructed images (taming's ``hinge_d_loss`` /
    ``vanilla_d_loss``): hinge ``(E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) / 2`` (Lim & Ye 2017), or
    vanilla ``(E[softplus(-D(x))] + E[softplus(D(x_hat))]) / 2`` (the cross-entropy of Goodfellow et al. 2014)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(fake: Tensor, kind: str) -> Tensor:
    """The autoencoder's adversarial loss on logits of its reconstructions: hinge ``-E[D(x_hat)]`` (taming's
    generator loss), vanilla the non-saturating ``E[softplus(-D(x_hat))] = -E[log sigmoid(D(x_hat))]``
    (Goodfellow et al. 2014, Sec. 3)."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def code_statistics(indices: Tensor, codebook_size: int) -> tuple[float, float]:
    """``(usage, perplexity)`` of code indices ``[...]`` in ``[0, codebook_size)``: the fraction of the codes
    used at least once, and exp of the entropy (nats) of the codes' empirical frequencies."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    return (counts > 0).double().mean().item(), entropy.exp().item()


@register("objective", "autoencoder")
class AutoencoderObjective(Objective):
    """Trains an :class:`~genlab.models.autoencoders.Autoencoder` (``model: autoencoder_kl`` or ``autoencoder_vq``):

        L_model = L_rec + sum(Encoded.losses) + [k >= disc_start] disc_weight lambda L_G
        L_rec   = |x - x_hat| (l1) or (x - x_hat)^2 (l2), mean over pixels, + perceptual_weight LPIPS(x, x_hat)
        L_disc  = hinge or vanilla loss of D on x and x_hat (from step disc_start)

    with lambda VQGAN's adaptive weight (Eq. 7, :func:`adaptive_weight`; 1 with ``adaptive_weight: false``).
    ``Encoded.losses`` are the autoencoder's weighted terms (its ``kl_weight``, its quantizer's ``beta``).

    Args:
        reconstruction: ``l1`` (taming, latent diffusion) or ``l2``.
        perceptual_weights: a local LPIPS weights file (:meth:`LPIPS.from_file`; ``scripts/lpips_weights.py``
            writes one); None: no perceptual term.
        perceptual_weight: the LPIPS term's weight.
        discriminator: a ``discriminator`` config (``patchgan``, with ``ndf``, ``n_layers``, ``norm``; its
            ``in_channels`` are the data's); None: no adversarial term and no discriminator optimizer.
        disc_start: the step k from which the discriminator trains and the adversarial term is on.
        disc_weight: the adversarial term's weight (taming's ``disc_weight``).
        disc_loss: ``hinge`` or ``vanilla`` (:func:`discriminator_loss`, :func:`generator_loss`).
        adaptive_weight: scale the adversarial term by Eq. 7's lambda.
        shown: held-out images drawn with their reconstructions in the evaluation's picture.
        scaling_images: training images :meth:`finish` fits the latent scaling factor on
            (:meth:`Autoencoder.fit_scaling`), at the end of training; 0: not fitted.
        scaling_shift: also fit ``shift_factor`` (the latents' mean; SD3's and FLUX's autoencoders).

    GAN settings as in latent diffusion's KL-f configs: ``discriminator: {type: patchgan, n_layers: 3}``,
    ``disc_weight: 0.5``, ``disc_start`` late in training (the discriminator's AdamW shares the run's lr and
    betas: the Trainer has one optimizer setting for all; taming's and latent diffusion's 0.5, 0.9 are
    ``train.adam_beta1: 0.5``, ``train.adam_beta2: 0.9``).

    It draws no samples; the evaluation reports :meth:`metrics` on the held-out split and a picture of
    originals over reconstructions (:meth:`pictures`).
    """

    uses_process = False
    draws_samples = False

    def __init__(self, reconstruction: Literal["l1", "l2"] = "l1", perceptual_weights: str | None = None,
                 perceptual_weight: NonNegativeFloat = 1.0, discriminator: str | dict | None = None,
                 disc_start: NonNegativeInt = 0, disc_weight: NonNegativeFloat = 0.5,
                 disc_loss: Literal["hinge", "vanilla"] = "hinge", adaptive_weight: bool = True,
                 shown: PositiveInt = 16, scaling_images: NonNegativeInt = 512,
                 scaling_shift: bool = False) -> None:
        for name, value, allowed in (("reconstruction", reconstruction, ("l1", "l2")),
                                     ("disc_loss", disc_loss, ("hinge", "vanilla"))):
            if value not in allowed:
                raise ValueError(f"autoencoder: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        self.reconstruction, self.perceptual_weight = reconstruction, perceptual_weight
        self.perceptual = None if perceptual_weights is None else LPIPS.from_file(perceptual_weights)
        self.discriminator_config = discriminator
        self.discriminator: Discriminator | None = None  # built in build()
        self.disc_start, self.disc_weight, self.disc_loss = disc_start, disc_weight, disc_loss
        self.adaptive, self.shown = adaptive_weight, shown
        self.scaling_images, self.scaling_shift = scaling_images, scaling_shift
        self.frozen = ("perceptual",) if self.perceptual is not None else ()

    def build(self, context: BuildContext) -> None:
        super().build(context)
        if not isinstance(context.model, Autoencoder):
            raise ValueError(f"the autoencoder objective trains an Autoencoder (model: autoencoder_kl or "
                             f"autoencoder_vq), got {type(context.model).__name__}")
        if len(context.data_shape) != 3:
            raise ValueError(f"the autoencoder objective needs image data [C, H, W], got items of shape "
                             f"{list(context.data_shape)}")
        data = context.data
        if self.scaling_images and data is not None and not callable(getattr(data, "images", None)):
            raise ValueError(f"scaling_images: {self.scaling_images} fits the latent scaling factor at the end of "
                             f"training on images read by the data set's images(indices), which "
                             f"{type(data).__name__} lacks; use an image data set (digits, image_folder, "
                             "torchvision) or set scaling_images: 0")
        if self.discriminator_config is not None:  # built here, after the model: from the run's seed
            self.discriminator = build("discriminator", self.discriminator_config, path="objective.discriminator",
                                       in_channels=context.data_shape[0])
            size = getattr(self.discriminator, "output_size", lambda s: s)(min(context.data_shape[1:]))
            if size < 1:
                raise ValueError(f"discriminator: {min(context.data_shape[1:])}-pixel images leave it no output "
                                 "patches; lower discriminator.n_layers")

    def modules(self) -> dict[str, nn.Module]:
        extra = {"discriminator": self.discriminator, "perceptual": self.perceptual}
        return {"model": self.context.model, **{k: v for k, v in extra.items() if v is not None}}

    def optimizers(self) -> dict[str, tuple[str, ...]]:
        return {"model": ("model",), **({"discriminator": ("discriminator",)} if self.discriminator is not None else {})}

    def adversarial(self, step: int) -> bool:
        """Whether the adversarial terms are on at step ``step`` (a discriminator and k >= disc_start)."""
        return self.discriminator is not None and step >= self.disc_start

    def schedule(self, step: int) -> tuple[str, ...]:
        """``model`` every step; then ``discriminator`` from ``disc_start`` on."""
        return ("model", "discriminator") if self.adversarial(step) else ("model",)

    def reconstruction_loss(self, modules: dict[str, nn.Module], x: Tensor, x_hat: Tensor) -> Tensor:
        """L_rec: the mean l1 or l2 error, plus ``perceptual_weight`` times the batch's mean LPIPS."""
        err = x_hat - x
        loss = err.abs().mean() if self.reconstruction == "l1" else err.square().mean()
        if "perceptual" in modules:
            loss = loss + self.perceptual_weight * modules["perceptual"](x_hat, x).mean()
        return loss

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """The autoencoder's loss (``model``) or the discriminator's (``discriminator``) on ``batch["x"]``
        [B, C, H, W] in [-1, 1]; the autoencoder's posterior draws come from ``generator``."""
        x = batch["x"]
        if optimizer == "discriminator":
            model = bare(modules["model"])
            was = model.training
            with torch.no_grad():  # eval mode: a VQ codebook is not updated a second time this step
                x_hat = model.eval()(x, generator)[0]
            model.train(was)
            disc = modules["discriminator"]
            return discriminator_loss(disc(x), disc(x_hat), self.disc_loss)
        x_hat, encoded = modules["model"](x, generator)
        rec = self.reconstruction_loss(modules, x, x_hat)
        loss = rec + sum(encoded.losses.values(), x.new_zeros(()))
        if not self.adversarial(self.step) or self.disc_weight == 0:
            return loss
        disc = bare(modules["discriminator"])  # detached weights: no gradient reaches the discriminator
        params = {n: p.detach() for n, p in disc.named_parameters()}
        gan = generator_loss(functional_call(disc, params, (x_hat,)), self.disc_loss)
        weight = adaptive_weight(rec, gan, bare(modules["model"]).last_layer()) if self.adaptive else 1.0
        return loss + self.disc_weight * weight * gan

    def finish(self, modules: dict[str, nn.Module]) -> None:
        """At the end of training: fit the latent scaling factor (:meth:`Autoencoder.fit_scaling`, posterior
        draws from a generator seeded with the run's seed) on the first ``scaling_images`` training images,
        with the sampled (EMA) autoencoder, and copy it to the trained one too."""
        if not self.scaling_images:
            return
        model = modules["model"]
        device = module_device(model)
        data = self.context.data
        images = data.images(torch.arange(min(self.scaling_images, len(data))))
        g = torch.Generator(device=device).manual_seed(0)
        model.fit_scaling(images.to(device), g, shift=self.scaling_shift)
        self.context.model.scaling_factor.copy_(model.scaling_factor)
        self.context.model.shift_factor.copy_(model.shift_factor)

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        raise NotImplementedError("an autoencoder draws no samples; train a latent diffusion model on its latents")

    def sampling_steps(self) -> None:
        return None

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: Tensor, generator: torch.Generator,
                    batch_size: int = 256) -> tuple[Tensor, list]:
        """Reconstructions [N, C, H, W] of ``images`` (the posterior's mode for a KL autoencoder) and the
        ``Encoded`` of each batch."""
        outs, encoded = [], []
        for x in images.split(batch_size):
            enc = model.encode(x, generator, sample=False)
            outs.append(model.decode(enc.latent))
            encoded.append(enc)
        return torch.cat(outs), encoded

    @torch.no_grad()
    def metrics(self, modules: dict[str, nn.Module], images: Tensor, labels: Tensor,
                generator: torch.Generator) -> dict[str, float]:
        """On held-out ``images`` [N, C, H, W] in [-1, 1]: ``reconstruction_mse`` (of the reconstructions
        clamped to [-1, 1], in [0, 1] pixel units: ((x_hat - x) / 2)^2), ``reconstruction_psnr`` (dB, peak 1);
        a VQ autoencoder's ``codebook_usage`` (the fraction of codes used) and ``perplexity`` (exp of the
        codes' entropy), averaged over stages / groups of a composite quantizer; a KL autoencoder's
        ``kl_per_image`` (KL(q(z|x) || N(0, I)) in nats, summed over the latent, mean over images); and the
        latent ``scaling_factor``."""
        model = modules["model"]
        x_hat, encoded = self.reconstruct(model, images, generator)
        mse = ((x_hat.clamp(-1, 1) - images) / 2).square().mean().item()
        out = {"reconstruction_mse": mse, "reconstruction_psnr": 10 * math.log10(1 / max(mse, 1e-30))}
        stats = {k: torch.cat([e.stats[k] for e in encoded]) for k in encoded[0].stats}
        if "indices" in stats:
            out.update(self.code_metrics(model, stats["indices"]))
        if "mean" in stats and "logvar" in stats:
            out["kl_per_image"] = gaussian_kl(stats["mean"].double(), stats["logvar"].double()).mean().item()
        out["scaling_factor"] = float(bare(model).scaling_factor)
        return out

    @staticmethod
    def code_metrics(model: nn.Module, indices: Tensor) -> dict[str, float]:
        """``codebook_usage`` and ``perplexity`` of ``indices`` [N, ..., *index_shape] under the model's quantizer."""
        q = bare(model).quantizer
        parts = getattr(q, "stages", None) or getattr(q, "groups", None)
        if parts is None:
            usage, perplexity = code_statistics(indices, q.codebook_size)
        else:  # one code per stage / group: indices [..., Q]
            stats = [code_statistics(indices[..., i], p.codebook_size) for i, p in enumerate(parts)]
            usage, perplexity = (sum(s) / len(stats) for s in zip(*stats))
        return {"codebook_usage": usage, "perplexity": perplexity}

    @torch.no_grad()
    def pictures(self, modules: dict[str, nn.Module], images: Tensor, labels: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, int, str]:
        """The first ``shown`` held-out images over their reconstructions: ``([2 * shown, C, H, W], 2 rows, title)``."""
        x = images[: self.shown]
        return (torch.cat([x, self.reconstruct(modules["model"], x, generator)[0]]), 2,
                "held-out images (top) and their reconstructions (bottom)")
