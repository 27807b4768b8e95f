"""examples/new_sampler.py: a sampler from a paper (iPNDM) is a subclass of under 40 lines, it is built
from the registry, each of its Adams-Bashforth steps has the right local order, its whole runs have
the order its warm start allows, and it runs with every prediction type."""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from genlab.core import build
from genlab.diffusion import EDM, PREDICTIONS, VP, Euler, UniformLogSNR
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "new_sampler.py"
F64 = torch.float64


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The example module, loaded from its path once per process (it registers a sampler on import)."""
    name = "genlab_example_new_sampler"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def test_the_class_is_under_40_lines(example: ModuleType) -> None:
    lines, _ = inspect.getsourcelines(example.IPNDM)
    assert lines[0].lstrip().startswith('@register("sampler"'), "count from the decorator line"
    assert len(lines) < 40, f"the sampler class has {len(lines)} lines"


def test_registered_and_buildable(example: ModuleType) -> None:
    sampler = build("sampler", {"type": "ipndm", "steps": 10, "max_order": 3})
    assert type(sampler) is example.IPNDM
    assert (sampler.steps, sampler.max_order, sampler.nfe_per_step) == (10, 3, 1)
    with pytest.raises(ValueError, match="max_order must be 1, 2, 3 or 4, got 5"):
        example.IPNDM(max_order=5)

    # one evaluation a step, the last one into sigma = 0 included
    process, mixture = VP(), GaussianMixture.ring()
    denoiser = exact_denoiser(mixture, process, "eps")
    model, calls = denoiser.model, []

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return model(x, t)

    denoiser.model = counting
    out = sampler.sample(denoiser, shape=(8, 2), generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(out).all()
    assert sampler.timesteps(process)[-1] == 0 and len(calls) == 10


def test_the_first_step_is_euler(example: ModuleType) -> None:
    """The lower-order warm start: with no history, the step is Euler's (in x / alpha, sigma / alpha)."""
    process, mixture = VP(), GaussianMixture.ring()
    denoiser = exact_denoiser(mixture, process, "v")
    x = process.prior((32, 2), generator=torch.Generator().manual_seed(2), dtype=F64)
    firsts = []
    for sampler in (example.IPNDM(12), Euler(12)):
        steps = []
        sampler.sample(denoiser, x.clone(), progress=False, callback=lambda info, s=steps: s.append(info.x))
        firsts.append(steps)
    assert (firsts[0][0] - firsts[1][0]).abs().max().item() < 1e-12
    assert (firsts[0][1] - firsts[1][1]).abs().max().item() > 1e-6  # then it is AB2 (7e-5 apart), not Euler


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_one_adams_bashforth_step_has_local_order_p_plus_1(example: ModuleType, max_order: int) -> None:
    """From the exact solution and exact eps history on a grid uniform in sigma (EDM), one AB-p step
    has error O(h^(p+1)): log2(e_h / e_h/2) -> p + 1 (at h = 0.025 -> 0.0125: 1.99, 3.00, 3.90, 4.79).
    This checks every weight of every order, which whole runs (second order) cannot."""
    errs = example.local_errors(example.IPNDM(max_order=max_order), GaussianMixture.ring(std=0.5), EDM(), 1.0,
                                example.LOCAL_STEPS)
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert abs(orders[-1] - (max_order + 1)) < 0.3 and min(orders) > max_order, (errs, orders)


def test_whole_runs_are_second_order_and_beat_euler(example: ModuleType) -> None:
    """VP, eps prediction, log-SNR grid ending at t_min, ring of std 0.5. Over a whole run the Euler
    warm start and the equal-step weights make the error O(h^2): observed orders between 40, 80 and
    160 steps are ~2 (2.0, 2.0 measured), not 4. At 10 steps iPNDM is more accurate than Euler at 40."""
    process, grid, mixture = VP(), UniformLogSNR(final="min"), GaussianMixture.ring(std=0.5)
    t_start, t_end = example.start_and_end(process, grid)
    x = example.noisy_batch(mixture, process, t_start, 256)
    reference = exact_ode_solution(mixture, process, x, t_start, t_end)
    errs = example.errors(example.IPNDM, mixture, process, "eps", grid, (10, 40, 80, 160), x, reference)
    orders = [math.log2(a / b) for a, b in zip(errs[1:], errs[2:])]
    assert all(1.7 < p < 2.4 for p in orders), f"errors {errs}, observed orders {orders}"
    (euler_40,) = example.errors(Euler, mixture, process, "eps", grid, (40,), x, reference)
    assert errs[0] < 0.8 * euler_40, (errs[0], euler_40)


def test_every_prediction_type_gives_the_same_samples(example: ModuleType) -> None:
    """The exact model is the same in every parameterisation, so the samples agree (float64); the
    default grid ends at t = 0, so this covers the last step into sigma = 0 too."""
    process, mixture = VP(), GaussianMixture.ring()
    sampler = build("sampler", {"type": "ipndm", "steps": 10})
    x = process.prior((64, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    outs = {p: sampler.sample(exact_denoiser(mixture, process, p), x.clone(), progress=False) for p in PREDICTIONS}
    assert set(outs) == {"eps", "x0", "v", "score", "velocity"}
    for p, out in outs.items():
        assert torch.isfinite(out).all(), p
        torch.testing.assert_close(out, outs["eps"], rtol=0, atol=1e-6, msg=lambda m, p=p: f"{p} vs eps: {m}")
