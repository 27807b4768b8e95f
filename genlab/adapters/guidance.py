"""Guidance wraps a Denoiser and keeps its protocol: a sampler cannot tell a guided denoiser from a plain one.

A guidance method is a registered setting (the config's ``guidance:`` section, namespace ``guidance``) whose
:meth:`Guidance.wrap` turns a denoiser into a guided one::

    guided = CFG(scale=3.0, rescale=0.7).wrap(denoiser)    # then any sampler: sampler.sample(guided, ...)

Where guidance acts. Every parameterisation makes x0 and eps affine in the network output ``raw`` with the
same coefficients for both branches (x0 = a_x0 x + b_x0 raw, eps = a_eps x + b_eps raw at one (x, t); see
:mod:`genlab.diffusion.denoiser`). Classifier-free guidance, u + w (c - u), is an affine combination
(weights 1 - w and w sum to 1), so applying it to ``raw`` gives exactly x0_u + w (x0_c - x0_u) *and*
eps_u + w (eps_c - eps_u): it is the same operation in every prediction space (eps, x0, v, score, EDM's F)
and the guided x0 and eps stay consistent (x = alpha x0 + sigma eps). genlab applies it to ``raw``, as
diffusers applies it to the model output, which keeps the samplers' linear fast path. Guidance rescale
(a ratio of standard deviations) is not affine and does depend on the space: it acts on ``raw``, the
model output, as diffusers' ``rescale_noise_cfg`` does (eps for an eps model, v for a v model).

A denoiser without the fast path (a plain callable with a ``process``) is guided on its (x0, eps) outputs,
which is the same classifier-free guidance (the affine argument above); rescale needs ``raw`` and is refused.

Classifier guidance and universal guidance are one hook, :mod:`.gradient_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Real
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat, Range, UnitInterval
from ..core.registry import register, register_namespace
from ..diffusion.denoiser import Denoiser, level_at, linear_path
from ..diffusion.levels import Level, Scalar, combine

Cond = dict[str, Any]
Sigma = Annotated[float, Range(ge=0, finite=False)]  # a Karras noise level sigma / alpha, up to inf


class Guidance:
    """Base of guidance methods: settings (the config's ``guidance:`` section) and :meth:`wrap`."""

    def wrap(self, denoiser: Any) -> Any:
        """``denoiser`` guided: an object with the same protocol (``process``, ``forward``, the fast path
        ``linear`` where ``denoiser`` has one)."""
        raise NotImplementedError

    def build(self, pretrained: Callable[[str], Any]) -> None:
        """Load what the method needs from trained runs (``pretrained(path)`` -> the run's Experiment, EMA
        weights, frozen); called once by the Experiment. Default: nothing to load."""

    @property
    def tag(self) -> str:
        """A short name of the setting for file names (``genlab sample`` writes ``samples-...-TAG-seedN``)."""
        return type(self).__name__.lower()


register_namespace("guidance", Guidance, "guidance: wraps the Denoiser for sampling (cfg, classifier)")


@register("guidance", "cfg")
class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6, whose 1 + w is w here; diffusers' form):

        out = out_u + w (out_c - out_u),        out = the network output (equivalently x0 or eps),

    with out_c the prediction for the sampling call's condition and out_u for the unconditional one, from one
    batched model call. Options:

    - ``rescale`` phi (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
      Sec. 3.4; diffusers' ``rescale_noise_cfg``): out <- phi out (std(out_c) / std(out)) + (1 - phi) out,
      the standard deviations over each sample's values (unbiased, as torch's ``std``);
    - ``interval`` [sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024, "Applying guidance in a limited
      interval improves sample and distribution quality"): guidance only where sigma_lo < sigma <= sigma_hi,
      sigma = sigma_t / alpha_t (Karras' noise level, the same numbers for every process), else out_c
      alone; per sample for per-sample times;
    - ``uncond``: the unconditional branch's keyword arguments, over the sampling call's condition: a number
      fills the shape of the condition's tensor of that name (default ``{class_labels: -1}``, the null class of
      genlab's UNet and DiT), a tensor [B, ...] or [1, ...] (a negative prompt embedding) is taken as is or
      repeated over the batch, None drops the key.

    ``scale`` w = 1 is the conditional model and w = 0 the unconditional one: each is one model call, exactly
    (w = 0 with rescale > 0 is not: the rescale still applies). A level shared by the batch outside the interval
    is one conditional call; per-sample levels always run both branches (which sample is inside is decided on
    the device, without a host read).

    Args:
        scale: the guidance scale w >= 0.
        rescale: phi in [0, 1] (0: no rescale).
        interval: [sigma_lo, sigma_hi], 0 <= sigma_lo <= sigma_hi (inf allowed); None: guidance everywhere.
        uncond: the unconditional condition (see above).
    """

    def __init__(self, scale: NonNegativeFloat = 1.0, rescale: UnitInterval = 0.0,
                 interval: tuple[Sigma, Sigma] | None = None, uncond: dict[str, Any] | None = None) -> None:
        if interval is not None:
            if len(interval) != 2 or not 0 <= interval[0] <= interval[1]:
                raise ValueError(f"CFG: interval must be [sigma_lo, sigma_hi] with 0 <= sigma_lo <= sigma_hi, got "
                                 f"{list(interval)}")
            interval = (float(interval[0]), float(interval[1]))
        uncond = {"class_labels": -1} if uncond is None else dict(uncond)
        for key, value in uncond.items():
            number = isinstance(value, Real) and not isinstance(value, bool)
            if not (value is None or torch.is_tensor(value) or number):
                raise ValueError(f"CFG: uncond[{key!r}] must be a number, a tensor or None, got {type(value).__name__}")
        self.scale, self.rescale, self.interval, self.uncond = float(scale), float(rescale), interval, uncond

    def wrap(self, denoiser: Any) -> Any:
        """``denoiser`` with classifier-free guidance: a :class:`CFGDenoiser` (a Denoiser, fast path kept) for a
        Denoiser with a fast path, else a :class:`CFGOnOutputs`."""
        if isinstance(denoiser, Denoiser) and linear_path(denoiser) is not None:
            return CFGDenoiser(denoiser, self)
        if self.rescale:
            raise ValueError(f"CFG: rescale acts on the network output, which {type(denoiser).__name__} does not "
                             "give (no linear fast path); use a Denoiser with one, or rescale=0")
        return CFGOnOutputs(denoiser, self)

    def weights(self, level: Level) -> Scalar | None:
        """The guidance scale at ``level``: w, or None on a shared level outside the interval (the conditional
        call alone); per sample (float64 [B] on the level's device: w inside the interval, 1 outside) on a
        per-sample level, decided on the device (no host read: both branches are always evaluated)."""
        if self.interval is None:
            return self.scale
        lo, hi = self.interval

        def inside(lv: Level) -> Tensor:
            return (lv.sigma_edm > lo) & (lv.sigma_edm <= hi)

        if level.shared:
            return self.scale if level.facts(("cfg_interval", lo, hi), inside)[1] else None
        return torch.where(inside(level), self.scale, 1.0).to(level.sigma.dtype)

    def guide(self, fn: Callable[..., Any], x: Tensor, level: Level, cond: Cond, scale: Tensor | None = None) -> Any:
        """``fn(x, level, **cond)`` (a tensor [B, ...] or a tuple of them) guided: each tensor out_u + w (out_c
        - out_u) (then rescaled), from one batched call of ``fn`` on the condition and ``uncond``. ``scale``: a
        per-sample w [B] instead of the setting's (both branches always run; guided distillation's targets)."""
        w = self.weights(level) if scale is None else scale
        if w is None or (isinstance(w, float) and w == 1.0):
            return fn(x, level, **cond)
        uncond = unconditional(cond, self.uncond, x)
        if isinstance(w, float) and w == 0.0 and not self.rescale:
            return fn(x, level, **uncond)
        out_c, out_u = two_branches(fn, x, level, cond, uncond)
        if torch.is_tensor(out_c):
            return self.combine(out_c, out_u, w)
        return tuple(self.combine(c, u, w) for c, u in zip(out_c, out_u))

    def combine(self, c: Tensor, u: Tensor, w: Scalar) -> Tensor:
        """u + w (c - u), then the rescale (diffusers' recipe, step by step) [B, ...]."""
        out = combine((1.0, u), (w, c - u))
        if not self.rescale:
            return out
        dims = tuple(range(1, c.ndim))
        if c[0].numel() < 2:
            raise ValueError(f"CFG: rescale needs the std of each sample's values, and samples of shape "
                             f"{list(c.shape[1:])} hold one value; use rescale=0")
        rescaled = out * (c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        return self.rescale * rescaled + (1 - self.rescale) * out

    @property
    def tag(self) -> str:
        rescale = f"-rescale{self.rescale:g}" if self.rescale else ""
        interval = "" if self.interval is None else f"-interval{self.interval[0]:g}-{self.interval[1]:g}"
        return f"cfg{self.scale:g}{rescale}{interval}"

    def __repr__(self) -> str:
        uncond = {k: f"tensor{list(v.shape)}" if torch.is_tensor(v) else v for k, v in self.uncond.items()}
        return f"CFG(scale={self.scale:g}, rescale={self.rescale:g}, interval={self.interval}, uncond={uncond})"


def unconditional(cond: Cond, uncond: Mapping[str, Any], x: Tensor) -> Cond:
    """The unconditional branch's keyword arguments: ``cond`` with ``uncond``'s entries put over it (see
    :class:`CFG`): a number fills the shape, dtype and device of ``cond``'s tensor of that name (without one:
    [B] on x's device, int64 for an int, else x's dtype); a tensor [B, ...] is kept, [1, ...] repeated to B
    (on x's device); None drops the key."""
    out, batch = dict(cond), x.shape[0]
    for key, value in uncond.items():
        if value is None:
            out.pop(key, None)
        elif not torch.is_tensor(value):
            like = cond.get(key)
            if torch.is_tensor(like):
                out[key] = torch.full_like(like, value)
            else:
                dtype = torch.int64 if isinstance(value, int) else x.dtype
                out[key] = torch.full((batch,), value, dtype=dtype, device=x.device)
        elif value.ndim and value.shape[0] in (1, batch):
            out[key] = value.to(x.device).expand(batch, *value.shape[1:])
        else:
            raise ValueError(f"CFG: uncond[{key!r}] must have a batch dimension of 1 or B = {batch}, got shape "
                             f"{list(value.shape)}")
    return out


def two_branches(fn: Callable[..., Any], x: Tensor, level: Level, cond: Cond, uncond: Cond) -> tuple[Any, Any]:
    """(fn(x, level, **cond), fn(x, level, **uncond)) from one call on the batch [2B, ...] (x twice, a
    per-sample level twice, per-sample condition tensors [B, ...] concatenated, shared entries passed once),
    split after. Two calls where the two conditions cannot share one: different keys, or an entry that is
    not per sample and differs between them."""
    joined = joint_condition(cond, uncond, x.shape[0])
    if joined is None:
        return fn(x, level, **cond), fn(x, level, **uncond)
    both = level if level.shared else Level(*(torch.cat([getattr(level, f)] * 2) for f in Level.FIELDS))
    out = fn(torch.cat([x, x]), both, **joined)
    return halves(out, x.shape[0])


def joint_condition(cond: Cond, uncond: Cond, batch: int) -> Cond | None:
    """The keyword arguments of the joint call on [2B, ...] (see :func:`two_branches`), or None."""
    if cond.keys() != uncond.keys():
        return None
    joined = {}
    for key, c in cond.items():
        u = uncond[key]
        if torch.is_tensor(c) and torch.is_tensor(u) and c.ndim and u.ndim and c.shape[0] == u.shape[0] == batch:
            joined[key] = torch.cat([c, u.to(c.device, c.dtype)])
        elif c is u or (not torch.is_tensor(c) and not torch.is_tensor(u) and c == u):
            joined[key] = c
        else:
            return None
    return joined


def halves(out: Any, batch: int) -> tuple[Any, Any]:
    """A joint call's output split in its first and second halves of the batch: tensors [2B, ...] (tuples
    of them alike); anything else (a float, a shared [] tensor) belongs to both."""
    if isinstance(out, tuple):
        pairs = [halves(o, batch) for o in out]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if torch.is_tensor(out) and out.ndim and out.shape[0] == 2 * batch:
        return out[:batch], out[batch:]
    return out, out


class GuidedDenoiser(Denoiser):
    """A Denoiser whose network output is guided: the wrapped Denoiser's process, prediction type, time
    input, coefficients and regression target, with :meth:`raw` replaced by the guided output (a subclass
    implements it). x0, eps and the fast path ``linear`` follow from ``raw`` exactly as for any Denoiser.
    Other attributes are the wrapped one's (a consistency model's ``sigma_min``, which its sampler reads)."""

    def __init__(self, denoiser: Denoiser) -> None:
        nn.Module.__init__(self)
        self.inner = denoiser
        self.model, self.process, self.prediction = denoiser.model, denoiser.process, denoiser.prediction
        self.preconditioning, self.sigma_data = denoiser.preconditioning, denoiser.sigma_data
        self.model_time = denoiser.model_time

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and modules (nn.Module)
        except AttributeError:
            inner = self.__dict__["_modules"].get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def network_input(self, level: Level) -> tuple[Scalar, Scalar]:
        return self.inner.network_input(level)

    def coefficients(self, level: Level) -> tuple[Scalar, Scalar, Scalar, Scalar]:
        return self.inner.coefficients(level)

    def to_x0_eps(self, raw: Tensor, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        return self.inner.to_x0_eps(raw, x, level)

    def target(self, x0: Tensor, eps: Tensor, x: Tensor, level: Level) -> Tensor:
        return self.inner.target(x0, eps, x, level)

    def extra_repr(self) -> str:
        return f"{self.inner.extra_repr()}, guidance={self.guidance!r}"


class CFGDenoiser(GuidedDenoiser):
    """A Denoiser with classifier-free guidance on its network output (:class:`CFG`; build it with
    ``CFG(...).wrap(denoiser)``)."""

    def __init__(self, denoiser: Denoiser, guidance: CFG) -> None:
        super().__init__(denoiser)
        self.guidance = guidance

    def raw(self, x: Tensor, level: Level, **cond: Any) -> Tensor:
        """The guided network output [B, ...] at (x [B, ...], level)."""
        return self.guidance.guide(self.inner.raw, x, level, cond)


class CFGOnOutputs(nn.Module):
    """Classifier-free guidance of a denoiser without a fast path (any ``denoiser(x, t, **cond) -> (x0, eps)``
    with a ``process``): x0 and eps each guided (:class:`CFG`, without rescale). It has no fast path."""

    linear = None

    def __init__(self, denoiser: Any, guidance: CFG) -> None:
        super().__init__()
        self.inner, self.guidance, self.process = denoiser, guidance, denoiser.process

    def forward(self, x: Tensor, t: Tensor | float | Level, **cond: Any) -> tuple[Tensor, Tensor]:
        """Guided (x0, eps) [B, ...] at x [B, ...] and t (a float, [], [B] or a Level)."""
        return self.guidance.guide(self.inner, x, level_at(self.process, t, x), cond)
