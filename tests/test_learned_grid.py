"""Learned time grids: gradients reach the times, the teacher is exact, a learned grid beats its
start on held-out noise, and grids round-trip through files, checkpoints, the registry and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import GRIDS_FILE, latest_checkpoint, save_checkpoint
from genlab.core.errors import ConfigError
from genlab.core.registry import build
from genlab.diffusion import DDIM, DDPM, VP, DiscreteVP, DPMSolverPP, Heun
from genlab.diffusion.learned_grid import (GridParameters, LearnedGrid, learn_grid, load_grids, reference_solve,
                                           rms_error, sampler_spec, save_grid, stratified_batch, t_of_log_snr)
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution

RING = GaussianMixture.ring()


def noise(process, n, seed):
    return process.prior((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("make", [lambda: DDIM(3), lambda: DPMSolverPP(3, order=2), lambda: Heun(3)],
                         ids=["ddim", "dpm_solver_pp_2m", "heun"])
def test_gradients_reach_the_times(make):
    """d sample / d times by autograd equals finite differences (smooth VP, exact mixture eps)."""
    process, sampler = VP(), make()
    den = exact_denoiser(GaussianMixture.ring(k=3, std=0.4), process)
    x = noise(process, 4, 0)
    inner = torch.tensor([0.6, 0.2], dtype=torch.float64, requires_grad=True)
    ends = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def run(inner):
        return sampler.integrate(den, x, times=torch.cat([ends[:1], inner, ends[1:]]))

    assert torch.autograd.gradcheck(run, (inner,), eps=1e-6, atol=1e-6, rtol=1e-4)
    # with a detached grid, integrate is sample (the shared-grid fast path) to rounding
    times = torch.cat([ends[:1], inner.detach(), ends[1:]])
    assert torch.allclose(run(inner).detach(), sampler.sample(den, x, times=times, progress=False), atol=1e-12)
    assert not sampler.sample(den, x, times=torch.cat([ends[:1], inner, ends[1:]]), progress=False).requires_grad


@pytest.mark.parametrize("process", [VP(), DiscreteVP()], ids=["vp", "ddpm"])
def test_grid_parameters_are_monotone_and_differentiable(process):
    lam = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64, requires_grad=True)
    t = t_of_log_snr(process, lam)
    assert torch.allclose(process.log_snr(t.detach()), lam.detach(), atol=1e-8)
    assert torch.autograd.gradcheck(lambda v: t_of_log_snr(process, v), (lam,), eps=1e-7, atol=1e-7, rtol=1e-4)
    start = DPMSolverPP(6).timesteps(process)
    grid = GridParameters(process, start)
    assert torch.allclose(grid(), start, atol=1e-9)  # it starts where it was put
    with torch.no_grad():
        grid.theta.copy_(torch.randn(6, generator=torch.Generator().manual_seed(0)) * 3)
    times = grid()
    assert times[0] == start[0] and times[-1] == 0 and (times.diff() < 0).all()


def test_reference_solve_matches_exact_ode():
    """The teacher (DPM-Solver++ 3M, Richardson-extrapolated) against scipy's DOP853 solution; its
    own error estimate is an upper bound."""
    process = DiscreteVP()
    den, x = exact_denoiser(RING, process), noise(process, 32, 1)
    ref, estimate = reference_solve(den, x, steps=400)
    err = (ref - exact_ode_solution(RING, process, x, 1.0, 0.0)).pow(2).mean().sqrt().item()
    assert err < 1e-5 and err < estimate < 1e-4, (err, estimate)


@pytest.fixture(scope="module")
def ring_problem():
    """DDPM linear (diffusers' table), exact eps, 128 training and 512 held-out start noises."""
    process = DiscreteVP()
    den = exact_denoiser(RING, process)
    x, x_test = noise(process, 128, 0), noise(process, 512, 1)
    return den, x, reference_solve(den, x, 200)[0], x_test, reference_solve(den, x_test, 200)[0]


@pytest.mark.parametrize("sampler, nfe, factor", [(DDIM(4), 4, 2.5), (DPMSolverPP(5, order=2), 5, 4.0),
                                                  (Heun(4), 8, 10.0)], ids=["ddim", "dpm_solver_pp_2m", "heun"])
def test_learned_grid_beats_its_start_on_heldout_noise(ring_problem, sampler, nfe, factor):
    den, x, ref, x_test, ref_test = ring_problem
    fit = learn_grid(den, sampler, nfe, x=x, reference=ref, evaluations=60)
    assert len(fit.times) == nfe // sampler.nfe_per_step + 1 and fit.times[0] == 1 and fit.times[-1] == 0
    start, learned = (rms_error(sampler, den, t, x_test, ref_test) for t in (fit.start, fit.times))
    assert start / learned > factor, (start, learned)
    assert fit.rms_learned < fit.rms_start


def test_stratified_batch_keeps_the_hard_samples_and_is_unbiased():
    errors = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors[[3, 500, 999]] = 100.0  # rare trajectories that switch modes
    g = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(400):
        index, weights = stratified_batch(errors, 64, g)
        assert {3, 500, 999} <= set(index[:16].tolist()) and len(set(index.tolist())) == 64
        assert abs(weights.sum().item() - 1) < 1e-12
        estimates.append((weights * errors[index]).sum().item())
    mean = torch.tensor(estimates).mean().item()
    assert abs(mean - errors.mean().item()) < 0.01 * errors.mean().item()
    index, weights = stratified_batch(errors[:50], 64, g)  # a pool no larger than the batch: all of it
    assert index.tolist() == list(range(50)) and torch.allclose(weights, torch.full((50,), 1 / 50, dtype=torch.float64))


def test_learn_grid_rejects_too_few_steps(ring_problem):
    den, x, ref, *_ = ring_problem
    with pytest.raises(ConfigError, match="at least 2 steps"):
        learn_grid(den, Heun(), 3, x=x, reference=ref)


def entry(sampler, times, process):
    return {"sampler": sampler_spec(sampler), "steps": len(times) - 1, "nfe": len(times) - 1,
            "process": repr(process), "times": times, "samples": 1, "rms": {}}


def test_save_load_round_trip(tmp_path):
    process, times = DiscreteVP(), [1.0, 0.5, 0.1, 0.0]
    s2, s3 = DPMSolverPP(3, order=2), DPMSolverPP(3, order=3)
    assert sampler_spec(s3) == {"type": "dpm_solver_pp", "order": 3, "lower_order_final": True,
                                "third_order": "taylor", "eta": 0.0, "solver_type": "midpoint"}
    assert sampler_spec(DDPM(3))["type"] == "ddpm"  # its first name, not the alias "ancestral"
    file = tmp_path / GRIDS_FILE
    save_grid(file, entry(s2, times, process))
    save_grid(file, entry(s3, [1.0, 0.7, 0.2, 0.0], process))
    save_grid(file, entry(s2, [1.0, 0.4, 0.05, 0.0], process))  # replaces the first one
    assert len(load_grids(file)) == 2 and not [p for p in tmp_path.iterdir() if p.name != GRIDS_FILE]
    sampler = DPMSolverPP(3, order=2, grid={"type": "learned", "path": str(file)})
    assert sampler.timesteps(process).tolist() == [1.0, 0.4, 0.05, 0.0]
    assert DPMSolverPP(3, order=3, grid=LearnedGrid(path=str(file))).timesteps(process).tolist() == [1.0, 0.7, 0.2, 0.0]
    with pytest.raises(ConfigError, match="none stored .* steps=5"):
        DPMSolverPP(5, order=2, grid={"type": "learned", "path": str(file)}).timesteps(process)
    with pytest.raises(ConfigError, match="learned on"):
        sampler.timesteps(VP())
    with pytest.raises(ConfigError, match="exactly one of times"):
        build("grid", "learned")
    explicit = DDIM(3, grid={"type": "learned", "times": times})
    assert explicit.timesteps(process).tolist() == times
    with pytest.raises(ConfigError, match="sampler.steps=3"):
        explicit.timesteps(process, 4)


def test_grids_live_in_the_checkpoint_directory(tmp_path):
    run = tmp_path / "run"
    ckpt = save_checkpoint(run / "checkpoints" / "step_0000010", model={"w": torch.zeros(1)})
    process, sampler = DiscreteVP(), DDIM(3)
    assert save_grid(run, entry(sampler, [1.0, 0.3, 0.02, 0.0], process)) == ckpt / GRIDS_FILE
    built = build("sampler", {"type": "ddim", "steps": 3, "grid": {"type": "learned", "path": str(run)}})
    assert built.timesteps(process).tolist() == [1.0, 0.3, 0.02, 0.0]
    assert json.loads((ckpt / GRIDS_FILE).read_text())["format"] == "genlab.learned_grids"


TINY = ["train.steps=30", "train.checkpoint_every=30", "train.eval_samples=200", "train.batch_size=64",
        "model.hidden=32", "model.depth=1", "data.n=2000", "sampler.steps=4"]


def test_cli_learn_grid_then_sample(capsys, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml"
    run = tmp_path / "run"
    assert main(["train", str(config), *TINY, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["learn-grid", str(run), "sampler.order=2", "--nfe", "4", "--samples", "64", "--pool", "128",
                 "--heldout", "64", "--evaluations", "30", "--reference-steps", "100"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "NFE 4" in out and "held-out" in out
    (stored,) = load_grids(latest_checkpoint(run) / GRIDS_FILE)
    assert stored["steps"] == 4 and stored["sampler"]["type"] == "dpm_solver_pp"
    assert stored["rms"]["learned"] <= stored["rms"]["start"]
    code = main(["sample", str(run), "sampler.grid=learned", "--n", "100", "--out", str(tmp_path / "s")])
    out, err = capsys.readouterr()
    assert code == 0, err
    code = main(["sample", str(run), "sampler.grid.type=learned", f"sampler.grid.path={run}", "sampler.steps=6",
                 "--out", str(tmp_path / "s")])
    out, err = capsys.readouterr()
    assert code == 2 and "none stored" in err and "genlab learn-grid" in err
