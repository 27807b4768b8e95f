"""Teachers: a frozen, trained model that an objective learns from (distillation), named in the
config by a run or checkpoint directory, or handed over from Python as a Denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checkpoint import load_run_weights
from ..core.errors import CheckpointError, GenlabError
from ..diffusion.denoiser import Denoiser
from .base import BuildContext, Reference


def same_process(a: Any, b: Any) -> bool:
    """Whether two processes have the same time range and the same alpha(t), sigma(t) (at 9 times, 1e-9)."""
    if (a.t_min, a.t_max) != (b.t_min, b.t_max):
        return False
    t = torch.linspace(a.t_min, a.t_max, 9, dtype=torch.float64)
    la, lb = a.level(t), b.level(t)
    return bool(torch.allclose(la.alpha, lb.alpha, atol=1e-9) and torch.allclose(la.sigma, lb.sigma, atol=1e-9))


@dataclass
class Teacher:
    """``module``: what the Trainer holds frozen (the teacher's model, or a Denoiser given as it is);
    ``objective``: the teacher run's objective (its parameterisation), None for a Denoiser;
    ``sampler``: the teacher run's sampler, if any (``grid``: its grid)."""

    module: nn.Module
    objective: Any = None
    sampler: Any = None

    @property
    def grid(self) -> Any:
        return getattr(self.sampler, "grid", None)

    def references(self, name: str = "teacher") -> dict[str, Reference]:
        """The teacher drawn as its run draws (its objective's ``sample``, its own sampler and steps)
        from the frozen module ``name``, for the evaluation; none for a teacher given as a Denoiser."""
        if self.objective is None:
            return {}
        objective = self.objective

        def sample(modules: dict[str, nn.Module], n: int, generator: torch.Generator,
                   cond: dict[str, Tensor] | None = None) -> Tensor:
            return objective.sample({"model": modules[name]}, n, generator, cond)

        return {name: Reference(objective.sampling_method(), objective.sampling_steps(), sample)}

    def denoiser(self, module: nn.Module, process: Any) -> Denoiser:
        """The teacher's Denoiser of ``module`` (the frozen module as the Trainer holds it)."""
        return module if isinstance(module, Denoiser) else self.objective.denoiser(module, process)

    def parameterisation(self, model: nn.Module, process: Any) -> Denoiser:
        """``model`` (a student) as a Denoiser in the teacher's parameterisation: the teacher run's
        objective's, or the prediction type, preconditioning and time input of a teacher given as a Denoiser."""
        if self.objective is not None:
            return self.objective.denoiser(model, process)
        d = self.module
        time = None if d.preconditioning == "edm" else d.model_time  # the teacher's time input (an analytic one's t)
        return Denoiser(model, process, d.prediction, d.preconditioning, d.sigma_data, model_time=time)

    @torch.no_grad()
    def solve(self, module: nn.Module, solver: Any, process: Any, x: Tensor, times: Tensor,
              cond: dict[str, Tensor]) -> Tensor:
        """x [B, ...] carried by ``solver`` over per-sample ``times`` [K, B] with the teacher (no gradient)."""
        return solver.integrate(self.denoiser(module, process), x, times=times, cond=cond)


STUDENT_ONLY = ("guidance_embed.",)  # a student's zero-initialised extra inputs (guided distillation's w)


def load_teacher(context: BuildContext, source: str | Denoiser, *, student_from_teacher: bool,
                 role: str = "teacher") -> Teacher:
    """The teacher ``source`` names, checked against the experiment: a run's process must be the config's
    (same alpha and sigma); with ``student_from_teacher`` the config's model takes the teacher's EMA
    weights (it must have the teacher's architecture, plus at most the zero-initialised inputs of
    ``STUDENT_ONLY``: a guidance-distilled student's w embedding, which keeps its initial weights). ValueError naming the mismatch otherwise; ``role``
    names the run in the messages (a ControlNet's frozen ``base`` is loaded the same way)."""
    if isinstance(source, Denoiser):
        return Teacher(source)
    if context.pretrained is None:
        raise ValueError(f"{role}: a run directory needs an experiment to load it from")
    try:
        run = context.pretrained(str(source))
    except GenlabError as e:
        raise ValueError(f"{role}: {e}; train the {role} first, or name its run directory") from None
    if not callable(getattr(run.objective, "denoiser", None)):
        raise ValueError(f"{role}: {source} was trained with objective {type(run.objective).__name__}, which trains "
                         f"no denoiser; a {role} is a diffusion or flow-matching run")
    if not same_process(run.process, context.process):
        raise ValueError(f"{role}: the {role} was trained on {run.process!r}, the config names {context.process!r}; "
                         f"use the {role}'s process")
    if student_from_teacher and run.model is not run.objective.modules().get("model", run.model):
        base = getattr(run.objective, "base_source", "its base run")
        raise ValueError(f"{role}: {source} was trained with objective {type(run.objective).__name__}: its model is a "
                         f"network on a frozen base, which the config's model cannot start from; name the base run "
                         f"({base}) and combine the networks when sampling (ControlledModel takes several ControlNets)")
    if student_from_teacher:  # a student's own inputs (STUDENT_ONLY) keep their init
        try:
            # the teacher's own checkpoint (a pinned one), not whatever its run holds newest by now
            load_run_weights(context.model, getattr(run, "checkpoint", None) or source, keep=STUDENT_ONLY)
        except CheckpointError as e:
            raise ValueError(f"{role}: the config's model must have the {role}'s architecture ({e}); "
                             f"use the {role}'s model section") from None
    return Teacher(run.model, run.objective, run.sampler)
