"""The sampler base class: the loop, progress bar, callbacks, generators and explicit state.

A sampler owns a time grid and a ``step``; everything else lives here. Multistep history is kept
in a :class:`SamplerState` created per call, never on the instance, so one sampler can run many
samplings at once, with per-sample times ([B]), or inside a training step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...core.registry import build, register_namespace
from ..grids import GridSpec, TimeGrid
from ..predictions import broadcast, combine
from ..processes import Level, Process


class DenoiserLike(Protocol):
    """What samplers need: ``denoiser(x, level, **cond) -> (x0, eps)`` and its ``process``."""

    process: Process

    def __call__(self, x: Tensor, t: Tensor | Level, **cond: Any) -> tuple[Tensor, Tensor]: ...


@dataclass
class SamplerState:
    """Per-sampling state: the step index, the number of steps and the multistep history."""

    step: int = 0
    steps: int = 0
    history: list[tuple[Level, Tensor]] = field(default_factory=list)  # (level, x0), newest last
    denoised: Tensor | None = None  # the latest x0 estimate, for callbacks
    track_denoised: bool = False  # a callback wants ``denoised`` every step


@dataclass
class StepInfo:
    """What a callback receives after each step."""

    step: int
    x: Tensor
    denoised: Tensor | None
    level: Level
    level_next: Level


class Sampler:
    """Base class of all samplers. Subclasses implement :meth:`step` (and may set ``default_grid``).

    Args:
        steps: number of steps (the grid has steps + 1 times).
        grid: a :class:`TimeGrid` or its config (name or mapping); default: ``default_grid``.
    """

    default_grid: GridSpec = "uniform"
    nfe_per_step: int = 1  # model evaluations per step, for NFE budgets

    def __init__(self, steps: int = 20, grid: GridSpec | None = None) -> None:
        self.steps = steps
        self.grid: TimeGrid = build("grid", grid if grid is not None else self.default_grid, path="sampler.grid")

    def timesteps(self, process: Process, steps: int | None = None) -> Tensor:
        """The time grid [steps + 1] (float64) this sampler uses on ``process``. A grid with a
        ``for_sampler(sampler)`` method (a learned grid, stored per sampler) is asked through it."""
        select = getattr(self.grid, "for_sampler", None)
        return (self.grid if select is None else select(self))(process, steps or self.steps)

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        """One step from ``level`` to ``level_next`` (less noisy); returns x at level_next."""
        raise NotImplementedError

    def denoise(self, denoiser: DenoiserLike, x: Tensor, level: Level, state: SamplerState,
                cond: dict[str, Any] | None) -> tuple[Tensor, Tensor]:
        """Call the denoiser and remember its x0 for callbacks."""
        x0, eps = denoiser(x, level, **(cond or {}))
        state.denoised = x0
        return x0, eps

    def denoise_combine(self, denoiser: DenoiserLike, x: Tensor, level: Level, state: SamplerState,
                        cond: dict[str, Any] | None, w_x0: Tensor | float, w_eps: Tensor | float) -> Tensor:
        """w_x0 x0 + w_eps eps at (x, level). With a :class:`Denoiser` (linear in its raw output)
        and no callback asking for x0, this is two tensor operations on (x, raw)."""
        linear = getattr(denoiser, "linear", None)
        if linear is None or state.track_denoised:
            x0, eps = self.denoise(denoiser, x, level, state, cond)
            return combine((w_x0, x0), (w_eps, eps))
        raw, (a_x0, b_x0, a_eps, b_eps) = linear(x, level, **(cond or {}))
        return combine((w_x0 * a_x0 + w_eps * a_eps, x), (w_x0 * b_x0 + w_eps * b_eps, raw))

    @staticmethod
    def noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Standard normal noise like x, drawn from ``generator``."""
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    @torch.no_grad()
    def sample(self, denoiser: DenoiserLike, x: Tensor | None = None, *, shape: tuple[int, ...] | None = None,
               steps: int | None = None, times: Tensor | None = None, generator: torch.Generator | None = None,
               progress: bool = True, callback: Callable[[StepInfo], None] | None = None,
               cond: dict[str, Any] | None = None) -> Tensor:
        """Integrate from x at the first time of the grid (default: a prior draw of ``shape``) to
        the last one and return x there [B, ...]. :meth:`integrate` without autograd.

        ``times`` overrides the grid: [N + 1] shared by the batch, or [N + 1, B] per sample.
        """
        return self.integrate(denoiser, x, shape=shape, steps=steps, times=times, generator=generator,
                              progress=progress, callback=callback, cond=cond)

    def integrate(self, denoiser: DenoiserLike, x: Tensor | None = None, *, shape: tuple[int, ...] | None = None,
                  steps: int | None = None, times: Tensor | None = None, generator: torch.Generator | None = None,
                  progress: bool = False, callback: Callable[[StepInfo], None] | None = None,
                  cond: dict[str, Any] | None = None) -> Tensor:
        """The sampling loop of :meth:`sample`, differentiable: gradients reach ``x``, the model and
        ``times``. A shared grid [N + 1] that requires grad runs as per-sample times [N + 1, B]
        (the shared-grid fast path turns levels into Python floats, which would cut the graph).
        """
        process = denoiser.process
        if x is None:
            if shape is None:
                raise ValueError("sample() needs x (the starting noise) or shape")
            x = process.prior(shape, generator=generator)
        times = self.timesteps(process, steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
        if times.ndim == 2 and times.shape[1] != x.shape[0]:
            raise ValueError(f"per-sample times must be [N + 1, B] with B = {x.shape[0]}, got {list(times.shape)}")
        if times.ndim == 1 and times.requires_grad:
            times = times[:, None].expand(-1, x.shape[0])
        levels = process.level(times.to(x.device)).to(dtype=x.dtype).steps()
        state = self.init_state(len(times) - 1)
        state.track_denoised = callback is not None
        for i in tqdm(range(len(times) - 1), disable=not progress, desc=type(self).__name__, leave=False):
            x = self.step(denoiser, x, levels[i], levels[i + 1], state, generator, cond)
            state.step = i + 1
            if callback is not None:
                callback(StepInfo(i, x, state.denoised, levels[i], levels[i + 1]))
        return x

    def init_state(self, steps: int) -> SamplerState:
        return SamplerState(steps=steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, grid={type(self.grid).__name__})"


register_namespace("sampler", Sampler, "samplers: a time grid and a step, on any process and prediction")


def bc(value: Tensor, x: Tensor) -> Tensor:
    """Short alias of :func:`genlab.diffusion.predictions.broadcast` for step formulas."""
    return broadcast(value, x)
