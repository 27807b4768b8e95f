"""Conditional flow matching with a coupling, a path and any source (objective ``cfm``).

Names follow :mod:`.couplings` and :mod:`.paths` (torchcfm's): ``x0`` [B, ...] is the source, ``x1``
[B, ...] the data, and time is genlab's, t = 0 at the data and t = 1 at the source. One loss step
(Tong et al. 2023, "Improving and generalizing flow-based generative models with minibatch optimal
transport", Algorithm 1 with Eq. 16 (I-CFM) or Eq. 17 (OT-CFM); Lipman et al. 2023, Eq. 9 and 23):

1. x0 ~ q0, the source: N(0, I) of the data's shape, or a batch of a source data set (the model then
   transports one data set into another, as torchcfm's 8 gaussians -> moons example);
2. (x0, x1) ~ pi(x0, x1) by the coupling of the minibatch: ``independent`` (q0 x q1), ``exact_ot``,
   ``sinkhorn``, ``label_ot`` (the data's class labels, and the source's where it has them);
3. t ~ the time distribution (uniform on [t_min, t_max] of the process by default), eps ~ N(0, I);
4. x_t = a(t) x1 + b(t) x0 + s(t) eps and u_t = dx_t / dt on the path (:meth:`Path.sample`);
5. L = E |v_theta(x_t, t) - u_t|^2, the mean over the batch and the coordinates (torchcfm's
   ``torch.mean((vt - ut) ** 2)``), v_theta = ``model(x_t, model_time(t), **cond)`` through a
   :class:`~genlab.diffusion.Denoiser` with ``prediction="velocity"``.

In torchcfm's time tau = 1 - t the model there learns v_tau = -v_t: the same loss for the same draws.

**Sampling.** The learned field is integrated from the source at t = 1 to t = 0 (dx/dt = v_theta) by the
experiment's sampler on the experiment's process, which must be the one whose alpha(t), sigma(t) are
the path's mean coefficients a(t) (on the data) and b(t) (on the source): the samplers read the
velocity through x0 = (sigma' x - sigma v) / (alpha sigma' - sigma alpha') and
eps = (alpha v - alpha' x) / (alpha sigma' - sigma alpha'), and a step that combines them is a step of
dx/dt = v for any source, Gaussian or not (the "eps" of a non-Gaussian source is its point, not noise).
So ``cond_ot`` needs ``process: rectified_flow`` and ``variance_preserving`` needs
``process: trigonometric``; any other pairing is refused when the experiment is built. Sampling starts
from source samples drawn with the generator, never from the process's prior. With a path std
sigma > 0 (torchcfm's I-CFM uses 0.1) the field is that of the sigma-blurred marginals; sampling starts
from the source itself, as torchcfm does.

**The Schrödinger bridge** (``path: schrodinger_bridge``, with ``coupling: {type: sinkhorn, reg: 2 sigma^2}``:
SB-CFM, Tong et al. 2023, Sec. 4; SF2M, Tong et al. 2024, "Simulation-free Schrödinger bridges via score
and flow matching", Algorithm 1) trains two networks jointly, with one optimizer, as SF2M does: the flow
v_theta (``model``) and a second network of the same ``model:`` config, ``score`` (its own EMA copy and
checkpoint files ``score.safetensors``, ``ema_score.safetensors``), with

    L = E |v_theta(x_t, t) - u_t|^2 + E |lambda(t) s_theta(x_t, t) + eps|^2,    lambda(t) = 2 s(t) / sigma^2,

the second SF2M's score loss (torchcfm's ``compute_lambda`` and SF2M example), which trains s_theta towards
(sigma^2 / 2) grad log p_t, the score term of the bridge's SDE drift. t is drawn by the time distribution
on [max(t_min, t_eps), 1 - t_eps] of the process (the bridge's ``t_eps``, default 1e-3: u_t's noise is
unbounded at both ends, see :class:`~.paths.SchrodingerBridge`), and both networks are evaluated at t
clamped into [t_eps, 1 - t_eps], when sampling too. The bridge's mean is the ``cond_ot`` mean, so it samples
on ``process: rectified_flow``: with ``sampler: bridge_sde`` (Euler-Maruyama on SF2M's SDE with g = sigma,
:class:`~genlab.diffusion.samplers.BridgeSDE`), or with any deterministic sampler, which integrates the
flow alone: the probability-flow ODE of the bridge's marginals. Other stochastic samplers are refused
(they take the velocity model's eps for Gaussian noise), and so is ``bridge_sde`` with another path (no
score network is trained there).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..core.registry import build, name_of, register
from ..diffusion.denoiser import BridgeDenoiser, Denoiser
from ..diffusion.levels import combine
from ..diffusion.processes import Process
from ..diffusion.samplers import BridgeSDE
from ..diffusion.time_distributions import TimeDistribution
from .base import Batch, BuildContext, Objective
from .couplings import Coupling, LabelOT, Pairs
from .paths import Path, SchrodingerBridge, as_tensor_like

#: the registered process each built-in path is sampled on
MATCHING_PROCESS = {"cond_ot": "rectified_flow", "variance_preserving": "trigonometric",
                    "schrodinger_bridge": "rectified_flow"}


def check_path_process(path: Path, process: Process, tolerance: float = 1e-9) -> None:
    """ValueError unless ``process`` is the one ``path`` is sampled on: t_max = 1 and, at 21 times in
    [0, 1], alpha = a (the path's data coefficient), sigma = b (its source coefficient) and their
    t-derivatives, each within ``tolerance`` (relative to 1 + |value|)."""
    who = f"cfm: path {path!r}"
    name = name_of("path", type(path))
    fix = (f"use process: {MATCHING_PROCESS[name]}" if name in MATCHING_PROCESS else
           "use a process whose alpha(t), sigma(t) are the path's coefficients of x1 and x0")
    if process.t_max != 1.0:
        raise ValueError(f"{who} reaches the source at t = 1 but {process!r} has t_max = {process.t_max:g}; {fix}")
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    level, c = process.level(t), path.coefficients(t)
    for what, got, want in (("alpha", level.alpha, c.data), ("sigma", level.sigma, c.source),
                            ("d alpha / dt", level.d_alpha, c.d_data), ("d sigma / dt", level.d_sigma, c.d_source)):
        want = as_tensor_like(want, t)
        bad = ((got - want).abs() > tolerance * (1 + want.abs())).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{who} is sampled on the process with alpha(t) = its coefficient of x1 (the data) and "
                             f"sigma(t) = its coefficient of x0 (the source), but {process!r} has {what} = "
                             f"{float(got[i]):.6g} at t = {float(t[i]):g} where the path has {float(want[i]):.6g}; "
                             f"{fix}")


class CFMDraw(NamedTuple):
    """The random draws of one loss: paired source x0 [B, ...] and data x1 [B, ...], times t [B]
    (float64, genlab's), path noise eps [B, ...] and the model's condition (the pairs' data labels)."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    eps: Tensor
    cond: dict[str, Tensor]


@register("objective", "cfm")
class ConditionalFlowMatching(Objective):
    """Conditional flow matching (see the module docstring): I-CFM, OT-CFM, label-conditional OT-CFM and
    data-to-data transport, trained by the general Trainer.

    Args:
        coupling: a ``coupling`` spec (default ``independent``; ``exact_ot`` is OT-CFM).
        path: a ``path`` spec (default ``cond_ot`` with sigma 0, the straight path of rectified flow);
            ``schrodinger_bridge`` also trains a score network (module docstring).
        source: None: x0 ~ N(0, I) of the data's shape; or a ``dataset`` spec (``{type: toy2d, name:
            eight_gaussians}``) or data set object holding ``data`` [N, *data shape] (and optionally
            ``labels`` [N], used by ``label_ot``), whose rows, drawn uniformly with the generator, are x0.
        t_distribution: how t is drawn on the process (``uniform``, ``logit_normal``, ``log_normal``).
        prediction: ``velocity`` (what the model outputs; the only one, as u_t is the target).
    """

    def __init__(self, coupling: Coupling | str | dict = "independent", path: Path | str | dict = "cond_ot",
                 source: str | dict | None = None,
                 t_distribution: TimeDistribution | str | dict = "uniform",
                 prediction: Literal["velocity"] = "velocity") -> None:
        if prediction != "velocity":
            raise ValueError(f"cfm: prediction must be 'velocity' (the model regresses the path's velocity), "
                             f"got {prediction!r}")
        self.prediction = prediction
        self.coupling = build("coupling", coupling, path="objective.coupling")
        self.path = build("path", path, path="objective.path")
        self.t_distribution = build("time_distribution", t_distribution, path="objective.t_distribution")
        self.source = None if source is None else build("dataset", source, path="objective.source")
        for what, value, base in (("coupling", self.coupling, Coupling), ("path", self.path, Path),
                                  ("t_distribution", self.t_distribution, TimeDistribution)):
            if not isinstance(value, base):
                raise ValueError(f"cfm: {what} must be a {base.__name__} or a registered one's name or config, "
                                 f"got {value!r}")
        if self.source is not None and not isinstance(getattr(self.source, "data", None), Tensor):
            raise ValueError(f"cfm: the source data set ({type(self.source).__name__}) must hold its rows as a "
                             "tensor 'data' [N, ...]")
        if self.source is not None and len(self.source.data) == 0:
            raise ValueError("cfm: the source data set is empty")
        self._on_device: dict[torch.device, tuple[Tensor, Tensor | None]] = {}
        self._denoiser: tuple[tuple[Any, ...], Denoiser] | None = None

    @property
    def bridge(self) -> bool:
        """Whether the path is the Schrödinger bridge: then a score network trains with the flow."""
        return isinstance(self.path, SchrodingerBridge)

    def build(self, context: BuildContext) -> None:
        """Take the experiment's parts; ValueError unless the process matches the path
        (:func:`check_path_process`), the sampler suits it (module docstring), the source's rows have the
        data's shape, and, for ``label_ot``, the model is class-conditional (the Trainer passes labels only
        then). For the Schrödinger bridge, build the score network: ``context.new_model()`` (a fresh
        network of the ``model:`` config), or a copy of the model where the context has no ``new_model``."""
        super().build(context)
        check_path_process(self.path, context.process)
        self.check_sampler(context.sampler)
        self.time_process = context.process
        if self.bridge:
            ends = max(context.process.t_min, self.path.t_eps), min(context.process.t_max, 1 - self.path.t_eps)
            self.time_process = context.process.within(*ends)
            self.score_network = context.new_model() if context.new_model is not None else copy.deepcopy(context.model)
        if self.source is not None and tuple(self.source.data.shape[1:]) != tuple(context.data_shape):
            raise ValueError(f"cfm: the source's rows have shape {list(self.source.data.shape[1:])}, the data's "
                             f"{list(context.data_shape)}; the source must be of the data's shape")
        if isinstance(self.coupling, LabelOT) and context.num_classes is None:
            raise ValueError("cfm: coupling label_ot pairs within classes: it needs labelled data and a "
                             "class-conditional model (model num_classes), which get the batch's labels")

    def check_sampler(self, sampler: Any) -> None:
        """ValueError unless ``sampler`` samples this path: ``bridge_sde`` (stochastic) only with the
        Schrödinger bridge, whose other samplers must be deterministic (module docstring)."""
        if not getattr(sampler, "stochastic", False):
            return
        if isinstance(sampler, BridgeSDE) and not self.bridge:
            raise ValueError(f"cfm: sampler {sampler!r} needs the score of the marginals, which cfm learns only with "
                             f"path schrodinger_bridge (path here: {self.path!r}); use a deterministic sampler "
                             "(flow_euler, heun, dpm_solver_pp, ...) or bridge_sde with g: 0")
        if self.bridge and not isinstance(sampler, BridgeSDE):
            raise ValueError(f"cfm: path schrodinger_bridge samples with sampler bridge_sde (its SDE) or a "
                             f"deterministic sampler (its probability-flow ODE), not {sampler!r}, which draws noise "
                             "for a diffusion's reverse SDE and reads the velocity model's eps as Gaussian noise")

    def modules(self) -> dict[str, nn.Module]:
        """``model`` (the flow) and, for the Schrödinger bridge, ``score``."""
        return {"model": self.context.model, "score": self.score_network} if self.bridge else super().modules()

    def ema_modules(self) -> tuple[str, ...]:
        return ("model", "score") if self.bridge else super().ema_modules()

    def optimizers(self) -> dict[str, tuple[str, ...]]:
        """One optimizer over both networks for the Schrödinger bridge (SF2M trains them jointly)."""
        return {"model": ("model", "score")} if self.bridge else super().optimizers()

    @property
    def source_labels(self) -> Tensor | None:
        """The source data set's labels [N] (None for a Gaussian or unlabelled source)."""
        labels = getattr(self.source, "labels", None)
        return labels if isinstance(labels, Tensor) else None

    def denoiser(self, model: Any, process: Process | None = None, score: Any = None) -> Denoiser:
        """``model`` as a velocity-predicting :class:`Denoiser` on the experiment's process (or ``process``).
        For the Schrödinger bridge a :class:`~genlab.diffusion.BridgeDenoiser` with ``score`` (the score
        network, or None) and g = the bridge's sigma, both networks seeing their time clamped into
        [t_eps, 1 - t_eps] (:meth:`~.paths.SchrodingerBridge.clamp`)."""
        process = self.context.process if process is None else process
        key = (model, process, score)
        if self._denoiser is not None and all(a is b for a, b in zip(self._denoiser[0], key)):
            return self._denoiser[1]  # the last one built: the training loss asks for it every step
        if not self.bridge:
            denoiser = Denoiser(model, process, self.prediction)
        else:
            denoiser = BridgeDenoiser(model, score, process, self.path.sigma, self.prediction,
                                      model_time=lambda t: process.model_time(self.path.clamp(t)))
        self._denoiser = (key, denoiser)
        return denoiser

    def _source_on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The source's rows and labels on ``device`` (copied once per device)."""
        if device not in self._on_device:
            labels = self.source_labels
            self._on_device[device] = (self.source.data.to(device),
                                       None if labels is None else labels.to(device))
        return self._on_device[device]

    def draw_source(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None, labels: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | None]:
        """n source points x0 [n, *data shape] (``dtype``, on ``device``, default the generator's) and their
        labels [n] (None unless the source data set has labels). Gaussian: N(0, I) from ``generator``.
        Data set: rows drawn uniformly with replacement with ``generator``; with ``labels`` [n], row k is
        drawn among the source rows of class labels[k] (ValueError for a class the source lacks)."""
        device = torch.device(device if device is not None else generator.device)
        if self.source is None:
            return torch.randn((n, *self.context.data_shape), generator=generator, dtype=dtype, device=device), None
        data, source_labels = self._source_on(device)
        gen_device = generator.device
        if labels is None or source_labels is None:
            index = torch.randint(len(data), (n,), generator=generator, device=gen_device).to(device)
        else:
            index = torch.empty(n, dtype=torch.int64, device=device)
            for c in labels.unique().tolist():
                rows = (source_labels == c).nonzero()[:, 0]
                where = (labels == c).nonzero()[:, 0].to(device)
                if len(rows) == 0:
                    raise ValueError(f"cfm: class {c} has no rows in the source data set")
                pick = torch.randint(len(rows), (len(where),), generator=generator, device=gen_device)
                index[where] = rows[pick.to(device)]
        return data[index].to(dtype), None if source_labels is None else source_labels[index]

    def _class_matched(self) -> bool:
        """Whether source rows are drawn within the data's classes: ``label_ot`` with a labelled source."""
        return isinstance(self.coupling, LabelOT) and self.source_labels is not None

    def draw(self, batch: Batch, generator: torch.Generator) -> CFMDraw:
        """Steps 1-3 of the module docstring for the data batch ``batch["x"]`` [B, ...] (a batch with
        ``source`` rows [B, ...], from the ``pairs`` data set of reflow, is paired as given; labels
        ``batch["class_labels"]`` [B] when the model is conditional), in this order from ``generator``:
        the source, the coupling's own draws, t, eps."""
        x1, labels1 = batch["x"], batch.get("class_labels")
        if "source" in batch:  # pairs given by the data (reflow): the coupling they were drawn with
            pairs = Pairs(batch["source"].to(x1.dtype), x1, None, labels1)
        else:
            x0, labels0 = self.draw_source(len(x1), generator, x1.dtype, x1.device,
                                           labels1 if self._class_matched() else None)
            pairs = self.coupling.pair(x0, x1, generator, labels0, labels1)
        t = self.t_distribution.sample(self.time_process, len(x1), generator, device=x1.device)
        eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        cond = {} if pairs.labels1 is None else {"class_labels": pairs.labels1}
        return CFMDraw(pairs.x0, pairs.x1, t, eps, cond)

    def loss_terms(self, model: Any, draw: CFMDraw, score: Any = None) -> dict[str, Tensor]:
        """Steps 4-5, each term a mean over the batch and the coordinates, x_t and u_t the path's at
        (x0, x1, t, eps): ``flow`` = |v_theta(x_t, t) - u_t|^2 (Tong et al. 2023, Eq. 9) and, for the
        Schrödinger bridge, ``score`` = |lambda(t) s_theta(x_t, t) + eps|^2 (SF2M's score loss; ``score`` the
        score network)."""
        point = self.path.sample(draw.x0, draw.x1, draw.t, draw.eps)
        denoiser = self.denoiser(model, score=score)
        level = denoiser.level(draw.t, point.x_t)
        raw = denoiser.raw(point.x_t, level, **draw.cond)
        terms = {"flow": (raw - point.velocity).square().mean()}  # = the mean over rows of per-row means
        if self.bridge:
            s = denoiser.score_output(point.x_t, level, **draw.cond)
            residual = combine((self.path.score_weight(draw.t), s), (1.0, draw.eps))
            terms["score"] = residual.square().mean()
        return terms

    def loss_at(self, model: Any, draw: CFMDraw, score: Any = None) -> Tensor:
        """The sum of :meth:`loss_terms`."""
        first, *rest = self.loss_terms(model, draw, score).values()
        return sum(rest, first)  # (sum's start 0 would cost one more op)

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """:meth:`loss_at` of :meth:`draw`."""
        return self.loss_at(modules["model"], self.draw(batch, generator), modules.get("score"))

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples [n, *data shape]: source points drawn with ``generator`` (within the requested
        classes ``cond["class_labels"]`` for ``label_ot`` with a labelled source), carried to t = 0 by the
        experiment's sampler (in ``steps`` steps) on :meth:`denoiser` of the model (and the score network)."""
        labels = None if cond is None or not self._class_matched() else cond.get("class_labels")
        x0, _ = self.draw_source(n, generator, labels=labels)
        denoiser = self.guided(self.denoiser(modules["model"], score=modules.get("score")))
        return self.context.sampler.sample(denoiser, x=x0, steps=steps, generator=generator, progress=False, cond=cond)


@torch.no_grad()
def straightness(denoiser: Denoiser, x: Tensor, steps: int = 100, cond: dict[str, Tensor] | None = None) -> float:
    """The straightness of a flow's trajectories from x [B, ...] at t = 1 (Liu et al. 2023, "Flow
    straight and fast", Eq. 3): S = int_0^1 E |(Z_1 - Z_0) - v(Z_t, t)|^2 dt, 0 for straight paths,
    estimated with ``steps`` Euler steps of the velocity Denoiser (genlab time: dx/dt = v from t = 1 to
    0, so a straight path has v = x(1) - x(0)); |.|^2 sums over coordinates, E averages over the batch."""
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    start, velocities = x, []
    for t, t_next in zip(times[:-1], times[1:]):
        v = denoiser.raw(x, denoiser.level(t.expand(x.shape[0]).to(x.device), x), **(cond or {}))
        velocities.append(v)
        x = x + float(t_next - t) * v
    chord = start - x
    return float(torch.stack([(chord - v).square().flatten(1).sum(1).mean() for v in velocities]).mean())
