"""Device-generic code, checked without a GPU: samplers, objectives and a trainer step run on the
``meta`` device (no CPU tensor may mix in, no device value may be read on the host) with every
random draw on its generator's device (genlab.testing.devices); and float32 sampling stays
float32 while its coefficients keep float64 precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.core.config import load_config
from genlab.core.registry import build, registered
from genlab.diffusion import EDM, VE, VP, Denoiser, DiscreteVP, RectifiedFlow, SubVP
from genlab.objectives import DenoisingObjective
from genlab.testing import GaussianMixture, exact_denoiser
from genlab.testing.devices import DeviceAudit, generator_on
from genlab.training import Experiment, Trainer
from genlab.training import trainer as trainer_module

PROCESSES = {"vp": VP(), "ddpm": DiscreteVP(), "sub_vp": SubVP(), "ve": VE(), "edm": EDM(),
             "rectified_flow": RectifiedFlow()}
META_SKIP = {"ode"}  # torchdiffeq reads its step sizes on the host: it runs on GPUs, not on meta tensors


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + 1e-3 * t[:, None]


def test_audit_catches_a_draw_off_the_generators_device():
    with DeviceAudit() as audit, pytest.raises(AssertionError, match="draw on cpu with a generator on meta"):
        torch.rand(3, generator=generator_on("meta"))
    with DeviceAudit() as audit:
        torch.randn(3, generator=generator_on("meta"), device="meta")
    assert audit.draws == 1


@pytest.mark.parametrize("name", sorted(set(registered("sampler")["sampler"]) - META_SKIP))
def test_every_sampler_runs_on_the_meta_device(name):
    sampler = build("sampler", {"type": name, "steps": 4})
    for pname in ("vp", "edm"):
        denoiser = Denoiser(model, PROCESSES[pname], "v")
        with DeviceAudit():
            x = sampler.sample(denoiser, shape=(3, 2), generator=generator_on("meta"), progress=False)
        assert (x.device.type, x.dtype, x.shape) == ("meta", torch.float32, (3, 2))


@pytest.mark.parametrize("t_distribution", ["uniform", "log_normal", "logit_normal"])
@pytest.mark.parametrize("pname", sorted(PROCESSES))
def test_objectives_run_on_the_meta_device(pname, t_distribution):
    x0 = torch.empty(5, 2, device="meta")
    for kwargs in ({"prediction": "velocity", "weighting": "min_snr"}, {"preconditioning": "edm", "weighting": "edm"}):
        objective = DenoisingObjective(t_distribution=t_distribution, **kwargs)
        with DeviceAudit() as audit:
            loss = objective(objective.denoiser(model, PROCESSES[pname]), x0, generator=generator_on("meta"))
        assert loss.device.type == "meta" and audit.draws == 2  # the noise and the times


def test_a_trainer_step_runs_on_the_meta_device(tmp_path, monkeypatch):
    """The noise and the times of a step are drawn where the batch and the step's generator live
    (the accelerator's device), and the loss stays there."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml",
                         ["model.hidden=16", "model.depth=1", "data.n=100", "train.batch_size=8"])
    trainer = Trainer(Experiment.from_config(config), tmp_path, progress=False)
    trainer.model.to("meta")
    batch = {"x": next(trainer.batches)["x"].to("meta")}
    monkeypatch.setattr(trainer_module, "step_generator", lambda *args: generator_on(args[-1]))
    with DeviceAudit() as audit:
        loss = trainer.micro_loss(0, batch)
    assert loss.device.type == "meta" and audit.draws == 2


@pytest.mark.parametrize("name", sorted(set(registered("sampler")["sampler"]) - {"ode"}))
def test_float32_sampling_stays_float32_with_float64_coefficients(name):
    """Per-sample times [N + 1, B] with equal columns give the shared grid's result in float32: the
    coefficients are float64 on both paths and only the last multiply is in float32. (Levels cast to
    float32 put the per-sample path 4e-7 to 7e-6 off; pc's Langevin step size comes from float32 norms
    on both paths, which round differently against float and [B] coefficients.)"""
    sampler = build("sampler", {"type": name, "steps": 12})
    process = VP()
    denoiser = exact_denoiser(GaussianMixture.ring(std=0.5), process, "eps")
    x = process.prior((6, 2), generator=torch.Generator().manual_seed(0))
    times, g = sampler.timesteps(process), torch.Generator()
    dtypes = set()
    shared, columns = (sampler.sample(denoiser, x.clone(), times=t, progress=False, generator=g.manual_seed(1),
                                      callback=lambda i: dtypes.add(i.x.dtype))
                       for t in (times, times[:, None].expand(-1, 6)))
    assert shared.dtype == columns.dtype == torch.float32 and dtypes == {torch.float32}
    assert (shared - columns).abs().max().item() <= (1e-6 if name == "pc" else 1e-7)
