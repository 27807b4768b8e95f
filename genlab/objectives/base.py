"""The objective interface: what the Trainer runs, for every model family.

An objective is built from the config's ``objective:`` section and then handed the rest of the
experiment (:meth:`Objective.build`: the model built from ``model:``, the process, the sampler, the
data's shape and classes, and a loader of pretrained runs). From then on it answers, for the Trainer:

- :meth:`~Objective.modules`: every module by name (``"model"`` first), :attr:`~Objective.frozen`
  those kept fixed (a teacher, an autoencoder) and :meth:`~Objective.ema_modules` those with an
  exponential moving average (the EMA copy is what is sampled and checkpointed as ``ema``);
- :meth:`~Objective.optimizers`: one AdamW per name, over the parameters of the modules listed, and
  :meth:`~Objective.schedule`: which optimizers step at step k (a GAN alternates, or steps both);
- :meth:`~Objective.loss`: the loss of a batch for one optimizer, every random draw from the
  generator it is handed (the Trainer seeds it with (seed, step, micro-batch, rank): exact resume);
- :meth:`~Objective.at_step`: called before every training step with the step k and the run's
  length K, so that a curriculum (consistency training's number of levels N(k) and target decay
  mu(k)) is a function of k alone: a resumed run, which restarts at its checkpoint's k, repeats it.
  :meth:`~Objective.targets` is read again at every step, after ``at_step``, so a target network's
  decay may depend on k too;
- :meth:`~Objective.sample`: how the family draws samples (from the EMA modules), in its own number of
  steps (:meth:`~Objective.sampling_steps`) or in ``steps`` (the evaluation's ``train.eval_steps``);
- :meth:`~Objective.references`: other models the evaluation reports beside this one (a teacher);
- :meth:`~Objective.guided`: the sampling denoiser wrapped by the config's ``guidance:`` (every
  family's :meth:`~Objective.sample` calls it); a family that draws no samples (a noise-conditional
  classifier, an autoencoder) sets ``draws_samples = False`` and reports :meth:`~Objective.metrics` (and
  optionally :meth:`~Objective.pictures`) instead;
- :meth:`~Objective.finish`: called once after the last step, before the final checkpoint.

A new family is a subclass::

    @register("objective", "my_loss")
    class MyLoss(Objective):
        def loss(self, modules, batch, generator, optimizer="model"):
            x = batch["x"]
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            return (modules["model"](x + noise, torch.zeros(len(x), device=x.device)) - x).square().mean()

        def sample(self, modules, n, generator, cond=None, steps=None):
            z = torch.randn((n, *self.context.data_shape), generator=generator, device=generator.device)
            return modules["model"](z, torch.zeros(n, device=z.device))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import register_namespace

Batch = dict[str, Tensor]  # "x" [B, ...] and, for labelled data, "class_labels" [B]
CONDITIONS = ("class_labels", "control", "context")  # a batch's entries that are the model's keyword conditions


def conditions(batch: Batch) -> dict[str, Tensor]:
    """The model's keyword conditions of a batch: its class labels, control images and cross-attention context
    (encoded captions), where it has them."""
    return {k: batch[k] for k in CONDITIONS if k in batch}


@dataclass
class BuildContext:
    """What an objective is built with, besides its own config section."""

    model: nn.Module  # built from the config's ``model:`` section
    process: Any = None  # the config's ``process:`` (diffusion families)
    sampler: Any = None  # the config's ``sampler:``
    data_shape: tuple[int, ...] = ()  # one item, [D] or [C, H, W]
    num_classes: int | None = None  # classes the model is conditioned on
    pretrained: Callable[[str], Any] | None = None  # a run or checkpoint directory -> its Experiment, EMA weights loaded
    new_model: Callable[[], nn.Module] | None = None  # another network from ``model:``, freshly initialised
    guidance: Any = None  # the config's ``guidance:`` (``wrap(denoiser)``), applied by :meth:`Objective.guided`
    data: Any = None  # the training data set (for what an objective reads besides batches: its control images)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reference:
    """A model the evaluation reports beside the trained one (a distillation's teacher, drawn as its
    own run draws): ``sample(modules, n, generator, cond) -> [n, *data shape]`` with the modules as the
    Trainer holds them, in ``steps`` steps of ``sampler`` (the sampler's ``repr``)."""

    sampler: str
    steps: int
    sample: Callable[[dict[str, nn.Module], int, torch.Generator, dict[str, Tensor] | None], Tensor]


class ShowsFields:
    """``repr`` as ``Name(field=value, ...)`` from the instance's attributes (couplings, paths)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Objective:
    """Base class of training objectives (see the module's docstring); one trained ``model`` with an
    EMA copy and one optimizer by default: a family overrides what differs."""

    frozen: tuple[str, ...] = ()  # names of modules that are not trained
    draws_samples: bool = True  # False: the family draws no samples (a classifier); the evaluation reports metrics()
    takes_control: bool = False  # True: the family feeds the data's control images to a module of its own (ControlNet)
    guidance_as_input: bool = False  # True: the config's guidance sets an input of the model (guided distillation)
    uses_process: bool = True  # False: the family trains without the experiment's process (flows, autoencoders)
    step: int = 0  # the training step k (0-based) of the latest at_step call
    total_steps: int = 1  # K, the run's number of steps, of the latest at_step call

    def build(self, context: BuildContext) -> None:
        """Take the experiment's parts; called once, before training, by ``Experiment``."""
        self.context = context

    def modules(self) -> dict[str, nn.Module]:
        """Every module of the family by name, trained and frozen; ``"model"`` is the one sampled."""
        return {"model": self.context.model}

    def ema_modules(self) -> tuple[str, ...]:
        """Trained modules with an EMA copy (sampled and checkpointed as ``ema``)."""
        return ("model",)

    def targets(self) -> dict[str, tuple[str, float]]:
        """Target networks: name -> (trained module, decay). The Trainer keeps each as an EMA of that
        module without warm-up, hands it to :meth:`loss` under its name, updates it after every step with
        the decay this returns at that step (after :meth:`at_step`: constant, or a schedule mu(k)) and
        checkpoints it (a consistency model's f_theta^-)."""
        return {}

    def at_step(self, step: int, total: int) -> None:
        """Called by the Trainer before training step ``step`` = k (0-based; a resumed run starts at its
        checkpoint's k) of a run of ``total`` = K steps (``train.steps``, which a resumed run may change,
        like the learning-rate schedule). Default: keeps them as :attr:`step` and :attr:`total_steps`, what
        :meth:`loss` and :meth:`targets` of a family with a curriculum read."""
        self.step, self.total_steps = step, total

    def optimizers(self) -> dict[str, tuple[str, ...]]:
        """Optimizer name -> the trained modules whose parameters it updates."""
        return {"model": ("model",)}

    def schedule(self, step: int) -> tuple[str, ...]:
        """The optimizers that step at ``step`` (0-based), in order; default: all of them, every step."""
        return tuple(self.optimizers())

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor | tuple[Tensor, dict[str, float]]:
        """The scalar loss of ``batch`` for ``optimizer`` (and optionally logs), with ``modules`` as the
        Trainer holds them (distributed wrappers on the trained ones) and every draw from ``generator``."""
        raise NotImplementedError

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples [n, *data shape] from ``modules`` (the EMA copies where there are any), in
        ``steps`` sampling steps (None: :meth:`sampling_steps`)."""
        raise NotImplementedError

    def metrics(self, modules: dict[str, nn.Module], images: Tensor, labels: Tensor,
                generator: torch.Generator) -> dict[str, float]:
        """What the evaluation reports for a family that draws no samples (``draws_samples = False``): numbers
        on the held-out split (``images`` [N, ...], ``labels`` [N] on the modules' device), draws from
        ``generator``."""
        raise NotImplementedError

    def pictures(self, modules: dict[str, nn.Module], images: Tensor, labels: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, int, str] | None:
        """For a family that draws no samples: ``(pictures [N, ...], rows, title)``, images the evaluation draws
        as a grid of ``rows`` rows (an autoencoder's originals over its reconstructions) from the held-out
        ``images`` and ``labels``, or None (no picture; the default)."""
        return None

    def finish(self, modules: dict[str, nn.Module]) -> None:
        """Called by the Trainer once after the last training step, before the final checkpoint, with the
        modules as :meth:`sample` gets them (EMA copies): what a family fits from data once trained (an
        autoencoder's latent scaling factor) lands in that checkpoint. Nothing by default."""

    def guided(self, denoiser: Any) -> Any:
        """``denoiser`` as :meth:`sample` uses it: wrapped by the config's guidance, if it has one."""
        guidance = getattr(self, "context", None) and self.context.guidance
        return denoiser if guidance is None else guidance.wrap(denoiser)

    def sampling_steps(self) -> int | None:
        """The steps :meth:`sample` takes by default: the experiment's sampler's (None without one)."""
        sampler = getattr(self, "context", None) and self.context.sampler
        return getattr(sampler, "steps", None)

    def sampling_method(self) -> str:
        """How :meth:`sample` draws, as the evaluation reports it: the experiment's sampler's ``repr``."""
        sampler = getattr(self, "context", None) and self.context.sampler
        return repr(sampler)

    def references(self) -> dict[str, Reference]:
        """Models the evaluation reports next to this one, by name (a distillation's teacher); none here."""
        return {}


register_namespace("objective", Objective, "training objectives")
