"""Running diffusers' schedulers at float64 so that algorithms, not roundings, are compared.

diffusers builds its tables in float32, rounds sigmas to float32, and casts the sample to float32
inside ``step()``. These helpers keep the peer's own grid and algorithm but in float64. They
touch only attributes of the scheduler object passed in; diffusers itself is not imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class KeepFloat64(torch.Tensor):
    """A sample whose ``.to(torch.float32)`` is a no-op (``x.as_subclass(KeepFloat64)``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.Tensor.to and (torch.float32 in args[1:] or kwargs.get("dtype") is torch.float32):
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def set_timesteps_float64(scheduler: Any, steps: int) -> Any:
    """``scheduler.set_timesteps(steps)`` with float64 ``alphas_cumprod`` and sigmas on the same grid
    (Karras sigma = sqrt((1 - ab) / ab), linear in the step index, as diffusers interpolates)."""
    for name in ("alphas_cumprod", "final_alpha_cumprod"):
        if torch.is_tensor(getattr(scheduler, name, None)):
            setattr(scheduler, name, getattr(scheduler, name).double())
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas"):
        ab = scheduler.alphas_cumprod.double().numpy()
        inner = np.interp(scheduler.timesteps.double().numpy(), np.arange(len(ab)), np.sqrt((1 - ab) / ab))
        scheduler.sigmas = torch.from_numpy(np.append(inner, scheduler.sigmas[-1].item()))
    return scheduler


# ----- step-by-step comparison of a genlab sampler with a diffusers scheduler -------------------------
def smooth_eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, time-dependent eps model [B, ...] for comparisons; t is the DDPM step index
    (diffusers' timestep, genlab's DDPM model time)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.sin(1.3 * x) * (1 + t / 1000) + 0.1 * x - 0.05 * torch.cos(t / 100)


def ddpm_times(scheduler: Any) -> torch.Tensor:
    """genlab times [N + 1] of a diffusers scheduler's integer timesteps, ending at the data (t = 0)."""
    t = (scheduler.timesteps.double() + 1) / scheduler.config.num_train_timesteps
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def run_diffusers(scheduler: Any, x: torch.Tensor, generator: torch.Generator | None = None, scaled: bool = False,
                  model: Any = smooth_eps_model) -> list[torch.Tensor]:
    """A diffusers scheduler's loop from x (float64, see :class:`KeepFloat64`); the sample after each
    completed step, in the process's units (``scaled``: schedulers that work on x / alpha, as Euler and
    Heun, are mapped back with each step's alpha)."""
    sample = x / scheduler.sigmas[0].double().pow(2).add(1).rsqrt() if scaled else x.clone()
    sample = sample.as_subclass(KeepFloat64)
    out = []
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(sample, t)
        kwargs = {} if generator is None else {"generator": generator}
        sample = scheduler.step(model(inp, t), t, sample, **kwargs).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or i == len(scheduler.timesteps) - 1:
            out.append(sample.as_subclass(torch.Tensor))
    if scaled:
        sigmas = scheduler.sigmas.double()
        if hasattr(scheduler, "state_in_first_order"):
            sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
        out = [s * (1 + sig**2).rsqrt() for s, sig in zip(out, sigmas[1:])]
    return out


def run_genlab(sampler: Any, scheduler: Any, x: torch.Tensor, times: torch.Tensor,
               generator: torch.Generator | None = None, model: Any = smooth_eps_model,
               prediction: str = "eps") -> list[torch.Tensor]:
    """genlab's ``sampler`` from x on ``times``, with the process built from the scheduler's own
    ``alphas_cumprod``; the sample after each step."""
    from genlab.diffusion import Denoiser, DiscreteVP

    process = DiscreteVP(alphas_cumprod=scheduler.alphas_cumprod.double().tolist())
    out: list[torch.Tensor] = []
    sampler.sample(Denoiser(model, process, prediction), x.clone(), times=times, generator=generator, progress=False,
                   callback=lambda info: out.append(info.x))
    return out


def assert_steps_close(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float = 1e-5) -> None:
    """The same number of steps, and after each one max |ours - theirs| < tol."""
    assert len(ours) == len(theirs) > 0, (len(ours), len(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).abs().max().item()
        assert err < tol, f"step {i}: max |genlab - diffusers| = {err:.3e}"
