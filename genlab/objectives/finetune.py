"""Fine-tuning a trained diffusion run on a few new images: DreamBooth, Custom Diffusion and textual
inversion as one objective, the method chosen by what trains.

The model starts from the base run's EMA weights and trains with the base run's own denoising loss
(its prediction type, time distribution and weighting) on the instance images, optionally with a
prior-preservation term (Ruiz et al. 2023, "DreamBooth", Eq. 2):

    L = E |x_hat(alpha x + sigma eps, c) - x|^2 + lambda E |x_hat(alpha x_pr + sigma eps', c_pr) - x_pr|^2,

x_pr drawn once from the frozen base model with the class condition c_pr (DreamBooth's class
images) or real images of another data set (Custom Diffusion's regularisation, Kumari et al. 2023,
Sec. 3.2). What trains:

- DreamBooth: every weight (``trainable`` unset), usually with prior preservation;
- Custom Diffusion: the cross-attention key and value projections (``trainable: ["*attn_2.to_k*",
  "*attn_2.to_v*"]`` for genlab's UNet, ``"*cross_attn.to_[kv]*"`` for its DiT), with a new class or token;
- textual inversion (Gal et al. 2023): nothing but ``new_classes`` new rows of the backbone's class
  embedding (``trainable: []``), the instance images labelled with the first new class.

A pattern that matches no parameter is an error naming it (no silent no-op fine-tune).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..adapters.textual_inversion import NewEmbeddings
from ..core.bounds import NonNegativeFloat, NonNegativeInt, PositiveInt
from ..core.errors import did_you_mean
from ..core.registry import build, register
from ..diffusion.denoiser import Denoiser
from .base import Batch, BuildContext, Objective, Reference
from .denoising import DenoisingObjective
from .teachers import Teacher, load_teacher

LABEL_TABLE = "label_embed.embedding"  # the class embedding of genlab's UNet and DiT


def select_trainable(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Set ``requires_grad`` of ``model``'s parameters: those whose name matches one of ``patterns``
    (``fnmatch``) train, the rest are frozen; None leaves every parameter as it is. Returns the names that
    train. ValueError naming a pattern that matches no parameter."""
    names = [n for n, _ in model.named_parameters()]
    if patterns is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"finetune: trainable pattern {pattern!r} matches no parameter of "
                             f"{type(model).__name__}{did_you_mean(pattern, names)}")
    for n, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns))
    return [n for n, p in model.named_parameters() if p.requires_grad]


@register("objective", "finetune")
class FineTune(Objective):
    """See the module docstring.

    Args:
        base: the trained run (or checkpoint directory) to start from; the config's process and model
            section must be the run's.
        trainable: name patterns of the parameters that train (None: all; ``[]``: only new rows).
        new_classes: k new classes appended to the model's class embedding (ids num_classes + 1 ..
            num_classes + k, after the null class's row), started from class ``new_class_init``'s row
            (None: the mean row); they always train.
        instance_label: the label every instance image trains with: a class id, ``"new"`` (the first
            new class) or None (the data set's own labels).
        prior_weight: lambda >= 0 of the prior-preservation term (0: none).
        prior_label: c_pr, the class of the prior images drawn from the base model (None: the null class).
        prior_samples: how many prior images the base model draws (once, with a fixed seed).
        prior_data: real prior images instead (a data set config); their own labels are c_pr.
    """

    def __init__(self, base: str, trainable: list[str] | None = None, new_classes: NonNegativeInt = 0,
                 new_class_init: int | None = None, instance_label: int | Literal["new"] | None = None,
                 prior_weight: NonNegativeFloat = 0.0, prior_label: int | None = None,
                 prior_samples: PositiveInt = 256, prior_data: dict[str, Any] | None = None) -> None:
        if instance_label == "new" and not new_classes:
            raise ValueError("finetune: instance_label 'new' needs new_classes >= 1")
        self.base, self.trainable, self.new_classes, self.new_class_init = base, trainable, new_classes, new_class_init
        self.instance_label, self.prior_weight, self.prior_label = instance_label, prior_weight, prior_label
        self.prior_samples, self.prior_data = prior_samples, prior_data
        self.frozen = ("base",) if prior_weight > 0 and prior_data is None else ()
        self._prior: tuple[Tensor, Tensor] | None = None

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.teacher: Teacher = load_teacher(context, self.base, student_from_teacher=True, role="base")
        if not isinstance(self.teacher.objective, DenoisingObjective):
            raise ValueError(f"finetune: {self.base} was trained with {type(self.teacher.objective).__name__}; "
                             "fine-tuning continues a denoising (diffusion) run")
        model = context.model
        self.new_rows: NewEmbeddings | None = None
        if self.new_classes:
            if getattr(model, "label_embed", None) is None:
                raise ValueError("finetune: new_classes needs a class-conditional model (num_classes set)")
            self.new_rows = NewEmbeddings.attach(model, LABEL_TABLE, self.new_classes, self.new_class_init)
        self.trained_names = select_trainable(model, self.trainable)
        if self.new_rows is not None and not self.new_rows.new.requires_grad:  # new rows always train
            self.new_rows.new.requires_grad_(True)
            self.trained_names.append(f"{LABEL_TABLE}.new")
        if not self.trained_names:
            raise ValueError("finetune: nothing trains; name parameters in trainable or set new_classes")
        if self.prior_data is not None:
            data = build("dataset", self.prior_data, path="objective.prior_data")
            self._prior = (data.data, data.labels)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.context.model, **({"base": self.teacher.module} if self.frozen else {})}

    @property
    def label(self) -> int | None:
        """The instance images' label (see ``instance_label``)."""
        return self.new_rows.ids[0] if self.instance_label == "new" and self.new_rows else self.instance_label

    def denoiser(self, model: nn.Module, process: Any = None) -> Denoiser:
        """``model`` as the base run's Denoiser (its prediction type and preconditioning)."""
        return self.teacher.parameterisation(model, self.context.process if process is None else process)

    def prior(self, modules: dict[str, nn.Module], device: torch.device) -> tuple[Tensor, Tensor]:
        """The prior images [P, ...] and their labels [P] on ``device``: drawn from the frozen base model the
        first time (its own sampler, a fixed seed: a resumed run draws the same), or the real ``prior_data``."""
        if self._prior is None:
            generator = torch.Generator(device).manual_seed(0)
            label = -1 if self.prior_label is None else self.prior_label
            labels = torch.full((self.prior_samples,), label, dtype=torch.long, device=device)
            cond = {"class_labels": labels} if self.context.num_classes is not None else None
            with torch.no_grad():
                images = self.teacher.objective.sample({"model": modules["base"]}, self.prior_samples, generator, cond)
            self._prior = (images, labels)
        images, labels = self._prior
        return images.to(device), labels.to(device)

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        x = batch["x"]
        labels = batch.get("class_labels")
        if self.label is not None:
            labels = torch.full((len(x),), self.label, dtype=torch.long, device=x.device)
        denoiser, base_loss = self.denoiser(modules["model"]), self.teacher.objective
        loss = base_loss(denoiser, x, generator, **({} if labels is None else {"class_labels": labels}))
        if self.prior_weight > 0:
            images, prior_labels = self.prior(modules, x.device)
            pick = torch.randint(len(images), (len(x),), generator=generator, device=generator.device).to(x.device)
            cond = {"class_labels": prior_labels[pick]} if self.context.num_classes is not None else {}
            loss = loss + self.prior_weight * base_loss(denoiser, images[pick].to(x.dtype), generator, **cond)
        return loss

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples with the experiment's sampler (and guidance) from the fine-tuned model (``cond`` may
        name a new class)."""
        return self.context.sampler.sample(self.guided(self.denoiser(modules["model"])), shape=(n, *self.context.data_shape),
                                           steps=steps, generator=generator, progress=False, cond=cond)

    def references(self) -> dict[str, Reference]:
        """The base run, drawn by its own sampler, beside the fine-tuned model (only when it is held)."""
        return self.teacher.references("base") if self.frozen else {}
