"""Peer oracle: genlab's samplers reproduce diffusers' schedulers step by step (float64).

The same deterministic model function and the same grid (diffusers' timesteps, genlab's process
built from diffusers' own ``alphas_cumprod``) must give the same sample after every step.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genlab.diffusion import DDIM, DDPMGrid, Denoiser, DiscreteVP, DPMSolverPP, Euler, Heun  # noqa: E402
from genlab.testing.peers import KeepFloat64, set_timesteps_float64  # noqa: E402


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, time-dependent eps model; t is the DDPM step index (diffusers' timestep)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.sin(1.3 * x) * (1 + t / 1000) + 0.1 * x - 0.05 * torch.cos(t / 100)


def run_diffusers(scheduler, x, generator=None, scaled=False):
    """Run a diffusers scheduler loop; returns samples after each completed step (VP space)."""
    sample = x / scheduler.sigmas[0].double().pow(2).add(1).rsqrt() if scaled else x.clone()
    sample = sample.as_subclass(KeepFloat64)
    out = []
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(sample, t)
        kwargs = {} if generator is None else {"generator": generator}
        sample = scheduler.step(model_fn(inp, t), t, sample, **kwargs).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or i == len(scheduler.timesteps) - 1:
            out.append(sample.as_subclass(torch.Tensor))
    if scaled:  # diffusers' Euler / Heun work on x / alpha; map back with alpha of each step
        sigmas = scheduler.sigmas.double()
        if hasattr(scheduler, "state_in_first_order"):
            sigmas = torch.cat([sigmas[:1], sigmas[1::2]])
        out = [s * (1 + sig**2).rsqrt() for s, sig in zip(out, sigmas[1:])]
    return out


def run_genlab(sampler, scheduler, x, times, generator=None):
    process = DiscreteVP(alphas_cumprod=scheduler.alphas_cumprod.double().tolist())
    denoiser = Denoiser(model_fn, process, "eps")
    out = []
    sampler.sample(denoiser, x.clone(), times=times, generator=generator, progress=False,
                   callback=lambda info: out.append(info.x))
    return out


def assert_steps_close(ours, theirs, tol=1e-5):
    assert len(ours) == len(theirs) > 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).abs().max().item()
        assert err < tol, f"step {i}: max |genlab - diffusers| = {err:.3e}"


def ddpm_times(scheduler, steps):
    """genlab times of diffusers' integer timesteps, ending at the data (t = 0)."""
    t = (scheduler.timesteps.double() + 1) / scheduler.config.num_train_timesteps
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


X = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_matches_diffusers(spacing, eta, schedule):
    sched = diffusers.DDIMScheduler(beta_schedule=schedule, timestep_spacing=spacing, clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0)
    set_timesteps_float64(sched, 10)
    theirs = run_diffusers_ddim(sched, X, eta)
    ours = run_genlab(DDIM(10, eta=eta), sched, X, ddpm_times(sched, 10), torch.Generator().manual_seed(7))
    assert_steps_close(ours, theirs)
    # the same grid comes from genlab's own DDPM grid
    grid = DDPMGrid(spacing)(DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist()), 10)
    assert torch.allclose(grid, ddpm_times(sched, 10), atol=1e-12)


def run_diffusers_ddim(sched, x, eta):
    g, sample, out = torch.Generator().manual_seed(7), x.clone(), []
    for t in sched.timesteps:
        sample = sched.step(model_fn(sample, t), t, sample, eta=eta, generator=g).prev_sample
        out.append(sample)
    return out


@pytest.mark.parametrize("sampler_cls, scheduler_cls", [(Euler, "EulerDiscreteScheduler"),
                                                         (Heun, "HeunDiscreteScheduler")])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_euler_heun_match_diffusers(sampler_cls, scheduler_cls, schedule):
    sched = getattr(diffusers, scheduler_cls)(beta_schedule=schedule, timestep_spacing="linspace")
    set_timesteps_float64(sched, 12)
    theirs = run_diffusers(sched, X, scaled=True)
    process = DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist())
    times = torch.cat([(sched.timesteps[:: 1 if sampler_cls is Euler else 2].double() + 1) / 1000, torch.zeros(1)])
    ours = run_genlab(sampler_cls(12), sched, X, times)
    assert_steps_close(ours, theirs)
    # genlab's own "linspace" grid is diffusers' grid (which diffusers rounds to float32)
    assert torch.allclose(DDPMGrid("linspace")(process, 12), times.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_pp_matches_diffusers(order, steps):
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++",
                                                  lower_order_final=True)
    set_timesteps_float64(sched, steps)
    theirs = run_diffusers(sched, X)
    sampler = DPMSolverPP(steps, order=order, third_order="reference")
    ours = run_genlab(sampler, sched, X, ddpm_times(sched, steps))
    assert_steps_close(ours, theirs)
