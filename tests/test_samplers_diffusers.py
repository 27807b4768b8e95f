"""Peer oracle: genlab's samplers reproduce diffusers' schedulers step by step (float64).

The same deterministic model function and the same grid (diffusers' timesteps, genlab's process
built from diffusers' own ``alphas_cumprod``) must give the same sample after every step.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genlab.diffusion import DDIM, DDPMGrid, DiscreteVP, DPMSolverPP, Euler, Heun  # noqa: E402
from genlab.testing.peers import assert_steps_close, ddpm_times, run_diffusers, run_genlab  # noqa: E402
from genlab.testing.peers import set_timesteps_float64  # noqa: E402
from genlab.testing.peers import smooth_eps_model as model_fn  # noqa: E402


X = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_matches_diffusers(spacing, eta, schedule):
    sched = diffusers.DDIMScheduler(beta_schedule=schedule, timestep_spacing=spacing, clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0)
    set_timesteps_float64(sched, 10)
    theirs = run_diffusers_ddim(sched, X, eta)
    ours = run_genlab(DDIM(10, eta=eta), sched, X, ddpm_times(sched), torch.Generator().manual_seed(7))
    assert_steps_close(ours, theirs)
    # the same grid comes from genlab's own DDPM grid
    grid = DDPMGrid(spacing)(DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist()), 10)
    assert torch.allclose(grid, ddpm_times(sched), atol=1e-12)


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
    ours = run_genlab(sampler, sched, X, ddpm_times(sched))
    assert_steps_close(ours, theirs)
