"""UniPC: step by step against diffusers' UniPCMultistepScheduler (float64), and its order on the
exact Gaussian-mixture ODE (UniC raises UniP-p to order p + 1)."""

from __future__ import annotations

import pytest
import torch

from genlab.core import build
from genlab.core.errors import ConfigError
from genlab.diffusion import PREDICTIONS, VP, Denoiser, DiscreteVP
from genlab.diffusion.samplers.base import SamplerState, StepContext
from genlab.diffusion.grids import FAST_GRID
from genlab.diffusion.samplers.unipc import UniPC, UniPCState
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution
from genlab.testing.convergence import observed_orders
from genlab.testing.convergence import ode_problem as ode_setup
from genlab.testing.peers import assert_steps_close, ddpm_times, run_diffusers, run_genlab, set_timesteps_float64
from genlab.testing.peers import smooth_eps_model as model_fn

diffusers = pytest.importorskip("diffusers")
MIX = GaussianMixture.ring(std=0.5)
X = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def diffusers_unipc(steps: int, order: int, variant: str, corrector: bool, final: str = "zero",
                    lower_order_final: bool = True):
    sched = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, final_sigmas_type=final,
                                              lower_order_final=lower_order_final,
                                              disable_corrector=[] if corrector else list(range(steps)))
    return set_timesteps_float64(sched, steps)


@pytest.mark.parametrize("corrector", [True, False], ids=["unipc", "unip_only"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_matches_diffusers_step_by_step(variant, order, corrector):
    """After every step, genlab's returned x (the predictor's, uncorrected) equals what diffusers'
    step() returns; the grid ends at t = 0 (diffusers' final_sigmas_type="zero")."""
    steps = 10
    sched = diffusers_unipc(steps, order, variant, corrector)
    theirs = run_diffusers(sched, X)
    times = ddpm_times(sched)
    ours = run_genlab(UniPC(steps, order=order, variant=variant, corrector=corrector), sched, X, times)
    assert_steps_close(ours[:-1], theirs[:-1], tol=1e-5)
    # The step into sigma = 0 is first order: it returns x0 at the previous (uncorrected) sample.
    # diffusers' bh1 computes it as alpha_s B(h) * 0 with B(h) = -h = -inf, which is NaN.
    process = DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist())
    x0, _ = Denoiser(model_fn, process, "eps")(ours[-2], process.level(times[-2]))
    assert (ours[-1] - x0).abs().max().item() < 1e-12
    if variant == "bh2":
        assert_steps_close(ours[-1:], theirs[-1:], tol=1e-5)


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order, variant", [(2, "bh1"), (3, "bh2"), (3, "bh1")])
def test_matches_diffusers_ending_at_sigma_min(order, variant, lower_order_final):
    """final_sigmas_type="sigma_min" ends at the first DDPM step (t = 1/T), where lambda is finite:
    every step is compared, also without lower_order_final (diffusers' last sigma is float32, so
    the last step agrees to ~1e-8 only)."""
    steps = 12
    sched = diffusers_unipc(steps, order, variant, True, final="sigma_min", lower_order_final=lower_order_final)
    theirs = run_diffusers(sched, X)
    times = ddpm_times(sched)
    times[-1] = 1 / sched.config.num_train_timesteps
    sampler = UniPC(steps, order=order, variant=variant, lower_order_final=lower_order_final)
    assert_steps_close(run_genlab(sampler, sched, X, times), theirs, tol=1e-5)


@pytest.fixture(scope="module")
def ode_problem():
    """VP, ring of std 0.5 (clean asymptotics from 20 steps on), t = 1 to 0.2, log-SNR grid."""
    return ode_setup(MIX, 0.2, n=64)


@pytest.mark.parametrize("order, corrector, variant, expected", [
    (1, False, "bh2", 1), (1, True, "bh2", 2), (1, True, "bh1", 2), (2, False, "bh2", 2), (2, True, "bh2", 3),
    (2, True, "bh1", 3), (3, False, "bh2", 3), (3, True, "bh2", 4)])
def test_observed_order_on_the_exact_ode(ode_problem, order, corrector, variant, expected):
    """log2(e_N / e_2N) at N = 20, 40, 80 (lower_order_final off): p without UniC, p + 1 with it."""
    orders, errs = observed_orders(
        lambda n, g: UniPC(n, g, order=order, variant=variant, corrector=corrector, lower_order_final=False),
        *ode_problem, steps=(20, 40, 80))
    assert all(abs(o - expected) < 0.35 for o in orders), f"errors {errs}, observed orders {orders}"


def test_corrector_costs_no_evaluation_and_beats_the_predictor(ode_problem):
    """One model call per step with or without UniC, and UniC makes UniP-2 more accurate at equal NFE."""
    mixture, process, x, t_end, ref = ode_problem
    den = exact_denoiser(mixture, process, "eps")
    model, calls = den.model, []
    den.model = lambda x, t: calls.append(t) or model(x, t)
    errs = {}
    for corrector in (True, False):
        calls.clear()
        sampler = UniPC(40, {"type": "log_snr", "t_min": t_end, "final": "min"}, corrector=corrector,
                        lower_order_final=False)
        errs[corrector] = (sampler.sample(den, x.clone(), progress=False) - ref).pow(2).mean().sqrt().item()
        assert len(calls) == 40
    assert errs[True] < errs[False] / 2, errs


def test_per_sample_times_equal_separate_runs():
    """A [N + 1, B] grid runs each sample on its own grid in one batch; the history is per call."""
    process, sampler = VP(), UniPC(10, order=3)
    den = exact_denoiser(MIX, process)
    x = process.prior((3, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grids = [build("grid", {"type": "log_snr", "t_max": t})(process, 10) for t in (1.0, 0.7, 0.4)]
    joint = sampler.sample(den, x.clone(), times=torch.stack(grids, dim=1), progress=False)
    for i, grid in enumerate(grids):
        alone = sampler.sample(den, x[i:i + 1].clone(), times=grid, progress=False)
        assert torch.allclose(joint[i:i + 1], alone, atol=1e-10)
    assert torch.isfinite(joint).all()


def test_every_prediction_type_gives_the_same_samples():
    process, sampler = VP(), UniPC(8, order=3, variant="bh1")
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    outs = {p: sampler.sample(exact_denoiser(MIX, process, p), x.clone(), progress=False) for p in PREDICTIONS}
    for p, out in outs.items():
        assert torch.isfinite(out).all() and (out - outs["eps"]).abs().max().item() < 1e-6, p


def test_registry_and_bad_input():
    sampler = build("sampler", {"type": "unipc", "steps": 12, "order": 3, "variant": "bh1", "corrector": False})
    assert (type(sampler), sampler.steps, sampler.order, sampler.variant, sampler.corrector) == \
        (UniPC, 12, 3, "bh1", False)
    defaults = UniPC()
    assert (defaults.order, defaults.variant, defaults.corrector, defaults.lower_order_final) == (2, "bh2", True, True)
    with pytest.raises(ConfigError, match="expected one of 'bh1', 'bh2'"):
        build("sampler", {"type": "unipc", "variant": "bh3"})
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        UniPC(order=4)
    assert isinstance(defaults.init_state(5), UniPCState)
    level = VP().level(torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="needs a UniPCState"):
        defaults.step(StepContext(exact_denoiser(MIX, VP()), SamplerState()), X[:, 0, 0, :2], level, level)


@pytest.fixture(scope="module")
def ddpm_ring():
    """The benchmark's ring (8 components of std 0.15 at radius 2) on DDPM's linear schedule, exact eps, 256
    start points and their exact ODE end points (two legs, as scripts/bench_samplers.py solves them)."""
    mixture, process = GaussianMixture.ring(), DiscreteVP()
    x = process.prior((256, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mid = exact_ode_solution(mixture, process, x, 1.0, process.t_min, 1e-10, 1e-10)
    return exact_denoiser(mixture, process), x, exact_ode_solution(mixture, process, mid, process.t_min, 0.0,
                                                                    1e-10, 1e-10)


@pytest.mark.parametrize("steps", [5, 10])
def test_default_grid_beats_plain_log_snr_and_diffusers_spacings(ddpm_ring, steps):
    """UniPC() on its default FAST_GRID against the same UniPC on uniform log-SNR and on diffusers'
    "trailing" / "leading" spacings (where genlab's UniPC is diffusers', step by step): at 5 and 10
    NFE its error is at most half of theirs (measured: 0.33 and 0.19 of the best of them)."""
    den, x, ref = ddpm_ring
    rms = lambda s: float((s.sample(den, x.clone(), progress=False) - ref).square().sum(-1).mean().sqrt())  # noqa: E731
    ours = rms(UniPC(steps))
    others = {name: rms(UniPC(steps, grid)) for name, grid in [
        ("log_snr", "log_snr"), ("trailing", {"type": "ddpm", "spacing": "trailing"}),
        ("leading", {"type": "ddpm", "spacing": "leading"})]}
    assert ours < 0.5 * min(others.values()), (ours, others)


def test_default_grid_keeps_converging_beyond_20_steps(ddpm_ring):
    """FAST_GRID's end holds at sigma 0.045 up to 20 steps (the grids of 5-20 steps are those of a fixed
    end) and moves down as (20 / N)^1.5 beyond, so UniPC() keeps converging where a fixed end stalls
    (on this ring at 20 / 40 / 80 steps, measured: 7.1e-3 / 1.9e-3 / 4.9e-4; with a fixed end
    7.1e-3 / 8.1e-3 / 8.6e-3)."""
    den, x, ref = ddpm_ring
    fixed = {k: v for k, v in FAST_GRID.items() if k != "sigma_min_steps"}
    for n in (5, 10, 20):
        assert torch.equal(UniPC(n).timesteps(den.process), UniPC(n, fixed).timesteps(den.process))
    assert build("grid", FAST_GRID).end_sigma(40) == pytest.approx(0.045 * 0.5**1.5)

    def rms(sampler):
        return float((sampler.sample(den, x.clone(), progress=False) - ref).square().sum(-1).mean().sqrt())

    errs = {n: rms(UniPC(n)) for n in (20, 40, 80)}
    assert errs[40] < errs[20] / 3 and errs[80] < errs[40] / 2, errs
    assert errs[40] < rms(UniPC(40, fixed)) / 3, errs


@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize("order", [2, 3])
def test_a_grid_from_alpha_zero_rectified_flow_t_1_is_finite_and_converges(order, variant):
    """On rectified flow a flow-matching grid starts at t = 1 (alpha = 0, lambda = -inf): UniC's first
    correction (h = inf) and the nodes at lambda = -inf take their limits (r -> 1; weight -> 0), so
    the samples are finite and converge on the exact mixture ODE (velocity model); with bh1, whose B(h) = -h
    has no limit, the step out of t = 1 is first order."""
    from genlab.diffusion import DPMSolverPP, RectifiedFlow

    grid = {"type": "uniform", "t_min": 0.0, "final": "min"}
    den = exact_denoiser(MIX, RectifiedFlow(), "velocity")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = DPMSolverPP(800, grid, order=3).sample(den, x=x, progress=False)
    errors = [(UniPC(n, grid, order=order, variant=variant).sample(den, x=x, progress=False) - ref)
              .norm(dim=1).mean().item() for n in (5, 40)]
    assert errors[1] < errors[0] / 30, errors
