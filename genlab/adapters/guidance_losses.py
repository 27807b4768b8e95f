"""Losses of the x0 estimate for universal guidance (Bansal et al. 2023), named in a config: namespace
``guidance_loss``, the ``loss:`` of ``guidance: {type: universal, loss: {type: ..., ...}, scale: s}``
(:class:`~genlab.adapters.gradient_guidance.UniversalGuidance` steers x_t by -s grad_x loss(x0_hat(x_t))).

A loss is ``loss(x0: [B, ...], **cond) -> [B]`` (``cond``: the sampling condition, e.g. ``class_labels``),
differentiable in x0; :meth:`GuidanceLoss.build` loads what it needs before sampling. Built in:

- ``digits_classifier``: -log p(y | x0) of genlab's digits classifier (:mod:`genlab.metrics.classifier`,
  trained in seconds on the digits' training split), y a fixed ``label`` or each sample's class label;
- ``classifier``: -log p(y | x0) of a trained ``noisy_classifier`` run's classifier at t_min;
- ``masked_l2``: (1/2) sum_i m_i (x0_i - v_i)^2, the inpainting / editing constraint of universal guidance
  (Bansal et al. 2023, Sec. 3): a target ``value`` inside a ``box`` of the image, or, from Python, any mask
  and target tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import reduce
from torch import Tensor

from ..core.bounds import PositiveInt, UnitInterval
from ..core.errors import ShapeError
from ..core.registry import name_of, register, register_namespace


class GuidanceLoss:
    """Base of the built-in universal-guidance losses: ``__call__(x0: [B, ...], **cond) -> [B]``."""

    def build(self, pretrained: Callable[[str], Any]) -> None:
        """Load what the loss needs (a trained network); called once by the guidance's ``build``."""

    def __call__(self, x0: Tensor, **cond: Any) -> Tensor:
        raise NotImplementedError


register_namespace("guidance_loss", GuidanceLoss,
                   "guidance_loss: a loss of the x0 estimate for universal guidance (digits_classifier, classifier, masked_l2)")


def log_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] [B] (logits [B, K], labels [B]); 0 where a label is -1 (the null class)."""
    logp = torch.log_softmax(logits, dim=-1).gather(1, labels.long().clamp(min=0)[:, None])[:, 0]
    return logp * (labels >= 0)


def wanted_labels(label: int | None, x0: Tensor, cond: dict[str, Any], name: str) -> Tensor:
    """The labels [B] a classifier loss guides to: ``label`` for all, or (None) the condition's ``class_labels``."""
    if label is not None:
        return torch.full((len(x0),), label, device=x0.device)
    labels = cond.get("class_labels")
    if labels is None:
        raise ValueError(f"{name}: sampling gives no class_labels; set the loss's label")
    return labels


def load_noisy_classifier(pretrained: Callable[[str], Any], run: str, who: str) -> tuple[torch.nn.Module, Any]:
    """(the classifier, its process) of ``run``, which must be a ``noisy_classifier`` run; ValueError naming
    the objective it was trained with otherwise (``who``: the component, for the message)."""
    exp = pretrained(run)
    trained = name_of("objective", type(exp.objective))
    if trained != "noisy_classifier":
        raise ValueError(f"{who}: {run} was trained with objective {trained!r}; {who} needs a run of objective "
                         "noisy_classifier")
    return exp.model, exp.process


@register("guidance_loss", "digits_classifier")
class DigitsClassifierLoss(GuidanceLoss):
    """-log p(y | x0) [B] of :func:`~genlab.metrics.classifier.train_digits_classifier` (x0: [B, 1, S, S] in
    [-1, 1], S in 8, 16, 32), y = ``label`` for every sample, or (None) each sample's ``class_labels``
    (a label -1, the null class, is not guided). ``steps``, ``seed``: the classifier's training."""

    def __init__(self, label: int | None = None, image_size: PositiveInt = 16, steps: PositiveInt = 600,
                 seed: int = 0) -> None:
        if label is not None and not 0 <= label < 10:
            raise ValueError(f"digits_classifier: label must be a digit 0..9 (or null: the samples' labels), got {label}")
        self.label, self.image_size, self.steps, self.seed = label, image_size, steps, seed
        self.classifier: torch.nn.Module | None = None

    def build(self, pretrained: Callable[[str], Any]) -> None:
        from ..metrics.classifier import train_digits_classifier

        self.classifier = train_digits_classifier(self.image_size, self.steps, self.seed)

    def __call__(self, x0: Tensor, **cond: Any) -> Tensor:
        if self.classifier is None:
            self.build(lambda path: None)
        labels = wanted_labels(self.label, x0, cond, "digits_classifier")
        return -log_prob(self.classifier.to(device=x0.device, dtype=x0.dtype)(x0), labels)


@register("guidance_loss", "classifier")
class ClassifierRunLoss(GuidanceLoss):
    """-log p(y | x0) [B] of the time-conditioned classifier of ``run`` (a ``noisy_classifier`` run, e.g.
    ``configs/guidance/classifier_digits.yaml``), shown x0 at its process's t_min (nearly clean); y as
    ``digits_classifier``'s. Unlike classifier guidance (f of x_t), the gradient flows through x0_hat."""

    def __init__(self, run: str, label: int | None = None) -> None:
        self.run, self.label = run, label
        self.classifier: torch.nn.Module | None = None

    def build(self, pretrained: Callable[[str], Any]) -> None:
        self.classifier, self.process = load_noisy_classifier(pretrained, self.run, "classifier loss")

    def __call__(self, x0: Tensor, **cond: Any) -> Tensor:
        from .gradient_guidance import noisy_logits

        if self.classifier is None:
            raise ValueError(f"classifier loss: the run {self.run} is not loaded; call build(pretrained)")
        level = self.process.level(torch.full((len(x0),), self.process.t_min, device=x0.device))
        labels = wanted_labels(self.label, x0, cond, "classifier loss")
        return -log_prob(noisy_logits(self.classifier, self.process, x0, level).float(), labels)


@register("guidance_loss", "masked_l2")
class MaskedL2(GuidanceLoss):
    """(1/2) sum_i m_i (x0_i - v_i)^2 [B] for x0: [B, C, H, W] (Bansal et al. 2023's inpainting constraint):
    m is 1 inside ``box`` = [top, bottom, left, right] (fractions of the height and width; default: the whole
    image, and every coordinate of any x0 [B, ...]), v = ``value`` (e.g. -1, the digits' background). From Python ``mask`` and ``target`` may be tensors
    broadcastable to x0 (any shape [B, ...]); they replace the box and the value."""

    def __init__(self, value: float = -1.0, box: tuple[UnitInterval, UnitInterval, UnitInterval, UnitInterval] = (0.0, 1.0, 0.0, 1.0),
                 mask: Tensor | None = None, target: Tensor | None = None) -> None:
        top, bottom, left, right = box
        if not (top < bottom and left < right):
            raise ValueError(f"masked_l2: box [top, bottom, left, right] must have top < bottom and left < right, got "
                             f"{list(box)}")
        self.value, self.box, self.mask, self.target = value, tuple(box), mask, target

    def box_mask(self, x0: Tensor) -> Tensor:
        """The box as a mask [1, 1, H, W] on x0's device and dtype (the default box: 1 for any x0 [B, ...])."""
        if self.box == (0.0, 1.0, 0.0, 1.0):
            return torch.ones((), device=x0.device, dtype=x0.dtype)
        if x0.ndim != 4:
            raise ShapeError(f"masked_l2: a box needs images x0: [B, C, H, W], got {list(x0.shape)}; give a mask tensor")
        (h, w), (top, bottom, left, right) = x0.shape[-2:], self.box
        rows = torch.arange(h, device=x0.device, dtype=x0.dtype) + 0.5
        cols = torch.arange(w, device=x0.device, dtype=x0.dtype) + 0.5
        inside = ((rows >= top * h) & (rows < bottom * h))[:, None] & ((cols >= left * w) & (cols < right * w))[None]
        return inside.to(x0.dtype)[None, None]

    def __call__(self, x0: Tensor, **cond: Any) -> Tensor:
        mask = self.box_mask(x0) if self.mask is None else self.mask.to(x0)
        target = self.value if self.target is None else self.target.to(x0)
        return reduce(mask * (x0 - target).square(), "b ... -> b", "sum") / 2
