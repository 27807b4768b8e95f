"""Guidance (genlab.adapters.guidance): classifier-free guidance wraps a Denoiser and keeps its protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genlab.adapters import CFG, CFGDenoiser, CFGOnOutputs
from genlab.core.errors import ConfigError
from genlab.core.registry import build, registered
from genlab.diffusion import DDIM as DDIMSampler
from genlab.diffusion import EDM, VE, VP, Denoiser, DiscreteVP, RectifiedFlow
from genlab.diffusion.denoiser import linear_path
from genlab.testing.peers import ddpm_times, run_diffusers, set_timesteps_float64, smooth_eps_model

B, D = 6, 3
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


class LabelModel:
    """A nonlinear class-conditional model(x [B, D], t [B], class_labels [B]) (-1 = null); counts its calls
    and the batch sizes it saw."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, class_labels=None, shift=None):
        self.calls.append(len(x))
        labels = torch.full((len(x),), -1) if class_labels is None else class_labels
        emb = (torch.cos(labels + 2.0) + 0.3 * torch.sin(1.5 * labels)).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        out = smooth_eps_model(x, t) + 0.7 * emb * (1 + x.tanh())
        return out if shift is None else out + shift


def x_at(seed=0, shape=(B, D)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_cfg(denoiser, x, t, w, labels, null=-1):
    """x0_u + w (x0_c - x0_u), eps likewise, from two separate calls of the unguided denoiser."""
    (x0_c, eps_c), (x0_u, eps_u) = (denoiser(x, t, class_labels=y) for y in (labels, torch.full_like(labels, null)))
    return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


@pytest.mark.parametrize("prediction, precond", [("eps", None), ("x0", None), ("v", None), ("score", None),
                                                 ("velocity", None), ("eps", "edm")])
def test_cfg_is_exact_in_x0_and_eps_with_one_model_call(prediction, precond):
    model = LabelModel()
    denoiser = Denoiser(model, VP(), prediction, preconditioning=precond)
    guided = CFG(scale=3.0).wrap(denoiser)
    assert isinstance(guided, CFGDenoiser) and linear_path(guided) is not None
    x, t = x_at(), torch.linspace(0.1, 0.9, B, dtype=torch.float64)  # per-sample times
    for level in (t, 0.4):
        model.calls.clear()
        x0, eps = guided(x, level, class_labels=LABELS)
        assert model.calls == [2 * B]  # cond + uncond in one batched call
        x0_ref, eps_ref = reference_cfg(denoiser, x, level, 3.0, LABELS)
        assert torch.allclose(x0, x0_ref, atol=1e-10) and torch.allclose(eps, eps_ref, atol=1e-10)
        raw, (a_x0, b_x0, a_eps, b_eps) = guided.linear(x, level, class_labels=LABELS)  # the fast path agrees
        lv = guided.level(level, x)
        assert torch.allclose(guided.to_x0_eps(raw, x, lv)[0], x0, atol=1e-12)


def test_a_guided_consistency_model_keeps_its_boundary():
    """Attributes a sampler reads from the denoiser are the wrapped one's: the consistency sampler re-noises
    from the consistency model's sigma_min."""
    from genlab.diffusion import ConsistencyDenoiser

    guided = CFG(scale=2.0).wrap(ConsistencyDenoiser(LabelModel(), VP(), sigma_min=0.01))
    assert guided.sigma_min == 0.01 and isinstance(guided, CFGDenoiser)
    with pytest.raises(AttributeError):
        guided.no_such_thing


def test_batched_call_equals_two_separate_calls():
    """Per-sample times, a per-sample condition tensor and a shared one: the joint call's halves are the two
    separate calls to 1e-6 (float32: a batch of 2B may take other kernels than a batch of B)."""
    from genlab.models import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               norm_groups=8, num_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layers would hide the condition
            p.add_(0.05 * torch.randn_like(p))
    denoiser = Denoiser(net, VP(), "v")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        raw = CFG(scale=2.5).wrap(denoiser).raw(x, denoiser.level(t, x), class_labels=labels)
        c, u = (denoiser.raw(x, denoiser.level(t, x), class_labels=y) for y in (labels, torch.full_like(labels, -1)))
    assert (raw - (u + 2.5 * (c - u))).abs().max() < 1e-6
    assert (c - u).abs().max() > 1e-3  # the condition matters


@pytest.mark.parametrize("process, prediction", [(VP(), "v"), (DiscreteVP(), "eps"), (EDM(), "x0"),
                                                 (RectifiedFlow(), "velocity"), (VE(), "score")],
                         ids=["vp", "ddpm", "edm", "rectified_flow", "ve"])
def test_every_sampler_runs_guided_and_the_fast_path_equals_the_outputs(process, prediction):
    """Every registered sampler with the guided denoiser (fast path) equals the same sampler with CFG on a
    denoiser without one (x0 and eps guided), and the model is called once per model evaluation: as often
    as unguided, each call on the batch of 2B."""
    model = LabelModel()
    denoiser = Denoiser(model, process, prediction)

    class Plain:  # the same denoiser, without a fast path
        process = denoiser.process

        def __call__(self, x, t, **cond):
            return denoiser(x, t, **cond)

    cfg = CFG(scale=2.0)
    slow = cfg.wrap(Plain())
    assert isinstance(slow, CFGOnOutputs) and linear_path(slow) is None
    x = x_at(1) * process.prior((1,), generator=torch.Generator().manual_seed(0)).abs().clamp(min=1)
    # rectified flow: below t = 1 (alpha = 0), where Karras grids and DEIS's coefficients are undefined
    times = torch.linspace(0.95, 0.0, 5, dtype=torch.float64) if isinstance(process, RectifiedFlow) else None
    for name in sorted(set(registered("sampler")["sampler"]) - {"ode"}):
        sampler = build("sampler", {"type": name, "steps": 4})
        runs, calls = [], []
        for guided in (denoiser, cfg.wrap(denoiser), slow):
            model.calls.clear()
            runs.append(sampler.sample(guided, x.clone(), generator=torch.Generator().manual_seed(3), progress=False,
                                       cond={"class_labels": LABELS}, times=times))
            calls.append(list(model.calls))
        assert calls[1] == calls[2] == [2 * B] * len(calls[0]), name
        assert torch.allclose(runs[1], runs[2], atol=1e-9), name


def test_scale_one_and_zero_are_one_call_and_exact():
    model = LabelModel()
    denoiser = Denoiser(model, VP(), "eps")
    x, null = x_at(), torch.full_like(LABELS, -1)
    for w, labels in ((1.0, LABELS), (0.0, null)):
        model.calls.clear()
        out = CFG(scale=w).wrap(denoiser)(x, 0.3, class_labels=LABELS)
        assert model.calls == [B]
        assert all(torch.equal(a, b) for a, b in zip(out, denoiser(x, 0.3, class_labels=labels)))


def test_interval_applies_guidance_only_inside_per_sample():
    """sigma = sigma_t / alpha_t in (lo, hi]: inside, guided; outside, the conditional prediction alone (one
    call when no sample is inside)."""
    model = LabelModel()
    process = VP()
    denoiser = Denoiser(model, process, "eps")
    t = torch.linspace(0.05, 0.95, B, dtype=torch.float64)
    sigma = process.level(t).sigma_edm
    lo, hi = float(sigma[1]), float(sigma[3])  # samples 2 and 3 inside (lo excluded, hi included)
    guided = CFG(scale=4.0, interval=(lo, hi)).wrap(denoiser)
    x = x_at()
    x0, eps = guided(x, t, class_labels=LABELS)
    x0_g, eps_g = reference_cfg(denoiser, x, t, 4.0, LABELS)
    x0_c, eps_c = denoiser(x, t, class_labels=LABELS)
    inside = torch.tensor([False, False, True, True, False, False])
    assert torch.allclose(x0[inside], x0_g[inside], atol=1e-10)
    assert torch.allclose(eps[inside], eps_g[inside], atol=1e-10)
    assert torch.allclose(x0[~inside], x0_c[~inside], atol=1e-10)
    model.calls.clear()
    outside = guided(x, float(t[0]), class_labels=LABELS)
    assert model.calls == [B] and torch.equal(outside[0], denoiser(x, float(t[0]), class_labels=LABELS)[0])


def test_uncond_takes_any_condition():
    """A negative condition: a tensor [1, ...] repeated over the batch, over the call's own; shared entries
    (a scalar) passed once; an entry dropped (None) falls back to two calls."""
    model = LabelModel()
    denoiser = Denoiser(model, VP(), "eps")
    x = x_at()
    shift, negative = torch.zeros(B, D, dtype=torch.float64), torch.full((1, D), 0.5, dtype=torch.float64)
    guided = CFG(scale=2.0, uncond={"shift": negative}).wrap(denoiser)
    model.calls.clear()
    x0, _ = guided(x, 0.5, class_labels=LABELS, shift=shift)
    assert model.calls == [2 * B]
    x0_c = denoiser(x, 0.5, class_labels=LABELS, shift=shift)[0]
    x0_u = denoiser(x, 0.5, class_labels=LABELS, shift=negative.expand(B, D))[0]
    assert torch.allclose(x0, x0_u + 2.0 * (x0_c - x0_u), atol=1e-10)
    model.calls.clear()
    dropped = CFG(scale=2.0, uncond={"class_labels": None}).wrap(denoiser)(x, 0.5, class_labels=LABELS)
    assert model.calls == [B, B]
    assert torch.allclose(dropped[0], reference_cfg(denoiser, x, 0.5, 2.0, LABELS)[0], atol=1e-10)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("w, phi", [(3.0, 0.0), (3.0, 0.7), (7.5, 1.0)])
def test_rescale_matches_diffusers_pipeline_recipe(prediction, w, phi):
    """diffusers' DDIMScheduler with its pipelines' CFG recipe, noise_pred = uncond + w (cond - uncond), then
    rescale_noise_cfg(noise_pred, cond, phi), against genlab's DDIM on the guided Denoiser: every step."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                                    steps_offset=0, prediction_type=prediction)
    set_timesteps_float64(sched, 10)
    model, x = LabelModel(), x_at(2, (B, 2, 4, 4))
    labels = LABELS

    def pipeline(inp, t):
        both = model(torch.cat([inp, inp]), t, class_labels=torch.cat([labels, torch.full_like(labels, -1)]))
        cond, uncond = both.chunk(2)
        noise_pred = uncond + w * (cond - uncond)
        return rescale_noise_cfg(noise_pred, cond, guidance_rescale=phi) if phi > 0 else noise_pred

    theirs = run_diffusers(sched, x, model=pipeline)
    process = DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist())
    guided = CFG(scale=w, rescale=phi).wrap(Denoiser(model, process, {"epsilon": "eps"}.get(prediction, "v")))
    ours = []
    DDIMSampler(10).sample(guided, x.clone(), times=ddpm_times(sched), progress=False, cond={"class_labels": labels},
                    callback=lambda info: ours.append(info.x))
    assert len(ours) == len(theirs) == 10
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() < 1e-5, f"step {i}"
    if phi:  # the rescale changes the samples
        plain = CFG(scale=w).wrap(Denoiser(model, process, {"epsilon": "eps"}.get(prediction, "v")))
        assert (DDIMSampler(10).sample(plain, x.clone(), times=ddpm_times(sched), progress=False,
                                cond={"class_labels": labels}) - ours[-1]).abs().max() > 1e-3


def test_rescale_acts_on_the_network_output_step_by_step():
    """phi out std(c) / std(out) + (1 - phi) out, per sample, on raw; one-value samples are refused."""
    model = LabelModel()
    denoiser = Denoiser(model, RectifiedFlow(), "velocity")
    x, level = x_at(), denoiser.level(0.6, x_at())
    c, u = (denoiser.raw(x, level, class_labels=y) for y in (LABELS, torch.full_like(LABELS, -1)))
    out = u + 2.0 * (c - u)
    want = 0.3 * out * (c.std(1, keepdim=True) / out.std(1, keepdim=True)) + 0.7 * out
    assert torch.allclose(CFG(scale=2.0, rescale=0.3).wrap(denoiser).raw(x, level, class_labels=LABELS), want,
                          atol=1e-12)
    with pytest.raises(ValueError, match="one value"):
        CFG(scale=2.0, rescale=0.3).wrap(Denoiser(model, VP(), "eps"))(x[:, :1], 0.5, class_labels=LABELS)


@pytest.mark.parametrize("cfg, match, config_match", [
    ({"scale": -1.0}, "scale must be >= 0", r"guidance.scale: expected float >= 0"),
    ({"rescale": 1.5}, "rescale must be >= 0 and <= 1", r"guidance.rescale: expected float >= 0 and <= 1"),
    ({"interval": [2.0, 1.0]}, r"sigma_lo <= sigma_hi, got \[2.0, 1.0\]", r"guidance: CFG: interval must be"),
    ({"interval": [-1.0, 1.0]}, r"sigma_lo <= sigma_hi, got \[-1.0, 1.0\]",
     r"guidance.interval: expected list \[float >= 0, float >= 0\]"),
    ({"uncond": {"class_labels": "none"}}, r"uncond\['class_labels'\] must be a number, a tensor or None, got str",
     r"guidance: CFG: uncond\['class_labels'\] must be"),
])
def test_bad_settings_are_refused(cfg, match, config_match):
    with pytest.raises(ValueError, match=match):
        CFG(**cfg)
    with pytest.raises(ConfigError, match=config_match):
        build("guidance", {"type": "cfg", **cfg}, path="guidance")


def test_rescale_needs_the_network_output():
    class Plain:
        process = VP()

        def __call__(self, x, t, **cond):
            return x, x

    with pytest.raises(ValueError, match="rescale"):
        CFG(scale=2.0, rescale=0.5).wrap(Plain())


DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
SMALL = ["model.channels=8", "model.channel_mult=[1]", "model.attention_levels=[]", "train.eval_samples=20",
         "train.steps=1", "sampler.steps=3"]


def test_a_resumed_run_may_change_its_guidance(tmp_path):
    """Guidance changes how a run samples, not what it learns: resuming with another guidance is allowed."""
    import yaml

    from genlab.training.resume import check_resume_config

    saved = {"model": {"type": "unet", "num_classes": 10}, "guidance": {"scale": 2.0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume_config(tmp_path, {**saved, "guidance": {"type": "cfg", "scale": 4.0, "interval": [0.5, 5.0]}})
    check_resume_config(tmp_path, {"model": saved["model"]})
    with pytest.raises(ConfigError, match="model.num_classes"):
        check_resume_config(tmp_path, {**saved, "model": {"type": "unet", "num_classes": 5}})


@pytest.mark.slow
def test_guidance_from_the_config_and_the_command_line(tmp_path, capsys):
    """A training config's ``guidance:`` guides the final evaluation; ``genlab sample RUN guidance.scale=3``
    guides sampling (a mapping without type is cfg); bad values are one line on stderr and exit 2."""
    from genlab.cli import main

    run = tmp_path / "run"
    assert main(["train", str(DIGITS), *SMALL, "guidance.scale=2", "--out", str(run), "--quiet"]) == 0
    assert "CFG(scale=2, rescale=0" in json.loads((run / "samples.json").read_text())["sampler"]
    capsys.readouterr()
    assert main(["sample", str(run), "guidance.scale=3", "guidance.interval=[0.1, 5]", "--n", "20",
                 "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "CFG(scale=3, rescale=0, interval=(0.1, 5.0)" in out
    assert (tmp_path / "s" / "samples-ddpm-3steps-cfg3-interval0.1-5-seed1234.png").is_file()
    for override, message in [("guidance.scale=-1", "guidance.scale: expected float >= 0, got int -1"),
                              ("guidance.rescale=2", "guidance.rescale: expected float >= 0 and <= 1"),
                              ("guidance.interval=[2, 1]", "guidance: CFG: interval must be [sigma_lo, sigma_hi]"),
                              ("guidance.type=cfgg", "guidance.type: unknown guidance 'cfgg'; did you mean 'cfg'?")]:
        assert main(["sample", str(run), override, "--n", "20", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("genlab: error: ") and message in err and len(err.strip().splitlines()) == 1, err


# ----- classifier and universal guidance: one gradient hook -------------------------------------------------
def mixture_classifier(mixture, process):
    """The exact p(k | x_t) of a Gaussian mixture's components as a time-conditioned classifier
    (x [B, D], model time 1000 t) -> logits [B, K]."""

    def classifier(x, t_in):
        level = process.level(t_in.double() / 1000)
        return mixture._components(x, level.alpha, level.sigma)[0]

    return classifier


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_classifier_guidance_with_the_exact_classifier_gives_the_class_conditional_denoiser(prediction):
    """Scale 1 with the exact p(y | x_t): score + grad log p(y | x_t) = grad log p(x_t | y), so the guided
    unconditional mixture denoiser is the exact denoiser of component y (Dhariwal & Nichol 2021, Eq. 14)."""
    from genlab.adapters import ClassifierGuidance
    from genlab.testing import GaussianMixture, exact_denoiser

    mix, process = GaussianMixture.ring(k=3, radius=1.5, std=0.4), VP()
    guidance = ClassifierGuidance(mixture_classifier(mix, process), scale=1.0)
    guided = guidance.wrap(exact_denoiser(mix, process, prediction))
    x, t = x_at(4, (B, 2)), torch.linspace(0.2, 0.8, B, dtype=torch.float64)
    for time in (t, 0.5):  # per-sample and shared levels
        x0, eps = guided(x, time, class_labels=LABELS)
        for k in range(3):
            component = GaussianMixture(torch.ones(1), mix.means[k:k + 1], mix.covs[k:k + 1])
            x0_k, eps_k = exact_denoiser(component, process, prediction)(x, time)
            rows = LABELS == k
            assert torch.allclose(x0[rows], x0_k[rows], atol=1e-8) and torch.allclose(eps[rows], eps_k[rows], atol=1e-8)
    x0 = guided(x, t, class_labels=LABELS)[0]
    unguided = exact_denoiser(mix, process, prediction)(x, t)[0]
    assert (x0 - unguided).abs().max() > 0.1
    null = guided(x, t, class_labels=torch.full_like(LABELS, -1))[0]  # the null label is not guided
    assert torch.allclose(null, unguided, atol=1e-12)


def test_universal_guidance_is_the_gradient_through_the_denoiser():
    """f = -loss(x0_hat(x_t)): eps_g = eps - s sigma grad_x f with the gradient through the model, and x0_g
    = x0 + s sigma^2 / alpha grad_x f (Bansal et al. 2023, Eq. 6); the fast path agrees."""
    from genlab.adapters import UniversalGuidance

    model = LabelModel()
    denoiser = Denoiser(model, VP(), "v")
    target = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def loss(x0, **cond):
        return (x0 - target).square().sum(-1) / 2

    guided = UniversalGuidance(loss, scale=0.3).wrap(denoiser)
    x, t = x_at(5), torch.linspace(0.2, 0.9, B, dtype=torch.float64)
    x0, eps = guided(x, t, class_labels=LABELS)
    x_in = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(-loss(denoiser(x_in, t, class_labels=LABELS)[0]).sum(), x_in)[0]
    x0_u, eps_u = denoiser(x, t, class_labels=LABELS)
    level = denoiser.level(t, x)
    sigma, alpha = (v[:, None] for v in (level.sigma, level.alpha))
    assert torch.allclose(eps, eps_u - 0.3 * sigma * grad, atol=1e-10)
    assert torch.allclose(x0, x0_u + 0.3 * sigma**2 / alpha * grad, atol=1e-10)
    raw, coefs = guided.linear(x, t, class_labels=LABELS)
    assert torch.allclose(guided.to_x0_eps(raw, x, level)[0], x0, atol=1e-12)
    # on the exact denoiser of a ring of 8 Gaussians, guidance towards one mode's mean draws samples there
    from genlab.testing import GaussianMixture, exact_denoiser

    mixture = GaussianMixture.ring()
    ring = exact_denoiser(mixture, VP(), "v")

    def to_mode(x0, **cond):
        return (x0 - mixture.means[0]).square().sum(-1) / 2

    samples = [DDIMSampler(20).sample(d, x_at(6, (256, 2)), progress=False)
               for d in (ring, UniversalGuidance(to_mode, scale=2.0).wrap(ring))]
    assert to_mode(samples[1]).mean() < 0.5 * to_mode(samples[0]).mean()


def test_classifier_guidance_refuses_a_classifier_of_another_process_and_no_labels():
    from genlab.adapters import ClassifierGuidance

    denoiser = Denoiser(LabelModel(), VP(), "eps")
    guidance = ClassifierGuidance(lambda x, t: x[:, :2], scale=1.0)
    guidance.process = RectifiedFlow()
    with pytest.raises(ValueError, match="trained on RectifiedFlow"):
        guidance.wrap(denoiser)
    guidance.process = None
    with pytest.raises(ValueError, match="labels to guide towards"):
        guidance.wrap(denoiser)(x_at(), 0.5)
    with pytest.raises(ValueError, match="not loaded"):
        ClassifierGuidance("runs/nowhere").wrap(denoiser)


@pytest.mark.slow
def test_classifier_guidance_from_the_command_line(tmp_path, capsys):
    """``configs/guidance/classifier_digits.yaml`` trains (a few steps) and reports its accuracy by noise level;
    ``genlab sample`` of an unconditional digits run with ``guidance.type=classifier`` requests labels and
    reports the accuracy on them; a run of another objective as the classifier is one line, exit 2."""
    from genlab.cli import main

    classifier, uncond = tmp_path / "classifier", tmp_path / "uncond"
    config = DIGITS.parent / "guidance" / "classifier_digits.yaml"
    assert main(["train", str(config), "train.steps=5", "--out", str(classifier), "--quiet"]) == 0
    assert "classifier accuracy on held-out data noised at t / t_max: 0: " in capsys.readouterr().out
    assert set(json.loads((classifier / "samples.json").read_text())) >= {f"classifier_accuracy_t{f}" for f in
                                                                           ("0", "0.25", "0.5", "0.75", "1")}
    assert main(["train", str(DIGITS), *SMALL, "model.num_classes=null", "model.class_dropout=0", "--out",
                 str(uncond), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", str(uncond), "guidance.type=classifier", f"guidance.classifier={classifier}",
                 "guidance.scale=2", "--n", "20", "--out", str(tmp_path / "s")]) == 0
    metrics = json.loads((tmp_path / "s" / "samples-ddpm-3steps-classifier2-seed1234.json").read_text())
    assert "ClassifierGuidance(scale=2" in metrics["sampler"] and "classifier_accuracy" in metrics
    assert main(["sample", str(uncond), "guidance.type=classifier", f"guidance.classifier={uncond}",
                 "--n", "20", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "guidance: classifier: " in err and "needs a run of objective noisy_classifier" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cfg_raises_the_accuracy_of_a_briefly_trained_digits_model(tmp_path, capsys):
    """The digits main job's model (class-conditional UNet, class_dropout 0.1, v prediction), trained briefly:
    its DDPM samples at guidance scale 3 are classified as the requested digit in at least 97% of cases (the
    issue's target), 3 points more often than unguided at least."""
    from genlab.cli import main

    run = tmp_path / "run"
    brief = ["train.steps=300", "train.eval_samples=200", "train.checkpoint_every=300"]
    assert main(["train", str(DIGITS), *brief, "--out", str(run), "--quiet"]) == 0
    plain = json.loads((run / "samples.json").read_text())["classifier_accuracy"]
    assert main(["sample", str(run), "guidance.scale=3", "--n", "200", "--out", str(tmp_path / "s")]) == 0
    guided = json.loads((tmp_path / "s" / "samples-ddpm-25steps-cfg3-seed1234.json").read_text())
    print(f"accuracy on requested labels: unguided {plain:.1%}, cfg 3 {guided['classifier_accuracy']:.1%}")
    assert guided["classifier_accuracy"] >= max(0.97, plain + 0.03)  # measured: 93.0% -> 99.5%


def test_guidance_runs_on_the_meta_device():
    """No CPU tensor mixes in (the null labels, per-sample weights, the classifier's shift) and every draw is
    on its generator's device, with per-sample times and the guidance interval splitting the batch."""
    from genlab.adapters import ClassifierGuidance
    from genlab.testing.devices import DeviceAudit, generator_on

    def model(x, t, class_labels=None):
        return 0.5 * x + 1e-3 * t[:, None] + 0.1 * class_labels.to(x.dtype)[:, None]

    def classifier(x, t):
        return torch.cat([x, x.square()], 1) * (1 + 1e-3 * t[:, None])

    labels = torch.tensor([0, 1, 2], device="meta")
    times = torch.linspace(1, 0, 5, dtype=torch.float64)[:, None].expand(5, 3).clamp(min=1e-3).to("meta")
    guides = (CFG(scale=3.0, rescale=0.5, interval=(0.5, 10.0)), ClassifierGuidance(classifier, 2.0, model_labels=True))
    for guidance in guides:
        guided = guidance.wrap(Denoiser(model, VP(), "v"))
        with DeviceAudit():
            x = DDIMSampler(4, eta=1.0).sample(guided, shape=(3, 2), generator=generator_on("meta"), progress=False,
                                               cond={"class_labels": labels}, check_finite=False)
            x = DDIMSampler(4).sample(guided, torch.zeros(3, 2, device="meta"), times=times, progress=False,
                                      cond={"class_labels": labels}, check_finite=False)
        assert (x.device.type, x.dtype) == ("meta", torch.float32)
