"""Inversion and editing with any sampler: DDIM inversion (data -> noise -> data) and SDEdit.

``invert`` encodes data into the sampler's starting noise by running the sampler's own step formula
backwards along its grid, from less to more noise (DDIM inversion: Song et al. 2021, Sec. 4.3 and
5.4; the DDIM, Euler, Heun and DPM-Solver++ steps are valid for an increasing step too). Plain
inversion evaluates the model at the current point where the forward step evaluates it at the
other end, so regeneration is off by the solver's error, O(h^p). Two refinements remove it:
``fixed_point_iters`` solves each step's implicit equation step_i(y) = x (Pan et al. 2023, "Effective
Real Image Editing with Accelerated Iterative Diffusion Inversion", AIDI), for one-step samplers;
``corrections`` corrects the whole inversion by defect correction, for every deterministic sampler.
``sdedit`` noises an input to an intermediate level and samples back (Meng et al. 2022, Alg. 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .levels import Level, combine
from .processes import Process
from .samplers.base import DenoiserLike, Sampler

def check_deterministic(sampler: Sampler) -> None:
    """Raise ValueError if ``sampler`` declares itself stochastic (it adds fresh noise in its steps,
    so it has no inverse). :func:`invert` also checks, after running, that no step drew from the
    generator it was given."""
    if sampler.stochastic:
        raise ValueError(f"{sampler!r} is stochastic (it adds fresh noise in its steps), so it has no inverse. "
                         "Invert with a deterministic sampler (ddim with eta=0, euler or heun with s_churn=0, "
                         "dpm_solver_pp, unipc, flow_euler); sdedit accepts any sampler")


def edit_times(sampler: Sampler, process: Process, strength: float | None = None, *, t_start: float | None = None,
               steps: int | None = None, times: Tensor | None = None) -> Tensor:
    """The part of the sampler's grid that an edit or a partial inversion runs: [k + 1] or [k + 1, B].

    The grid is ``times`` ([N + 1] or per sample [N + 1, B], decreasing) or the sampler's own for
    ``steps``. ``strength`` in [0, 1] keeps its last k = floor(strength N) steps (diffusers'
    img2img convention; strength 1 is the whole grid, 0 no step); ``t_start`` in [0, t_max]
    starts at that time and continues on the grid's times below it; neither: the whole grid.
    """
    times = sampler.timesteps(process, steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    if times.ndim not in (1, 2) or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"times must be a decreasing grid [N + 1] or [N + 1, B] (noise to data), N >= 1; got "
                         f"shape {list(times.shape)}: {times.tolist() if times.numel() <= 8 else '...'}")
    if strength is not None and t_start is not None:
        raise ValueError("give either strength (a fraction of the grid's steps) or t_start (a time), not both")
    if strength is not None:
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1] (the fraction of the grid's steps to run), got {strength}")
        n = len(times) - 1
        return times[n - min(math.floor(n * strength + 1e-9), n):]
    if t_start is not None:
        if times.ndim != 1:
            raise ValueError("t_start needs a grid shared by the batch; for per-sample starts pass times [N + 1, B]")
        if not 0 <= t_start <= process.t_max:
            raise ValueError(f"t_start must be in [0, t_max = {process.t_max:g}] of {process}, got {t_start}")
        return torch.cat([torch.tensor([float(t_start)], dtype=torch.float64), times[times < t_start]])
    return times


def _solve_step(sampler: Sampler, denoiser: DenoiserLike, levels: list[Level], i: int, target: Tensor, y: Tensor,
                iters: int, memory: int, generator: torch.Generator, cond: dict[str, Any] | None) -> Tensor:
    """Solve step_i(y) = target for y [B, ...] from a guess, by ``iters`` evaluations of the
    sampler's forward step i (levels[i] -> levels[i + 1]).

    The fixed-point map is G(y) = y + r(y), r = target - step_i(y). A small ODE step is near the
    identity, so G contracts at rate |1 - d step_i / dy|; a large step across the separation of
    modes can have d step_i / dy > 2, where G diverges. Anderson acceleration (Walker & Ni 2011,
    type II, per sample, over the last ``memory`` differences; AIDI uses it too) converges there:
    y <- G(y) - (dY + dR) gamma, gamma = argmin |r - dR gamma|. A sample whose last evaluated
    iterate is not its best (least |r|) returns its best instead of the last update.
    """
    batch, shape = y.shape[0], y.shape
    d_y: list[Tensor] = []
    d_r: list[Tensor] = []
    flat, prev = y.reshape(batch, -1), None
    for _ in range(iters):
        ctx = sampler.context(denoiser, len(levels) - 1, generator, cond)
        ctx.state.step = i
        r = target - sampler.step(ctx, flat.reshape(shape), levels[i], levels[i + 1])
        r = r.reshape(batch, -1)
        norm = r.norm(dim=1)
        if prev is None:
            best, best_norm = flat, norm
        else:
            best, best_norm = torch.where((norm < best_norm)[:, None], flat, best), torch.minimum(norm, best_norm)
            if memory > 0:
                d_y, d_r = [*d_y, flat - prev[0]][-memory:], [*d_r, r - prev[1]][-memory:]
        prev, step = (flat, r), r
        if d_r:
            dr, dy = torch.stack(d_r, -1), torch.stack(d_y, -1)  # [B, D, m]
            rtol = max(1e-10, 1e3 * torch.finfo(r.dtype).eps)
            gamma = torch.linalg.pinv(dr.mT @ dr, rtol=rtol, hermitian=True) @ (dr.mT @ r.unsqueeze(-1))
            step = r - ((dy + dr) @ gamma).squeeze(-1)
        flat = flat + step
    return torch.where((norm <= best_norm)[:, None], flat, best).reshape(shape)


@torch.no_grad()
def invert(sampler: Sampler, denoiser: DenoiserLike, x0: Tensor, *, strength: float | None = None,
           t_start: float | None = None, steps: int | None = None, times: Tensor | None = None,
           cond: dict[str, Any] | None = None, fixed_point_iters: int = 0, anderson_memory: int = 2,
           corrections: int = 0, progress: bool = True) -> Tensor:
    """Encode data x0 [B, ...] into the x [B, ...] at the start of the sampler's grid such that
    ``sampler.sample(denoiser, x, times=edit_times(sampler, process, strength, ...))`` (the same
    grid arguments) returns x0 again.

    Plain (the defaults): the sampler's steps on the reversed grid (a multistep sampler with its
    own history from the inverse run); regeneration is then off by the solver's error (O(h) for
    DDIM: 3e-2 RMS at 100 steps on a ring mixture, see tests/test_editing.py).

    ``fixed_point_iters=k``: each inverse step starts from the sampler's reversed step and makes k
    more model calls solving step_i(y) = x exactly (see :func:`_solve_step`); one-step samplers
    only, since a multistep forward step also reads x0 at earlier, noisier points that inversion
    reaches later. ``corrections=c``: c rounds of defect correction of the whole inversion Inv,
    y <- y + Inv(x0) - Inv(sample(y)) (2 N steps each); for every deterministic sampler, converging
    when the round trip is near the identity (fine grids; not where the flow separates modes).

    The data sits at t = 0 (sigma = 0), where eps and the backward step are undefined: when the grid
    ends there, the first inverse step solves step_{N-1}(y) = x0 from y = alpha_{N-1} x0 by 1 + k
    fixed-point iterations. A grid that ends at t > 0 (``final="min"``) takes x0 as the sample there.

    Args:
        sampler: a deterministic sampler (see :func:`check_deterministic`).
        strength, t_start, steps, times: the grid, as in :func:`edit_times`; strength < 1 (or a
            t_start) gives a partial inversion to an intermediate noise level.
        cond: conditioning passed to the denoiser.
        fixed_point_iters, anderson_memory: refinement per step; memory 0 is plain iteration.
        corrections: global defect-correction rounds.
    """
    check_deterministic(sampler)
    if fixed_point_iters < 0 or corrections < 0 or anderson_memory < 0:
        raise ValueError(f"fixed_point_iters, corrections and anderson_memory must be >= 0, got "
                         f"{fixed_point_iters}, {corrections}, {anderson_memory}")
    if fixed_point_iters and sampler.multistep:
        raise ValueError(f"fixed_point_iters needs a one-step sampler; {sampler!r} is multistep (its step reads "
                         "x0 at earlier points that inversion reaches later). Use corrections=... instead")
    times = edit_times(sampler, denoiser.process, strength, t_start=t_start, steps=steps, times=times)
    n = len(times) - 1
    if times.ndim == 2 and times.shape[1] != x0.shape[0]:
        raise ValueError(f"per-sample times must be [N + 1, B] with B = {x0.shape[0]}, got {list(times.shape)}")
    if n == 0:
        return x0.clone()
    levels = sampler.levels(denoiser.process, x0, times=times)
    if levels[n].touches_data and not levels[n].at_data:
        raise ValueError("per-sample times must all end at the data (sigma = 0) or all above it")
    probe = torch.Generator(device=x0.device)  # a stochastic step would draw from it
    before = probe.get_state()

    def inverse(x: Tensor) -> Tensor:
        start = n
        if levels[n].at_data:
            start = n - 1
            x = _solve_step(sampler, denoiser, levels, start, x, combine((levels[start].coef("alpha")[0], x)),
                            1 + fixed_point_iters, anderson_memory, probe, cond)
        if not fixed_point_iters:
            return sampler.sample(denoiser, x, times=times[:start + 1].flip(0), generator=probe, progress=progress,
                                  cond=cond)
        for i in tqdm(range(start - 1, -1, -1), disable=not progress, desc="invert", leave=False):
            ctx = sampler.context(denoiser, n, probe, cond)
            ctx.state.step = n - 1 - i
            guess = sampler.step(ctx, x, levels[i + 1], levels[i])
            x = _solve_step(sampler, denoiser, levels, i, x, guess, fixed_point_iters, anderson_memory, probe, cond)
        return x

    first = y = inverse(x0)
    for _ in range(corrections):
        regenerated = sampler.sample(denoiser, y, times=times, generator=probe, progress=False, cond=cond)
        y = y + (first - inverse(regenerated))
    if not torch.equal(probe.get_state(), before):
        raise ValueError(f"{sampler!r} drew random noise during inversion: it is stochastic and has no inverse")
    return y


@torch.no_grad()
def sdedit(sampler: Sampler, denoiser: DenoiserLike, x: Tensor, strength: float | None = None, *,
           t_start: float | None = None, steps: int | None = None, times: Tensor | None = None,
           generator: torch.Generator | None = None, noise: Tensor | None = None,
           cond: dict[str, Any] | None = None, progress: bool = True) -> Tensor:
    """SDEdit (Meng et al. 2022, Alg. 1, here for every process): x_t = alpha_t x + sigma_t z at the
    first time of the edit grid (:func:`edit_times`), then the sampler (any, stochastic ones too)
    down to the data. x: [B, ...] -> [B, ...].

    ``strength`` (fraction of the grid's steps), ``t_start`` (a time) or an explicit ``times`` grid
    ([N + 1] or per sample [N + 1, B], which gives per-sample start levels) sets the start. z is
    ``noise`` or the first draw from ``generator``, which the sampler then continues to use; so at
    strength 1 on a process with alpha(t_max) = 0 this equals sampling from the prior with the same
    generator. Strength 0 (no step) returns a copy of x.
    """
    if strength is None and t_start is None and times is None:
        raise ValueError("sdedit needs strength (in [0, 1]), t_start (a time) or times (the grid to run)")
    times = edit_times(sampler, denoiser.process, strength, t_start=t_start, steps=steps, times=times)
    if len(times) == 1:
        return x.clone()
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {list(x.shape)}, got {list(noise.shape)}")
    level = sampler.levels(denoiser.process, x, times=times)[0]
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if noise is None else noise
    x_t = combine(*zip(level.coef("alpha", "sigma"), (x, z)))
    return sampler.sample(denoiser, x_t, times=times, generator=generator, progress=progress, cond=cond)
