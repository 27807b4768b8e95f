"""What a run reports: samples drawn with the EMA model, pictures, and quality numbers.

2D data: samples over held-out data, the sliced Wasserstein distance and the exact Wasserstein-2
distance (:func:`~genlab.metrics.wasserstein2`) on the first ``W2_POINTS`` samples and as many
held-out points, each next to its value between two held-out draws. Images: a grid with one
row per requested class; for digits, a classifier trained by the library gives the accuracy of
samples on their requested labels and a Frechet distance in its feature space (Heusel et al. 2017).
Data that gives a control image per item (digits' ``control: stroke``): every sample is requested with
the control of a held-out item of its label (:func:`requested_controls`), and ``control_iou`` is the mean
IoU between each sample's control, made as the data set makes its own (its stroke mask), and the
requested one; the same controls go to every row (the references: a ControlNet's base model alone).
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.devices import module_device
from ..core.errors import GenlabError, WriteError
from ..core.io import write_json_atomic
from ..data import Digits
from ..metrics import (Likelihood, bits_per_dim, frechet_distance, mask_iou, sliced_wasserstein,
                       train_digits_classifier, wasserstein2)
from .experiment import Experiment
from .plots import plot_image_grid, plot_samples_2d

W2_POINTS = 2000  # points of the exact W2 (an assignment problem: 0.5-1 s at 2000 2-D points, 3-7 s at 4000)


SampleFn = Callable[[int, torch.Generator, dict[str, Tensor] | None], Tensor]  # (n, generator, cond) -> [n, ...]


@torch.no_grad()
def draw(sample: SampleFn, device: torch.device, n: int, generator: torch.Generator,
         labels: Tensor | None = None, control: Tensor | None = None, context: Tensor | None = None) -> Tensor:
    """``n`` samples [n, *data shape] (float32, CPU) from ``sample`` (for the requested ``labels``,
    ``control`` images and cross-attention ``context``)."""
    given = {"class_labels": labels, "control": control, "context": context}
    cond = {k: v.to(device) for k, v in given.items() if v is not None}
    return sample(n, generator, cond or None).float().cpu()


def requested_labels(exp: Experiment, per_class: int) -> Tensor | None:
    """Labels 0..K-1, each ``per_class`` times (None for an unconditional model)."""
    k = exp.sampled_classes
    return None if k is None else torch.arange(k).repeat_interleave(per_class)


def requested_controls(exp: Experiment, labels: Tensor | None, n: int) -> Tensor | None:
    """The control images ``[n, ...]`` the samples are requested with: for the j-th sample of label k, the
    control of the j-th held-out item of class k (cycling through them; without labels, of held-out item
    j); None for data without a control per item."""
    if getattr(exp.data, "control", None) is None:
        return None
    held = exp.heldout_set()
    if labels is None:
        return held.control[torch.arange(n) % len(held.control)]
    pick = torch.empty(n, dtype=torch.long)
    for k in labels.unique().tolist():
        where, items = (labels == k).nonzero()[:, 0], (held.labels == k).nonzero()[:, 0]
        pick[where] = items[torch.arange(len(where)) % len(items)]
    return held.control[pick]


def evaluate(exp: Experiment, modules: dict[str, nn.Module], out: str | os.PathLike, name: str, seed: int,
             step: int, rows: bool = False) -> dict[str, Any]:
    """Sample, write ``{name}.png`` and ``{name}.json`` (the metrics) in ``out``, each atomically, and
    return the metrics. NonFiniteError, nothing written, if sampling ends with non-finite values.

    With ``rows``, ``metrics["rows"]`` also holds one entry per reference model of the objective (a
    distillation's teacher, with its own sampler and steps) and one per entry k of ``train.eval_steps``
    (the model sampled in k steps): ``label``, ``sampler``, ``steps``, ``image`` (``{name}-LABEL-Ksteps.png``)
    and the same metrics, each from the same seed.
    """
    out = Path(out)
    try:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create {(out / name).parent}: {e.strerror}") from None
    device = module_device(modules["model"])
    obj = exp.objective
    if not obj.draws_samples:  # a family that draws no samples (a classifier) reports its own metrics
        held = exp.heldout_split()
        g = torch.Generator(device=device).manual_seed(seed)
        images, labels = held.data.to(device), held.labels.to(device)
        metrics = {"step": step, **obj.metrics(modules, images, labels, g)}
        shown = obj.pictures(modules, images, labels, g.manual_seed(seed))
        if shown is not None:  # e.g. originals over reconstructions
            pictures, rows, title = shown
            plot_image_grid(pictures.float().cpu(), out / f"{name}.png", per_row=len(pictures) // rows, title=title)
            metrics["image"] = f"{name}.png"
        write_json_atomic(out / f"{name}.json", metrics)
        return metrics

    def model(steps: int | None) -> SampleFn:  # steps only when asked: a family may sample without any
        return lambda n, g, cond: obj.sample(modules, n, g, cond, **({} if steps is None else {"steps": steps}))

    method = obj.sampling_method() if hasattr(obj, "context") else repr(exp.sampler)
    kind = method if exp.guidance is None or obj.guidance_as_input else f"{method} with {exp.guidance!r}"
    metrics = {"step": step, "sampler": kind, "steps": obj.sampling_steps(), "image": f"{name}.png",
               **_evaluate(exp, model(None), device, out / f"{name}.png", seed, kind)}
    if isinstance(modules["model"], Likelihood):  # an exact density (a flow)
        metrics.update(heldout_likelihood(exp, modules, device, seed))
    wanted = []  # (label, sampler, steps, how to draw)
    if rows:
        wanted += [(label, ref.sampler, ref.steps, functools.partial(ref.sample, modules))
                   for label, ref in obj.references().items()]
        wanted += [("model", repr(with_steps(exp.sampler, k)), k, model(k)) for k in exp.train.eval_steps]
    if wanted:
        metrics["rows"] = []
        for label, kind, steps, sample in wanted:
            image = f"{name}-{label}-{steps}steps.png"
            row = {"label": label, "sampler": kind, "steps": steps, "image": image}
            row.update(_evaluate(exp, sample, device, out / image, seed, f"{label}: {kind}, {steps} steps"))
            metrics["rows"].append(row)
    write_json_atomic(out / f"{name}.json", metrics)
    return metrics


def heldout_likelihood(exp: Experiment, modules: dict[str, nn.Module], device: torch.device,
                       seed: int) -> dict[str, float]:
    """Held-out NLL of an exact density: vectors, ``train.eval_samples`` fresh points through the objective's
    ``heldout_likelihood`` (or :func:`heldout_nll`), with the data's true density's NLL beside it where the
    data set has one (``log_prob``); images, the test split through the objective's ``heldout_likelihood``
    (a flow's bound on the discrete data), nothing for an objective without one or data without a test split."""
    obj = exp.objective
    bound = getattr(obj, "heldout_likelihood", None)
    g = torch.Generator(device=device).manual_seed(seed)
    if len(exp.data_shape) == 1:
        x = exp.heldout(exp.train.eval_samples)
        out = bound(modules, x, None, g) if bound is not None else heldout_nll(modules["model"], x)
        if callable(getattr(exp.data, "log_prob", None)) and getattr(exp.data, "has_density", True):
            out["heldout_nll_nats_data"] = float(-exp.data.log_prob(x.double()).mean())
        return out
    if bound is None or exp.latent is not None:  # a density of latents is none of the images
        return {}
    try:
        held = exp.heldout_split()
    except GenlabError:  # image data without an in-memory test split (an image folder): no held-out number
        return {}
    return bound(modules, held.data, held.labels if exp.num_classes is not None else None, g)


@torch.no_grad()
def heldout_nll(model: Likelihood, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Mean -log p(x) of held-out continuous data x [N, ...] under ``model``, in nats and bits/dim."""
    device = module_device(model)
    log_p = torch.cat([model.log_prob(b.to(device)).double().cpu() for b in x.split(batch_size)])
    return {"heldout_nll_nats": float(-log_p.mean()), "heldout_bits_per_dim": float(bits_per_dim(log_p, x[0].numel()).mean())}


def with_steps(sampler: Any, steps: int) -> Any:
    """A shallow copy of ``sampler`` with ``steps`` steps (its ``repr`` labels a row)."""
    other = copy.copy(sampler)
    other.steps = steps
    return other


def _evaluate(exp: Experiment, sample: SampleFn, device: torch.device, image: Path, seed: int,
              title: str) -> dict[str, Any]:
    """The metrics of samples drawn by ``sample`` with a generator seeded ``seed``; their picture in ``image``."""
    g = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    if exp.latent is not None:  # latents -> images: every picture and metric below is of images
        sample = exp.latent.decoding(sample)
    if len(exp.image_shape) == 1:
        n = exp.train.eval_samples
        samples = draw(sample, device, n, g)
        metrics["sampling_seconds"] = time.perf_counter() - start
        held, held2 = exp.heldout(n), exp.heldout(n, draw=1)
        gen = torch.Generator().manual_seed(0)
        metrics["sliced_wasserstein"] = sliced_wasserstein(samples, held, generator=gen).item()
        metrics["sliced_wasserstein_data_vs_data"] = sliced_wasserstein(held2, held, generator=gen).item()
        k = min(n, W2_POINTS)
        metrics["wasserstein2"] = wasserstein2(samples[:k], held[:k])
        metrics["wasserstein2_data_vs_data"] = wasserstein2(held2[:k], held[:k])
        metrics["wasserstein2_points"] = k
        plot_samples_2d(samples, held, image, f"{title}: sliced W2 to held-out data "
                        f"{metrics['sliced_wasserstein']:.3f} (data vs data {metrics['sliced_wasserstein_data_vs_data']:.3f})")
        return metrics
    per_class = max(1, exp.train.eval_samples // (exp.sampled_classes or 1))
    labels = requested_labels(exp, per_class)
    control = requested_controls(exp, labels, per_class * (exp.sampled_classes or 1))
    context = None if exp.text is None else exp.text.context([exp.prompts[k] for k in labels.tolist()], device)
    given = labels if exp.text is None or exp.num_classes else None  # a text model is asked by its prompts
    samples = draw(sample, device, per_class * (exp.sampled_classes or 1), g, labels=given, control=control,
                   context=context)
    metrics["sampling_seconds"] = time.perf_counter() - start
    if exp.text is not None and not exp.prompts_name_classes:
        labels = None  # free prompts: nothing to score them against
    metrics.update(image_metrics(exp, samples, labels))
    if control is not None:
        metrics["control_iou"] = mask_iou(exp.data.make_control(samples), control).mean().item()
    rows = exp.sampled_classes or 10
    plot_image_grid(samples, image, rows=rows, per_row=min(per_class, 10) if labels is not None else None,
                    title=_title(title, metrics))
    return metrics


def image_metrics(exp: Experiment, samples: Tensor, labels: Tensor | None) -> dict[str, float]:
    """Classifier accuracy on the requested labels, the Frechet distance to held-out images in the
    classifier's feature space, and the fraction of samples the classifier assigns to some class
    with probability above 0.9 (``confident_fraction``) next to that fraction for the held-out test
    images (``confident_fraction_data``), for datasets that have a library classifier (digits)."""
    if not isinstance(exp.data, Digits):
        return {}

    size = exp.image_shape[-1]
    clf = train_digits_classifier(image_size=size)
    held = exp.heldout_images()
    out = {"frechet_distance": frechet_distance(clf.features(samples), clf.features(held))}
    # the same distance for as many training images as samples: what a perfect model would score
    pick = torch.randperm(len(exp.data), generator=torch.Generator().manual_seed(0))[: len(samples)]
    train = exp.data.images(pick)  # only the images used: a lazy data set reads just these
    out["frechet_distance_data_vs_data"] = frechet_distance(clf.features(train), clf.features(held))
    if labels is not None:
        out["classifier_accuracy"] = clf.accuracy(samples, labels)
    # samples that look like no digit (noise blobs) get an unsure prediction; real digits mostly do not
    out["confident_fraction"] = clf.confident_fraction(samples)
    out["confident_fraction_data"] = clf.confident_fraction(held)
    return out


def _title(head: str, m: dict[str, Any]) -> str:
    """``head`` (the sampler), then the metrics on a second line (one line is too wide for a 10-column grid)."""
    parts = []
    if "classifier_accuracy" in m:
        parts.append(f"accuracy on requested labels {m['classifier_accuracy']:.1%}")
    if "frechet_distance" in m:
        parts.append(f"FD {m['frechet_distance']:.2f} (training data {m['frechet_distance_data_vs_data']:.2f})")
    if "confident_fraction" in m:
        parts.append(f"max class prob > 0.9: {m['confident_fraction']:.1%} "
                     f"(test data {m['confident_fraction_data']:.1%})")
    if "control_iou" in m:
        parts.append(f"control IoU {m['control_iou']:.3f}")
    return head + ("\n" + " | ".join(parts) if parts else "")


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows of an evaluation (``metrics["rows"]``) as aligned lines, a header first: label, steps,
    then classifier accuracy, Frechet distance, confident fraction and control IoU (digits) or the sliced
    and exact Wasserstein-2 distances (2-D data), and the sampler."""
    columns = [("accuracy", "classifier_accuracy", "{:.1%}"), ("FD", "frechet_distance", "{:.3f}"),
               ("confident", "confident_fraction", "{:.1%}"), ("IoU", "control_iou", "{:.3f}"),
               ("sliced W2", "sliced_wasserstein", "{:.4f}"), ("W2", "wasserstein2", "{:.4f}")]
    shown = [c for c in columns if any(c[1] in r for r in rows)]
    width = max([5, *(len(str(r["label"])) for r in rows)])
    lines = [f"{'':<{width}}  steps" + "".join(f"  {head:>10}" for head, _, _ in shown) + "  sampler"]
    for r in rows:
        cells = "".join(f"  {fmt.format(r[key]) if key in r else '-':>10}" for _, key, fmt in shown)
        lines.append(f"{r['label']:<{width}}  {r['steps']:>5}{cells}  {r['sampler']}")
    return lines
