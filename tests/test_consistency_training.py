"""Consistency training without a teacher (CT, improved CT, ECT): the curricula and the level distribution
against the papers' formulas computed by hand, a perfect consistency model's loss (zero), the shared dropout
of a student that is its own target, bad values, improved CT trained on a Gaussian mixture, ECT started from
a diffusion run, and runs through the command line resumed bit-identical although the curriculum moves."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import norm
from torch import nn

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.core.errors import ConfigError
from genlab.core.registry import build
from genlab.diffusion import EDM, VE, VP, ConsistencySampler, DiscreteVP, SubVP, consistency_scalings
from genlab.models import MLP
from genlab.objectives import (BuildContext, ConsistencyTraining, EasyConsistencyTuning,
                               ImprovedConsistencyTraining)
from genlab.objectives.consistency_training import (ct_levels, ct_target_decay, ect_r, ect_stage, ict_levels,
                                                    ict_period, lognormal_level_probabilities)
from genlab.metrics import wasserstein2
from genlab.testing import GaussianMixture
from genlab.testing.devices import DeviceAudit, generator_on
from genlab.training import Experiment, Trainer
from genlab.training.experiment import load_pretrained
from genlab.training.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "consistency" / "ict_toy2d.yaml"
F64 = torch.float64


# ----- the curricula, against the papers' formulas worked by hand ---------------------------------------------
def test_ct_levels_and_target_decay_follow_song_et_al_appendix_c():
    """N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 and mu(k) = exp(s0 ln mu0 / N(k)) with
    CIFAR-10's s0 = 2, s1 = 150, mu0 = 0.9: at k = K / 2 the root is sqrt(11402.5) = 106.78."""
    K = 800_000
    assert [ct_levels(k, K, 2, 150) for k in (0, 1, K // 2, K)] == [2, 3, 107, 151]
    assert ct_target_decay(2, 2, 0.9) == pytest.approx(0.9, abs=1e-15)
    assert ct_target_decay(107, 2, 0.9) == pytest.approx(0.9980325824752019, abs=1e-15)
    assert ct_target_decay(151, 2, 0.9) == pytest.approx(0.9986054697436056, abs=1e-15)
    ct = ConsistencyTraining()
    ct.at_step(K // 2, K)
    assert ct.n_levels() == 107 and ct.targets() == {"target": ("model", ct_target_decay(107, 2, 0.9))}


def test_ict_levels_double_every_k_prime_steps():
    """K' = floor(K / (log2 floor(s1 / s0) + 1)) = K / 8 for s0 = 10, s1 = 1280 (the paper's 400k steps:
    K' = 50,000), N(k) = min(s0 2^floor(k / K'), s1) + 1: 11, 21, ..., 161 at K / 2, 1281 from 7 K' on."""
    K = 400_000
    assert ict_period(K, 10, 1280) == 50_000 and ict_period(K, 10, 1000) == math.floor(K / (math.log2(100) + 1))
    n = [ict_levels(k, K, 10, 1280) for k in (0, 49_999, 50_000, K // 2, 349_999, 350_000, K)]
    assert n == [11, 11, 21, 161, 641, 1281, 1281]
    assert ict_period(5, 10, 1280) == 1  # a run shorter than its 8 doublings doubles every step


def test_ict_level_probabilities_are_the_log_normal_mass_of_each_interval():
    """p(sigma_i) proportional to erf((ln s_(i+1) - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2
    P_std)), by hand with math.erf and, as an oracle, the normal CDF's mass of each interval (scipy)."""
    obj = ImprovedConsistencyTraining(sigma_data=0.5)
    obj.build(BuildContext(model=nn.Identity(), process=EDM(), data_shape=(2,)))
    times, sigmas = obj.levels(11)
    rho = 7
    ramp = [(80 ** (1 / rho) + i / 10 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho for i in range(11)]
    assert torch.allclose(sigmas, torch.tensor(ramp, dtype=F64), rtol=1e-12) and torch.allclose(times, sigmas)
    p = lognormal_level_probabilities(sigmas, -1.1, 2.0)
    erf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in ramp]
    by_hand = [erf[i] - erf[i + 1] for i in range(10)]
    assert torch.allclose(p, torch.tensor(by_hand, dtype=F64) / sum(by_hand), rtol=1e-12)
    mass = [norm.cdf(math.log(ramp[i]), -1.1, 2.0) - norm.cdf(math.log(ramp[i + 1]), -1.1, 2.0) for i in range(10)]
    assert torch.allclose(p, torch.tensor(mass, dtype=F64) / sum(mass), rtol=1e-9)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-15) and bool((p > 0).all())
    # the weighting lambda(sigma_i) = 1 / (sigma_(i+1) - sigma_i) and the draws: 200,000 follow p
    assert torch.allclose(obj.weights(sigmas), 1 / torch.tensor([ramp[i] - ramp[i + 1] for i in range(10)],
                                                                dtype=F64), rtol=1e-12)
    j = obj.intervals(sigmas, 200_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(j, minlength=10).double() / len(j)
    assert (freq - p).abs().max().item() < 4 * math.sqrt(0.25 / len(j))


def test_ect_stages_and_r_follow_their_code_and_r_tends_to_t():
    """a = ceil(i / d), d = K / 8 (their 8 stages of 250 ticks); r = t (1 - n(t) / q^a), n(t) = 1 + 8
    sigmoid(-t), q = 2: by hand n(1) = 3.1515 (r < 0: the boundary), n(5) = 1.05354 (r = 2.36614 at a = 1,
    4.97942 at a = 8); r -> t as a grows; r is clamped at the boundary sigma_min."""
    assert [ect_stage(k, 800, 8) for k in (0, 99, 100, 399, 400, 799)] == [1, 1, 2, 4, 5, 8]
    t = torch.tensor([1.0, 5.0], dtype=F64)
    assert torch.allclose(ect_r(t, 1, 2.0, 8.0, 1.0), torch.tensor([-0.5757656854799804, 2.366142981514303], dtype=F64),
                          rtol=1e-13)
    assert ect_r(t, 8, 2.0, 8.0, 1.0)[1].item() == pytest.approx(4.97942299204308, rel=1e-13)
    gaps = [(t - ect_r(t, a, 2.0, 8.0, 1.0)).max().item() for a in (1, 4, 16, 64)]
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-17
    assert torch.equal(ect_r(t, 3, 2.0, 0.0, 1.0), t * (1 - 1 / 8))  # k = 0: their constant mapping
    ect = EasyConsistencyTuning()
    ect.build(BuildContext(model=nn.Identity(), process=EDM(), data_shape=(2,)))
    ect.at_step(0, 800)
    r = ect.r_of(torch.tensor([0.01, 1.0, 5.0], dtype=F64))
    assert r.tolist()[:2] == [0.002, 0.002] and r[2].item() == pytest.approx(2.366142981514303, rel=1e-13)


# ----- the losses, written out by hand on EDM (x = x0 + sigma z, t = sigma) -------------------------------------
def by_hand(name: str, f, x0: torch.Tensor, g: torch.Generator, k: int, total: int) -> torch.Tensor:
    """The paper's loss of one batch with the draws in the objective's order: CT, iCT on Karras' sigmas (0.002
    to 80, rho 7), ECT with t = exp(P_mean + P_std n) in [0.002, 80]."""
    if name == "ect":
        t = (-1.1 + 2.0 * torch.randn(len(x0), generator=g, dtype=F64)).exp().clamp(0.002, 80.0)
        a = math.ceil((k + 1) / (total / 8))
        r = (t * (1 - (1 + 8 * torch.sigmoid(-t)) / 2**a)).clamp_min(0.002)
    else:
        n = ct_levels(k, total, 2, 150) if name == "ct" else min(10 * 2 ** (k // (total // 8)), 1280) + 1
        i = torch.arange(n, dtype=F64)
        sigma = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        if name == "ct":
            j = torch.randint(n - 1, (len(x0),), generator=g)
        else:
            cdf = torch.special.erf((sigma.log() + 1.1) / (2 * math.sqrt(2)))
            j = torch.multinomial(cdf[:-1] - cdf[1:], len(x0), replacement=True, generator=g)
        t, r = sigma[j], sigma[j + 1]
    z = torch.randn(x0.shape, generator=g, dtype=F64)
    diff = f(x0 + t[:, None] * z, t) - f(x0 + r[:, None] * z, r).detach()  # the target: no gradient
    if name == "ct":
        return diff.square().mean(1).mean()
    c = 0.00054 * math.sqrt(2)
    weight = torch.where(t > r, 1 / (t - r), 0.0)  # at the boundary t = r = sigma_min: f is the identity at both
    return (((diff.square().sum(1) + c**2).sqrt() - c) * weight).mean()


@pytest.mark.parametrize("name", ["ct", "ict", "ect"])
def test_the_losses_are_the_papers_formulas(name):
    """CT: mean |f(x0 + t_(n+1) z) - f^-(x0 + t_n z)|^2 over dimensions, n uniform; iCT: the pseudo-Huber distance
    times 1 / (sigma_(i+1) - sigma_i), i log-normal; ECT: pseudo-Huber / (t - r); with a random network (float64)
    at steps 0, K / 2 and K - 1 of K = 800: the values, and the gradients, which flow through the noisier point
    alone."""
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=16, depth=1, time_embedding="fourier", fourier_scale=4.0).double()
    x0 = torch.randn(512, 2, dtype=F64)
    for k in (0, 400, 799):
        obj = objectives(sigma_data=0.5)[name]
        obj.build(BuildContext(model=model, process=EDM(), data_shape=(2,)))
        obj.at_step(k, 800)
        ours = obj.loss({"model": model, "target": model}, {"x": x0}, torch.Generator().manual_seed(k))
        f = lambda x, t: obj.denoiser(model)(x, t)[0]  # noqa: E731
        theirs = by_hand(name, f, x0, torch.Generator().manual_seed(k), k, 800)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-10) and ours.item() > 1e-4, (k, ours, theirs)
        grads = [torch.cat([p.flatten() for p in torch.autograd.grad(v, model.parameters())]) for v in (ours, theirs)]
        assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12) and grads[0].abs().max() > 0


# ----- a perfect consistency model: loss zero -------------------------------------------------------------------
class PointMassConsistency(nn.Module):
    """The backbone F of the exact consistency function of data at one point x*: there the probability-flow ODE
    in x^ = x / alpha is dx^/ds = (x^ - x*) / s, its trajectories are the lines x^ = x* + s z, and f(x, s) =
    x* + (sigma_min / s)(x^ - x*). F = (f - c_skip x^) / c_out from the network's inputs (c_in x^, ln(s) / 4);
    ``error`` scales F by 1 + error (an imperfect model)."""

    def __init__(self, point: torch.Tensor, sigma_data: float, sigma_min: float, error: float = 0.0) -> None:
        super().__init__()
        self.point, self.sigma_data, self.sigma_min, self.error = point, sigma_data, sigma_min, error

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        s = torch.exp(4 * c_noise)[:, None]
        c_skip, c_out, c_in, _ = consistency_scalings(s, self.sigma_data, self.sigma_min)
        xhat = x_in / c_in
        f = self.point + self.sigma_min / s * (xhat - self.point)
        return torch.where(c_out > 0, (f - c_skip * xhat) / c_out.clamp_min(1e-300), 0.0) * (1 + self.error)


PROCESSES = {"edm": EDM(), "vp": VP(), "ve": VE(), "sub_vp": SubVP(), "ddpm": DiscreteVP()}


def objectives(sigma_data: float = 0.7) -> dict[str, object]:
    return {"ct": ConsistencyTraining(sigma_data=sigma_data), "ict": ImprovedConsistencyTraining(sigma_data=sigma_data),
            "ect": EasyConsistencyTuning(sigma_data=sigma_data)}


@pytest.mark.parametrize("pname", sorted(PROCESSES))
def test_a_perfect_consistency_model_has_zero_loss_on_every_process(pname):
    """On data at one point, x = alpha (x0 + sigma z) at the two levels of a pair lie on one ODE trajectory when
    they share z, so the exact f gives zero loss, for CT, iCT and ECT (mid-curriculum), on every process: the
    same noise at both ends, each x at its own level, the student and the target each at theirs. Measured: below
    4e-32 (CT's l2) and 0 (iCT, ECT); F off by 1% gives 4e-8 (CT), 2e-3 (iCT) and 4e-3 (ECT). (On data with
    spread the pair is on one trajectory only to first order in the interval: Song et al. 2023, Theorem 2.)"""
    process = PROCESSES[pname]
    x0 = torch.tensor([[0.6, -1.3]], dtype=F64).expand(256, 2)
    for name, obj in objectives().items():
        obj.build(BuildContext(model=nn.Identity(), process=process, data_shape=(2,)))
        obj.at_step(300, 800)
        losses = []
        for error in (0.0, 0.01):
            f = PointMassConsistency(x0[0], 0.7, obj.boundary, error)
            loss = obj.loss({"model": f, "target": f}, {"x": x0}, torch.Generator().manual_seed(0))
            losses.append(loss.item())
        assert losses[0] < 1e-25 and losses[1] > 1e-9, (name, losses)


def test_a_student_that_is_its_own_target_sees_the_same_dropout_masks():
    """With theta^- = theta (iCT, ECT) the target is the same function at another point: the same dropout
    masks (dropout 0.5 here): at equal points f and its target are equal; CT's EMA target is another module."""
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=32, depth=2, dropout=0.5).train()
    obj = ImprovedConsistencyTraining()
    obj.build(BuildContext(model=model, process=EDM(), data_shape=(2,)))
    x0, eps = torch.randn(64, 2), torch.randn(64, 2)
    level = EDM().level(torch.full((64,), 3.0, dtype=F64))
    f, target = obj.compare({"model": model}, x0, eps, level, level, {})
    assert torch.equal(f, target) and f.requires_grad and not target.requires_grad
    again, _ = obj.compare({"model": model}, x0, eps, level, level, {})
    assert not torch.equal(f, again)  # the global generator moved on: dropout is on


@pytest.mark.parametrize("name", ["ct", "ict", "ect"])
def test_the_losses_run_on_the_meta_device(name):
    """Every draw (the levels or times, the noise) on the batch's device, nothing read on the host."""
    obj = objectives()[name]
    obj.build(BuildContext(model=nn.Identity(), process=VP(), data_shape=(2,)))
    obj.at_step(5, 10)
    model = lambda x, t: 0.5 * x + 1e-3 * t[:, None]  # noqa: E731
    with DeviceAudit() as audit:
        loss = obj.loss({"model": model, "target": model}, {"x": torch.empty(5, 2, device="meta")},
                        generator_on("meta"))
    assert loss.device.type == "meta" and audit.draws == 2


# ----- bad values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: ImprovedConsistencyTraining(s0=20, s1=10), "ImprovedConsistencyTraining: s0 (20) must be <= s1 (10)"),
    (lambda: ImprovedConsistencyTraining(p_std=0), "ImprovedConsistencyTraining: p_std must be > 0, got 0"),
    (lambda: ImprovedConsistencyTraining(huber_c=-1.0), "ImprovedConsistencyTraining: huber_c must be > 0, got -1.0"),
    (lambda: ConsistencyTraining(s0=1), "ConsistencyTraining: s0 must be >= 2, got 1"),
    (lambda: ConsistencyTraining(s0=200), "ConsistencyTraining: s0 (200) must be <= s1 (150)"),
    (lambda: ConsistencyTraining(mu0=1.0), "ConsistencyTraining: mu0 must be >= 0 and < 1, got 1.0"),
    (lambda: EasyConsistencyTuning(q=1.0), "EasyConsistencyTuning: q must be > 1, got 1.0"),
    (lambda: EasyConsistencyTuning(p_std=-2.0), "EasyConsistencyTuning: p_std must be > 0, got -2.0"),
    (lambda: EasyConsistencyTuning(stages=0), "EasyConsistencyTuning: stages must be >= 1, got 0"),
    (lambda: EasyConsistencyTuning(huber_c=0.0), "EasyConsistencyTuning: huber_c must be > 0, got 0.0"),
])
def test_bad_values_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("cfg, message", [
    ({"type": "improved_consistency_training", "p_std": 0}, "c.yaml: objective.p_std: expected float > 0, got int 0"),
    ({"type": "consistency_training", "mu0": -0.5}, "objective.mu0: expected float >= 0 and < 1, got float -0.5"),
    ({"type": "easy_consistency_tuning", "stages": 0}, "objective.stages: expected int >= 1, got int 0"),
])
def test_bad_values_in_a_config_name_the_key(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build("objective", cfg, path="objective", source="c.yaml")


def test_ect_on_a_process_without_a_finite_top_noise_level_is_refused():
    with pytest.raises(ValueError, match="sigma / alpha of RectifiedFlow.* is infinite at t_max"):
        EasyConsistencyTuning().build(BuildContext(model=nn.Identity(), process=build("process", "rectified_flow"),
                                                   data_shape=(2,)))


# ----- improved CT trained on a Gaussian mixture ------------------------------------------------------------------
RING = GaussianMixture.ring(k=4, radius=1.5, std=0.3)


def train_ict(steps: int, ema_decay: float) -> tuple[ImprovedConsistencyTraining, nn.Module]:
    """iCT with its defaults (s0 = 10, s1 = 1280, log-normal levels, pseudo-Huber) on the ring, sigma_data 1, an
    MLP with Fourier time features, batch 256, Adam at 2e-3 decaying linearly; returns the objective and the EMA
    of the student."""
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=64, depth=3, time_embedding="fourier", fourier_scale=4.0)
    objective = ImprovedConsistencyTraining(sigma_data=1.0)
    objective.build(BuildContext(model=model, process=EDM(), data_shape=(2,), sampler=ConsistencySampler(1)))
    ema, opt, g = EMA(model, ema_decay), torch.optim.Adam(model.parameters(), lr=2e-3), torch.Generator().manual_seed(1)
    for k in range(steps):
        objective.at_step(k, steps)
        loss = objective.loss({"model": model}, {"x": RING.sample(256, generator=g)}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        opt.param_groups[0]["lr"] = 2e-3 * (1 - k / steps) + 1e-5
    return objective, ema.model


def sample_quality(objective: ImprovedConsistencyTraining, model: nn.Module, steps: int) -> tuple[float, float]:
    """(the mixture's own mean log-density minus that of 4000 samples of ``steps`` consistency steps, the exact
    W2 between 2000 of them and 2000 mixture draws); two mixture draws are 0.22 apart in W2."""
    own = RING.log_prob(RING.sample(20000, generator=torch.Generator().manual_seed(3))).mean().item()
    x = ConsistencySampler(steps).sample(objective.denoiser(model), shape=(4000, 2),
                                        generator=torch.Generator().manual_seed(7), progress=False)
    held = RING.sample(2000, generator=torch.Generator().manual_seed(11))
    return own - RING.log_prob(x).mean().item(), wasserstein2(x[:2000].double(), held)


def test_improved_ct_learns_a_mixture_from_data_alone():
    """800 steps (10-23 s on this shared 2-core machine): 1-step samples' mean log-density within 1.5 nats of the
    mixture's own, W2 below 0.75; 2 steps within 0.75 nats, W2 below 0.4 (measured: 0.97 and 0.60, -0.12 and
    0.31; seeds 1 and 2 of the training gave 1.19 / 0.62 and 0.83 / 0.55 at 1 step; the untrained model: 4.48
    / 1.14 at 1 step, 3.23 / 0.99 at 2)."""
    objective, model = train_ict(800, 0.99)
    gap, w2 = sample_quality(objective, model, 1)
    assert abs(gap) < 1.5 and w2 < 0.75, (gap, w2)
    gap, w2 = sample_quality(objective, model, 2)
    assert abs(gap) < 0.75 and w2 < 0.4, (gap, w2)


@pytest.mark.slow
def test_improved_ct_one_step_samples_match_a_mixture_after_3000_steps():
    """3000 steps (26-110 s with the load): 1-step samples' mean log-density within 0.5 nats of the mixture's
    own (measured -0.39: samples slightly tighter than the components) and W2 below 0.45 (0.37; two mixture
    draws: 0.22); 2 steps W2 below 0.4 (0.22). Seeds 1 and 2 of the training: 1 step -0.23 / 0.26 and
    0.17 / 0.34, 2 steps W2 0.23 and 0.34."""
    objective, model = train_ict(3000, 0.995)
    gap, w2 = sample_quality(objective, model, 1)
    assert abs(gap) < 0.5 and w2 < 0.45, (gap, w2)
    assert sample_quality(objective, model, 2)[1] < 0.4


# ----- through the Trainer and the command line -------------------------------------------------------------------
TINY = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
        "train.warmup_steps=1", "train.steps=8", "train.checkpoint_every=4"]


def test_the_trainer_hands_the_objective_its_step_and_follows_the_target_decay_schedule(tmp_path):
    """at_step(k, K) before every step k, from the checkpoint's k on after a resume; CT's target network
    moves with mu(k) of the step (0.9 at N = 2, then N(k) grows every step of this 8-step run)."""
    def run(resume: bool) -> tuple[list[tuple[int, int]], Trainer]:
        exp = Experiment.from_config(load_config(CONFIG, [*TINY, "objective.type=consistency_training"]))
        seen, at_step = [], exp.objective.at_step
        exp.objective.at_step = lambda k, total: (seen.append((k, total)), at_step(k, total))[1]
        with Trainer(exp, tmp_path / "run", progress=False, resume=resume) as trainer:
            trainer.fit()
        return seen, trainer

    seen, trainer = run(False)
    assert seen == [(k, 8) for k in range(8)]
    assert trainer.targets["target"].decay == ct_target_decay(ct_levels(7, 8, 2, 150), 2, 0.9) > 0.998
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000008")
    assert run(True)[0] == [(k, 8) for k in range(4, 8)]


@pytest.mark.parametrize("objective, files", [
    ("improved_consistency_training", ()),
    ("consistency_training", ("target_target.safetensors",)),
    ("easy_consistency_tuning", ()),
])
def test_a_run_killed_mid_curriculum_resumes_bit_identical(tmp_path, capsys, objective, files):
    """8 steps with a checkpoint after 4: iCT's N(k) doubles every step of so short a run (K' = 1: 11, 21, ...,
    1281), CT's N(k) and mu(k) grow, ECT's stage a is k + 1; a run killed after its step-4 checkpoint and
    resumed ends with the weights, EMA and target network of the uninterrupted one."""
    args = ["train", str(CONFIG), *TINY, f"objective.type={objective}", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert "sliced Wasserstein" in capsys.readouterr().out
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_0000008")
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = latest_checkpoint(tmp_path / "whole"), latest_checkpoint(tmp_path / "split")
    for file in ("model.safetensors", "ema.safetensors", *files):
        wa, wb = load_weights(a / file), load_weights(b / file)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file


def test_ect_starts_from_a_diffusion_run(tmp_path):
    """The run's EMA weights become the student's: an EDM-preconditioned run's D is f in the limit sigma_min -> 0;
    a run of another parameterisation (eps prediction) is refused with what to use instead, or, with
    ``parameterisation: pretrained``, f = c_skip x^ + (1 - c_skip) x0_run starts at the run's x0 estimate."""
    denoising = ["train", str(CONFIG), *TINY, "train.steps=2", "objective.type=denoising", "--quiet"]
    assert main([*denoising, "objective.preconditioning=edm", "--out", str(tmp_path / "edm")]) == 0
    assert main([*denoising, "objective.prediction=eps", "--out", str(tmp_path / "eps")]) == 0
    ect = [*TINY, "objective.type=easy_consistency_tuning"]
    exp = Experiment.from_config(load_config(CONFIG, [*ect, f"objective.pretrained={tmp_path / 'edm'}"]))
    ema = load_weights(latest_checkpoint(tmp_path / "edm") / "ema.safetensors")
    assert all(torch.equal(v, exp.model.state_dict()[k]) for k, v in ema.items())
    assert exp.objective.modules().keys() == {"model"}  # no teacher afterwards
    with pytest.raises(ConfigError, match="ECT starts from an EDM-preconditioned run.*parameterisation: pretrained"):
        Experiment.from_config(load_config(CONFIG, [*ect, f"objective.pretrained={tmp_path / 'eps'}"]))
    exp = Experiment.from_config(load_config(CONFIG, [*ect, f"objective.pretrained={tmp_path / 'eps'}",
                                                      "objective.parameterisation=pretrained"]))
    run = load_pretrained(str(tmp_path / "eps"))
    x, t = torch.randn(64, 2), torch.full((64,), 0.7, dtype=F64)  # EDM: x^ = x, sigma = t
    c_skip = consistency_scalings(t, exp.objective.sigma_data, 0.002)[0][:, None].float()
    with torch.no_grad():
        f = exp.objective.denoiser(exp.model)(x, t)[0]
        x0 = run.objective.denoiser(run.model)(x, t)[0]
    assert torch.allclose(f, c_skip * x + (1 - c_skip) * x0, atol=1e-6) and (f - x0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="parameterisation 'pretrained' takes the pretrained run's"):
        EasyConsistencyTuning(parameterisation="pretrained")
