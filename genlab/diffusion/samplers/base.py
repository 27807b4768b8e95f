"""The sampler base class: the loop, progress bar, callbacks, generators and explicit state.

A sampler owns a time grid and a ``step``; everything else lives here. A step is written as

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor

and reaches the model, the random generator, the condition and the per-call state through ``ctx``
(``ctx.denoise``, ``ctx.combine``, ``ctx.noise``, ``ctx.state``). The state is created per call
(:meth:`Sampler.init_state`), never kept on the instance, so one sampler can run many samplings at
once, with per-sample times ([N + 1, B]), or inside a training step. Coefficients come from the
levels (floats on a grid shared by the batch, float64 [B] tensors per sample) and reach the data
through :func:`~genlab.diffusion.levels.combine`, which keeps the data's dtype.

A sampler declares what it is on its class: ``stochastic`` (draws fresh noise in its steps),
``multistep`` (a step reads earlier steps: history, stages or a corrector) and ``nfe_per_step``
(model calls per step); parameter-dependent answers are properties.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...core.bounds import PositiveInt
from ...core.errors import ConfigError, NonFiniteError
from ...core.registry import build, name_of, register_namespace
from ..denoiser import linear_path
from ..grids import GridSpec, TimeGrid, check_times
from ..levels import Level, Scalar, combine
from ..processes import Process


class DenoiserLike(Protocol):
    """What samplers need: ``denoiser(x, t, **cond) -> (x0, eps)`` and its ``process``.

    A denoiser may declare a fast path on its class, ``linear(x, t, **cond) -> (raw, (a_x0, b_x0,
    a_eps, b_eps))`` with x0 = a_x0 x + b_x0 raw and eps = a_eps x + b_eps raw (as
    :class:`~genlab.diffusion.Denoiser` does), or ``linear = None``; see
    :func:`~genlab.diffusion.denoiser.linear_path`.
    """

    process: Process

    def __call__(self, x: Tensor, t: Tensor | Level, **cond: Any) -> tuple[Tensor, Tensor]: ...


@dataclass
class SamplerState:
    """Per-sampling state: the step index, the number of steps and the multistep history.

    ``history`` holds (level, value) pairs, newest last; the value is whatever the sampler's
    method stores: x0 estimates for DPM-Solver++ and UniPC, eps for iPNDM (examples/new_sampler.py).
    """

    step: int = 0
    steps: int = 0
    history: list[tuple[Level, Tensor]] = field(default_factory=list)
    denoised: Tensor | None = None  # the latest x0 estimate, for callbacks
    track_denoised: bool = False  # a callback wants ``denoised`` every step


@dataclass
class StepContext:
    """What a step sees besides x and its two levels: the denoiser, the random generator, the
    condition (keyword arguments of the model) and the per-call state."""

    denoiser: DenoiserLike
    state: SamplerState
    generator: torch.Generator | None = None
    cond: dict[str, Any] = field(default_factory=dict)

    @property
    def process(self) -> Process:
        return self.denoiser.process

    def denoise(self, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(x0, eps) [B, ...] at (x, level); x0 is kept for callbacks."""
        x0, eps = self.denoiser(x, level, **self.cond)
        self.state.denoised = x0
        return x0, eps

    def combine(self, x: Tensor, level: Level, w_x0: Scalar, w_eps: Scalar) -> Tensor:
        """w_x0 x0 + w_eps eps at (x, level). Through the denoiser's linear fast path when it declares
        one and no callback asks for x0: two tensor operations on (x, raw)."""
        linear = None if self.state.track_denoised else linear_path(self.denoiser)
        if linear is None:
            x0, eps = self.denoise(x, level)
            return combine((w_x0, x0), (w_eps, eps))
        raw, (a_x0, b_x0, a_eps, b_eps) = linear(x, level, **self.cond)
        return combine((w_x0 * a_x0 + w_eps * a_eps, x), (w_x0 * b_x0 + w_eps * b_eps, raw))

    def x0(self, x: Tensor, level: Level) -> Tensor:
        """The x0 estimate [B, ...] alone (through the fast path when there is one: no eps computed);
        kept for callbacks."""
        x0 = self.combine(x, level, 1.0, 0.0)
        self.state.denoised = x0
        return x0

    def noise(self, x: Tensor) -> Tensor:
        """Standard normal noise like x [B, ...] (its dtype and device), drawn from the generator."""
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)

    def with_state(self, state: SamplerState) -> StepContext:
        """The same context with another state (a sub-solve inside a step, e.g. a restart)."""
        return dataclasses.replace(self, state=state)


@dataclass
class StepInfo:
    """What a callback receives after each step."""

    step: int
    x: Tensor
    denoised: Tensor | None
    level: Level
    level_next: Level


def non_finite(out: Tensor) -> bool:
    """Whether ``out`` holds NaN or inf: one reduction and one read on the host (a sync on an accelerator).
    False on the ``meta`` device, whose tensors have no values (device-generic code is run there)."""
    return not out.is_meta and not bool(torch.isfinite(out).all())


def non_finite_error(head: str, out: Tensor, start: Tensor | None) -> NonFiniteError:
    """The error for a result ``out`` [B, ...] holding NaN or inf (call it after :func:`non_finite`
    said so): ``head`` formatted with (number of bad samples, B), then the likely cause: non-finite ``start``
    (the input), else a diverged model."""
    bad = int((~torch.isfinite(out)).reshape(out.shape[0], -1).any(1).sum()) if out.ndim else 1
    head = head.format(bad, out.shape[0] if out.ndim else 1)
    if start is not None and not bool(torch.isfinite(start).all()):
        return NonFiniteError(f"{head}; the input x already held NaN or inf: pass finite values")
    return NonFiniteError(f"{head}; the model's output is probably non-finite (a diverged model: check the "
                          "checkpoint, and that the process and prediction type are those it was trained with). "
                          "Pass check_finite=False to get the values anyway")


class Sampler:
    """Base class of all samplers. Subclasses implement :meth:`step` (and may set ``default_grid``).

    Args:
        steps: number of steps (the grid has steps + 1 times), >= 1.
        grid: a :class:`TimeGrid` or its config (name or mapping); default: ``default_grid``.
    """

    default_grid: GridSpec = "uniform"
    nfe_per_step: int = 1  # model evaluations per step, for NFE budgets
    stochastic: bool = False  # draws fresh noise in its steps (then it has no inverse)
    multistep: bool = False  # a step reads earlier steps (history, stages, a corrector)

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None) -> None:
        self.steps = self.checked_steps(steps, "")
        self.grid: TimeGrid = build("grid", grid if grid is not None else self.default_grid, path="sampler.grid")

    def checked_steps(self, steps: int | None, where: str = ".sample") -> int:
        """``steps``, or this sampler's own for None; ValueError unless an integer >= 1."""
        if steps is None and where:
            return self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            own = f" (or None for the sampler's own {self.steps})" if where else ""
            raise ValueError(f"{type(self).__name__}{where}: steps must be an integer >= 1{own}, got {steps!r}")
        return steps

    def timesteps(self, process: Process, steps: int | None = None) -> Tensor:
        """The time grid [steps + 1] (float64, CPU) this sampler uses on ``process``. A grid with a
        ``for_sampler(sampler)`` method (a learned grid, stored per sampler) is asked through it.
        ValueError naming the grid unless its times decrease strictly within [0, t_max] of ``process``."""
        select = getattr(self.grid, "for_sampler", None)
        times = (self.grid if select is None else select(self))(process, self.checked_steps(steps, ".timesteps"))
        name = name_of("grid", type(self.grid)) or type(self.grid).__name__
        return check_times(f"{type(self).__name__}: grid '{name}'", times, process)

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        """One step of x [B, ...] from ``level`` to ``level_next`` (less noisy); returns x at level_next."""
        raise NotImplementedError

    def init_state(self, steps: int) -> SamplerState:
        """A fresh per-call state for ``steps`` steps (subclasses with more state return a subclass)."""
        return SamplerState(steps=steps)

    def context(self, denoiser: DenoiserLike, steps: int, generator: torch.Generator | None = None,
                cond: dict[str, Any] | None = None) -> StepContext:
        """A step context with a fresh state, for running steps by hand (inversion, tests)."""
        return StepContext(denoiser, self.init_state(steps), generator, dict(cond or {}))

    @torch.no_grad()
    def sample(self, denoiser: DenoiserLike, x: Tensor | None = None, *, shape: tuple[int, ...] | None = None,
               steps: int | None = None, times: Tensor | None = None, generator: torch.Generator | None = None,
               progress: bool = True, callback: Callable[[StepInfo], None] | None = None,
               cond: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, check_finite: bool = True) -> Tensor:
        """Integrate from x at the first time of the grid (default: a prior draw of ``shape`` in
        ``dtype`` on ``device``, default the generator's) to the last one and return x there
        [B, ...]. :meth:`integrate` without autograd.

        ``times`` overrides the grid: [N + 1] shared by the batch, or [N + 1, B] per sample.
        ``check_finite``: raise :class:`~genlab.core.errors.NonFiniteError` if the result holds NaN or
        inf (one ``isfinite`` reduction at the end, no check per step; see :func:`non_finite`); False
        returns it as it is.
        """
        out = self.integrate(denoiser, x, shape=shape, steps=steps, times=times, generator=generator,
                             progress=progress, callback=callback, cond=cond, dtype=dtype, device=device)
        if check_finite and non_finite(out):
            raise non_finite_error(f"{type(self).__name__}: {{}} of {{}} samples hold NaN or inf after sampling", out, x)
        return out

    def integrate(self, denoiser: DenoiserLike, x: Tensor | None = None, *, shape: tuple[int, ...] | None = None,
                  steps: int | None = None, times: Tensor | None = None, generator: torch.Generator | None = None,
                  progress: bool = False, callback: Callable[[StepInfo], None] | None = None,
                  cond: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Tensor:
        """The sampling loop of :meth:`sample`, differentiable: gradients reach ``x``, the model and
        ``times``. A shared grid [N + 1] that requires grad runs as per-sample times [N + 1, B]
        (a shared grid's coefficients are Python floats, which would cut the graph).
        """
        steps = self.checked_steps(steps)
        if x is None:
            if shape is None:
                raise ValueError("sample() needs x (the starting noise) or shape")
            x = denoiser.process.prior(shape, generator=generator, dtype=dtype, device=device)
        levels = self.levels(denoiser.process, x, steps, times)
        check_x0_defined(denoiser, levels[0])
        ctx = StepContext(denoiser, self.init_state(len(levels) - 1), generator, dict(cond or {}))
        ctx.state.track_denoised = callback is not None
        for i in tqdm(range(len(levels) - 1), disable=not progress, desc=type(self).__name__, leave=False):
            x = self.step(ctx, x, levels[i], levels[i + 1])
            ctx.state.step = i + 1
            if callback is not None:
                callback(StepInfo(i, x, ctx.state.denoised, levels[i], levels[i + 1]))
        return x

    def levels(self, process: Process, x: Tensor, steps: int | None = None, times: Tensor | None = None) -> list[Level]:
        """The levels of the grid (``times`` or this sampler's own), float64: a shared grid on the CPU,
        per-sample times [N + 1, B] on x's device."""
        times = self.timesteps(process, steps) if times is None else (
            times if torch.is_tensor(times) else torch.tensor(times, dtype=torch.float64))
        if times.ndim not in (1, 2) or len(times) < 2:
            raise ValueError(f"times must be a grid [N + 1] or per sample [N + 1, B] with N >= 1, got shape "
                             f"{list(times.shape)}")
        if times.ndim == 2 and times.shape[1] != x.shape[0]:
            raise ValueError(f"per-sample times must be [N + 1, B] with B = {x.shape[0]}, got {list(times.shape)}")
        if times.ndim == 1 and times.requires_grad:
            times = times[:, None].expand(-1, x.shape[0])
        grid = process.level(times if times.ndim == 2 else times.cpu())
        return (grid if grid.t.ndim == 1 else grid.to(device=x.device)).steps()

    def options(self) -> dict[str, Any]:
        """The constructor's arguments other than steps and grid, read back from the attributes of the
        same names, where they are plain values (bool, int, float, str): what configures the method."""
        out = {}
        for name in list(inspect.signature(type(self).__init__).parameters)[1:]:
            value = getattr(self, name, None)
            if name not in ("steps", "grid") and isinstance(value, (bool, int, float, str)):
                out[name] = value
        return out

    def __repr__(self) -> str:
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = "".join(f", {k}={v!r}" for k, v in self.options().items() if defaults.get(k) != v)
        return f"{type(self).__name__}(steps={self.steps}, grid={type(self.grid).__name__}{changed})"


def check_x0_defined(denoiser: Any, level: Level) -> None:
    """ConfigError where ``denoiser`` cannot give x0 at ``level`` (the grid's first): an ``eps`` or ``score``
    model (without EDM preconditioning) where alpha = 0, since x0 = (x - sigma eps) / alpha there is 0 / 0
    (rectified flow from t = 1, say); every sampler would return NaN."""
    prediction = getattr(denoiser, "prediction", None)
    if prediction not in ("eps", "score") or getattr(denoiser, "preconditioning", None) == "edm":
        return
    if bool((level.alpha == 0).any()):
        t = level.t.max().item()
        raise ConfigError(f"a model predicting {prediction} gives no x0 where alpha = 0, and the grid starts there "
                          f"(t = {t:g} on {denoiser.process!r}); start the grid below (grid.t_max < {t:g}) or use a "
                          "model that predicts velocity, v or x0")


register_namespace("sampler", Sampler, "samplers: a time grid and a step, on any process and prediction")
