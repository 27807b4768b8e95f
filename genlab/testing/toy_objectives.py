"""A small objective with two optimizers, to exercise the training spine: a GAN on vector data.

``toy_gan`` trains the config's ``model`` as a generator (``model(z, 0)``, z ~ N(0, I) of the data's
shape) against a discriminator MLP it builds itself, with the non-saturating loss (Goodfellow et al.
2014, Sec. 3) and the two optimizers stepped alternately (``discriminator`` on even steps,
``model`` on odd ones) or both every step. Importing this module registers it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.bounds import PositiveInt
from ..core.registry import register
from ..objectives.base import Batch, BuildContext, Objective


@register("objective", "toy_gan")
class ToyGAN(Objective):
    """Non-saturating GAN: D maximises log D(x) + log(1 - D(G(z))), G maximises log D(G(z))."""

    def __init__(self, hidden: PositiveInt = 32, schedule: Literal["alternate", "both"] = "alternate") -> None:
        self.hidden, self.alternate = hidden, schedule == "alternate"

    def build(self, context: BuildContext) -> None:
        super().build(context)
        dim = context.data_shape[0]
        self.discriminator = nn.Sequential(nn.Linear(dim, self.hidden), nn.SiLU(), nn.Dropout(0.1),
                                           nn.Linear(self.hidden, 1))

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.context.model, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, tuple[str, ...]]:
        return {"discriminator": ("discriminator",), "model": ("model",)}

    def schedule(self, step: int) -> tuple[str, ...]:
        if not self.alternate:
            return ("discriminator", "model")
        return ("discriminator",) if step % 2 == 0 else ("model",)

    def generate(self, generator_module: nn.Module, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        z = torch.randn((n, *self.context.data_shape), generator=generator, dtype=like.dtype, device=like.device)
        return generator_module(z, torch.zeros(n, dtype=like.dtype, device=like.device))

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        x = batch["x"]
        fake = self.generate(modules["model"], x.shape[0], generator, x)
        if optimizer == "discriminator":
            real_logits, fake_logits = modules["discriminator"](x), modules["discriminator"](fake.detach())
            return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return F.softplus(-modules["discriminator"](fake)).mean()

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None) -> Tensor:
        like = next(modules["model"].parameters())
        with torch.no_grad():
            return self.generate(modules["model"], n, generator, like)
