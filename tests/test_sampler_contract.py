"""The sampler contract: declared capabilities match behaviour, the linear fast path cannot bypass a
wrapper, and editing reads the declarations instead of guessing."""

from __future__ import annotations

import pytest
import torch

from genlab.core.registry import build, registered
from genlab.diffusion import VP, Denoiser, DPMSolverSingle, EulerMaruyama, PredictorCorrector, Restart
from genlab.diffusion.editing import check_deterministic, invert
from genlab.testing import GaussianMixture, exact_denoiser

MIX = GaussianMixture.ring(std=0.5)
PROCESS = VP()
NAMES = sorted(set(registered("sampler")["sampler"]) - {"ode"})  # ode: adaptive, checked in test_likelihood


class Counting:
    """A plain wrapper (no fast path) that counts model calls."""

    def __init__(self, denoiser):
        self.denoiser, self.process, self.calls = denoiser, denoiser.process, 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        return self.denoiser(x, t, **cond)


def run_with_fresh_states(sampler, denoiser, x, seed=0):
    """Run the loop by hand; at each step also take the step from a fresh state (same x, same noise).
    Returns the largest difference between the two over the steps after the first."""
    levels = sampler.levels(denoiser.process, x)
    g = torch.Generator().manual_seed(seed)
    ctx = sampler.context(denoiser, len(levels) - 1, g)
    worst = 0.0
    for i in range(len(levels) - 1):
        fresh = sampler.context(denoiser, len(levels) - 1, torch.Generator().set_state(g.get_state()))
        fresh.state.step = i
        try:
            alone = sampler.step(fresh, x, levels[i], levels[i + 1])
        except (TypeError, AttributeError, IndexError):  # the step needs what earlier steps stored
            return float("inf")
        x = sampler.step(ctx, x, levels[i], levels[i + 1])
        ctx.state.step = i + 1
        if i:
            worst = max(worst, (alone - x).abs().max().item())
    return worst


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_match_behaviour(name):
    sampler = build("sampler", {"type": name, "steps": 8})
    denoiser = Counting(exact_denoiser(MIX, PROCESS, "eps"))
    x = PROCESS.prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = (sampler.sample(denoiser, x.clone(), generator=torch.Generator().manual_seed(s), progress=False)
            for s in (1, 2))
    assert sampler.stochastic == (not torch.equal(a, b)), "stochastic"
    assert sampler.multistep == (run_with_fresh_states(sampler, denoiser, x.clone()) > 1e-12), "multistep"
    denoiser.calls = 0
    sampler.sample(denoiser, x.clone(), generator=torch.Generator().manual_seed(1), progress=False)
    per_step = sampler.nfe(8) / 8 if isinstance(sampler, Restart) else sampler.nfe_per_step
    assert 8 * per_step - 1 <= denoiser.calls <= 8 * per_step, "nfe_per_step"


@pytest.mark.parametrize("sampler, stochastic, multistep", [
    (build("sampler", {"type": "ddim", "eta": 0.5}), True, False),
    (build("sampler", {"type": "euler", "s_churn": 1.0}), True, False),
    (build("sampler", {"type": "dpm_solver_pp", "order": 1}), False, False),
    (DPMSolverSingle(order=1), False, False),
    (build("sampler", {"type": "unipc", "order": 1, "corrector": False}), False, False),
    (build("sampler", {"type": "unipc", "order": 1}), False, True),
    (PredictorCorrector(corrector="none", predictor="ddim"), False, False),
    (Restart(restarts=[]), False, False),
])
def test_capabilities_follow_parameters(sampler, stochastic, multistep):
    assert (sampler.stochastic, sampler.multistep) == (stochastic, multistep)


@pytest.mark.parametrize("sampler", [Restart(10), EulerMaruyama(10), PredictorCorrector(10)],
                         ids=["restart", "euler_maruyama", "pc"])
def test_editing_refuses_stochastic_samplers_before_running(sampler):
    denoiser = Counting(exact_denoiser(MIX, PROCESS))
    with pytest.raises(ValueError, match="is stochastic"):
        check_deterministic(sampler)
    with pytest.raises(ValueError, match="is stochastic"):
        invert(sampler, denoiser, MIX.sample(4, generator=torch.Generator().manual_seed(0)), progress=False)
    assert denoiser.calls == 0


def test_single_step_order_1_inverts_with_fixed_point_iterations():
    denoiser = exact_denoiser(MIX, PROCESS)
    x0 = MIX.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = DPMSolverSingle(50, order=1)
    z = invert(sampler, denoiser, x0, fixed_point_iters=2, progress=False)
    assert (sampler.sample(denoiser, z, progress=False) - x0).abs().max() < 1e-4


# ----- the linear fast path -------------------------------------------------------------------------
class Forwarding:
    """A wrapper that halves eps and forwards every other attribute to its denoiser (as a guidance
    wrapper might): the inner Denoiser's fast path must not be used through it."""

    def __init__(self, denoiser):
        self.inner = denoiser

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, **cond):
        x0, eps = self.inner(x, t, **cond)
        return x0, 0.5 * eps


class Halved(Denoiser):
    """A Denoiser subclass that changes forward() and not linear(): its fast path is off."""

    def forward(self, x, t, **cond):
        x0, eps = super().forward(x, t, **cond)
        return x0, 0.5 * eps


class HalvedWithLinear(Halved):
    """The same change, also on the fast path: eps = a_eps x + b_eps raw halves with its coefficients."""

    def linear(self, x, t, **cond):
        raw, (a_x0, b_x0, a_eps, b_eps) = super().linear(x, t, **cond)
        return raw, (a_x0, b_x0, 0.5 * a_eps, 0.5 * b_eps)


def model(x, t):
    return 0.3 * torch.sin(2 * x) + 1e-4 * t[:, None]


@pytest.mark.parametrize("make", [lambda d: Forwarding(d),
                                  lambda d: Halved(d.model, d.process, d.prediction),
                                  lambda d: HalvedWithLinear(d.model, d.process, d.prediction)],
                         ids=["forwarding", "subclass", "subclass_with_linear"])
@pytest.mark.parametrize("name", ["ddim", "euler", "euler_ancestral"])
def test_the_fast_path_cannot_bypass_a_wrapper(make, name):
    """DDIM, Euler and ancestral Euler combine x0 and eps through the fast path; with a wrapper that
    changes eps, the samples must be the wrapper's (those of a run with a callback, which asks for x0
    every step and so never takes the fast path) and not the inner denoiser's."""
    inner = Denoiser(model, PROCESS, "v")
    wrapped, sampler = make(inner), build("sampler", {"type": name, "steps": 6})
    x = PROCESS.prior((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(denoiser, callback=None):
        return sampler.sample(denoiser, x.clone(), generator=torch.Generator().manual_seed(1), progress=False,
                              callback=callback)

    slow = run(wrapped, callback=lambda info: None)
    assert torch.allclose(run(wrapped), slow, atol=1e-12)
    assert (slow - run(inner)).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "v", "velocity"])
def test_a_grid_starting_where_the_model_gives_no_x0_is_refused_by_every_sampler(prediction):
    """An eps or score model on rectified flow from t = 1 (alpha = 0): x0 = (x - sigma eps) / alpha is 0 / 0,
    so every sampler whose grid starts there is refused before the model runs, with the fix named; a grid
    that starts below is fine, and the other predictions sample from t = 1."""
    from genlab.core.errors import ConfigError
    from genlab.diffusion import RectifiedFlow

    calls = []

    def net(x, t):
        calls.append(1)
        return 0.1 * x

    process = RectifiedFlow()
    denoiser, x = Denoiser(net, process, prediction), torch.randn(3, 2)
    refused = prediction in ("eps", "score")
    starting_at_one = 0
    for name in NAMES:
        sampler = build("sampler", {"type": name, "steps": 4})
        try:
            if sampler.levels(process, x, 4)[0].alpha.item() != 0:
                continue
        except ConfigError:  # a default grid made for another process (karras: sigma_max = inf here)
            continue
        starting_at_one += 1
        if refused:
            with pytest.raises(ConfigError, match=rf"a model predicting {prediction} gives no x0 where alpha = 0.*"
                                                  r"t = 1 on RectifiedFlow.*grid.t_max < 1"):
                sampler.sample(denoiser, x=x, generator=torch.Generator().manual_seed(0), progress=False)
            assert not calls, name
    assert starting_at_one >= 8
    times = torch.linspace(0.9, 0.0, 5, dtype=torch.float64)
    out = build("sampler", {"type": "flow_euler", "steps": 4}).sample(
        denoiser, x=x, times=times if refused else None, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(out).all()
