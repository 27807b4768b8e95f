"""Classifier guidance and universal guidance as one hook, :class:`GradientGuidance`: the score gains s times
the gradient of a function f of x_t (log p(y | x_t, t) of a noise-conditional classifier; -loss(x0_hat(x_t))),
written as a shift of the network output ``raw``, so x0, eps and the fast path stay consistent (see
:mod:`.guidance` for the protocol a guided denoiser keeps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat
from ..core.registry import build, name_of, register
from ..diffusion.denoiser import Denoiser, linear_path, time_input
from ..diffusion.levels import Level, combine
from ..diffusion.processes import Process
from .guidance import Cond, Guidance, GuidedDenoiser
from .guidance_losses import GuidanceLoss, load_noisy_classifier


def noisy_logits(classifier: Callable[..., Tensor], process: Process, x: Tensor, level: Level) -> Tensor:
    """Logits [B, K] of a time-conditioned classifier at x_t [B, ...] and ``level``: it sees x_t and the
    process's model time (what the ``noisy_classifier`` objective trains it on)."""
    t_in = level.values(("model_time", process.model_time), lambda lv: process.model_time(lv.t))
    return classifier(x, time_input(t_in, x))


class GradientGuidance(Guidance):
    """Guidance by the gradient of a differentiable function f(x_t) (a log-likelihood) with respect to x_t,
    with scale s: the score -eps / sigma gains s grad f (Dhariwal & Nichol 2021, Eq. 14 and Algorithm 2,
    with sqrt(1 - alpha_bar) = sigma), so

        eps_g = eps - s sigma grad_x f,        x0_g = x0 + s (sigma^2 / alpha) grad_x f,

    applied to the network output as raw + (-s sigma / b_eps) grad_x f (eps = a_eps x + b_eps raw): x0, eps
    and the fast path stay consistent, for every prediction type. Where b_eps = 0 (alpha = 0, x0 unknowable)
    there is no guidance. Subclasses give f (:meth:`log_likelihood`), which may read the x0 estimate: then
    the gradient flows through the denoiser (``through_denoiser``; universal guidance).
    """

    through_denoiser = False

    def __init__(self, scale: NonNegativeFloat = 1.0) -> None:
        self.scale = float(scale)

    def log_likelihood(self, x: Tensor, level: Level, x0: Tensor | None, cond: Cond, process: Process) -> Tensor:
        """f [B] at x_t [B, ...] (x0 [B, ...]: the estimate, with its graph to x_t, when ``through_denoiser``)."""
        raise NotImplementedError

    def model_condition(self, denoiser: Denoiser) -> tuple[str, ...]:
        """Keys of the sampling condition that ``denoiser`` does not take (kept for f alone)."""
        return ()

    def wrap(self, denoiser: Any) -> GradientGuided:
        """``denoiser`` with this guidance (a Denoiser with a fast path: the shift acts on its output)."""
        if not isinstance(denoiser, Denoiser) or linear_path(denoiser) is None:
            raise ValueError(f"{type(self).__name__}: guides a Denoiser's network output (a Denoiser with a fast "
                             f"path); got {type(denoiser).__name__}")
        return GradientGuided(denoiser, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:g})"

    @property
    def tag(self) -> str:
        return f"{type(self).__name__.lower().removesuffix('guidance')}{self.scale:g}"


class GradientGuided(GuidedDenoiser):
    """A Denoiser with :class:`GradientGuidance` on its network output (build it with ``guidance.wrap``)."""

    def __init__(self, denoiser: Denoiser, guidance: GradientGuidance) -> None:
        super().__init__(denoiser)
        self.guidance, self.dropped = guidance, guidance.model_condition(denoiser)

    def raw(self, x: Tensor, level: Level, **cond: Any) -> Tensor:
        """The network output [B, ...] shifted by -s sigma / b_eps grad_x f (see :class:`GradientGuidance`)."""
        g = self.guidance
        model_cond = {k: v for k, v in cond.items() if k not in self.dropped}
        raw = None if g.through_denoiser else self.inner.raw(x, level, **model_cond)
        if g.scale == 0:
            return self.inner.raw(x, level, **model_cond) if raw is None else raw
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0 = None
            if g.through_denoiser:
                raw = self.inner.raw(x_in, level, **model_cond)
                x0 = self.inner.to_x0_eps(raw, x_in, level)[0]
            f = g.log_likelihood(x_in, level, x0, cond, self.process)
            grad = torch.autograd.grad(f.sum(), x_in)[0]
        (sigma,), b_eps = level.coef("sigma"), self.coefficients(level)[3]
        if isinstance(b_eps, float):
            shift = 0.0 if b_eps == 0 else -g.scale * sigma / b_eps
        else:
            shift = torch.where(b_eps != 0, -g.scale * sigma / b_eps, 0.0)
        return combine((1.0, raw.detach()), (shift, grad.detach()))


@register("guidance", "classifier")
class ClassifierGuidance(GradientGuidance):
    """Classifier guidance (Dhariwal & Nichol 2021, Sec. 4): f = log p(y | x_t, t) of a time-conditioned
    classifier (one trained by the ``noisy_classifier`` objective), y the sampling condition's labels (a
    label -1, the null class, is not guided). With an unconditional model it makes one class-conditional.

    Args:
        classifier: a run directory (or checkpoint) of a ``noisy_classifier`` run, loaded by :meth:`build`,
            or the classifier module itself (``classifier(x_t, t_model) -> logits [B, K]`` on the sampled
            denoiser's process).
        scale: s >= 0.
        label: the condition's key holding the labels [B].
        model_labels: whether the denoiser's model receives the labels too (a class-conditional model, as in
            Dhariwal & Nichol's conditional runs); None: if its model has ``num_classes``.
    """

    def __init__(self, classifier: str | nn.Module, scale: NonNegativeFloat = 1.0, label: str = "class_labels",
                 model_labels: bool | None = None) -> None:
        super().__init__(scale)
        self.classifier, self.label, self.model_labels = classifier, label, model_labels
        self.process: Process | None = None  # a loaded run's process (None: the denoiser's)

    def build(self, pretrained: Callable[[str], Any]) -> None:
        if not isinstance(self.classifier, str):
            return
        self.classifier, self.process = load_noisy_classifier(pretrained, self.classifier, "classifier")

    @property
    def num_classes(self) -> int | None:
        """K, the classifier's classes (what a sampler may request)."""
        return getattr(self.classifier, "num_classes", None)

    def wrap(self, denoiser: Any) -> GradientGuided:
        if isinstance(self.classifier, str):
            raise ValueError(f"ClassifierGuidance: the classifier run {self.classifier} is not loaded; call "
                             "build(pretrained) or pass the classifier module")
        if self.process is not None:
            t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64) * denoiser.process.t_max
            ours, theirs = denoiser.process.level(t), self.process.level(t)
            if not (torch.allclose(ours.alpha, theirs.alpha) and torch.allclose(ours.sigma, theirs.sigma)):
                raise ValueError(f"ClassifierGuidance: the classifier was trained on {self.process!r}, the model "
                                 f"samples {denoiser.process!r}; train the classifier on the model's process")
        return super().wrap(denoiser)

    def model_condition(self, denoiser: Denoiser) -> tuple[str, ...]:
        takes = self.model_labels
        if takes is None:
            takes = getattr(denoiser.model, "num_classes", None) is not None
        return () if takes else (self.label,)

    def log_likelihood(self, x: Tensor, level: Level, x0: Tensor | None, cond: Cond, process: Process) -> Tensor:
        labels = cond.get(self.label)
        if labels is None:
            raise ValueError(f"ClassifierGuidance: sampling needs the labels to guide towards, cond[{self.label!r}]")
        logits = noisy_logits(self.classifier, self.process or process, x, level)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
        return logp * (labels >= 0)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale:g}, classifier={type(self.classifier).__name__})"


@register("guidance", "universal")
class UniversalGuidance(GradientGuidance):
    """Universal guidance, forward form (Bansal et al. 2023, "Universal guidance for diffusion models",
    Eq. 6): f = -loss(x0_hat(x_t), **cond) for any differentiable ``loss(x0 [B, ...], **cond) -> [B]``,
    its gradient taken through the denoiser. (Their backward guidance and self-recurrence are not here.)

    ``loss``: a callable (Python), or in a config a registered loss of namespace ``guidance_loss``
    (:mod:`.guidance_losses`: ``digits_classifier``, ``masked_l2``), e.g. ``guidance: {type: universal,
    scale: 2, loss: {type: digits_classifier, label: 3}}``; a config never names code.
    """

    through_denoiser = True

    def __init__(self, loss: dict[str, Any] | Callable[..., Tensor], scale: NonNegativeFloat = 1.0) -> None:
        super().__init__(scale)
        if isinstance(loss, Mapping):
            loss = build("guidance_loss", loss, path="guidance.loss")
        if not callable(loss):
            raise TypeError(f"UniversalGuidance: loss must be a callable loss(x0, **cond) -> [B] or a guidance_loss "
                            f"section, got {type(loss).__name__}")
        self.loss = loss

    def build(self, pretrained: Callable[[str], Any]) -> None:
        if isinstance(self.loss, GuidanceLoss):
            self.loss.build(pretrained)

    def log_likelihood(self, x: Tensor, level: Level, x0: Tensor | None, cond: Cond, process: Process) -> Tensor:
        return -self.loss(x0, **cond)

    def __repr__(self) -> str:
        name = name_of("guidance_loss", type(self.loss)) if isinstance(self.loss, GuidanceLoss) else "callable"
        return f"UniversalGuidance(scale={self.scale:g}, loss={name})"
