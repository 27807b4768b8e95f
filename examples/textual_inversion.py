"""Textual inversion on digits, end to end: how often a learnt class's samples are the digit it was
learnt from, next to the base run asked for the same digit by its old label and unconditionally.

    python examples/textual_inversion.py RUN [--digit 7] [--n 400] [--scale 1 3]

RUN is a ``finetune`` run with ``new_classes`` (``configs/finetune/textual_inversion_digits.yaml``);
its base run is read from its config. A thin layer over genlab's Python API: ``load_pretrained``
gives each run's Experiment with its EMA weights, the objective samples, the library's digits
classifier labels the samples; ``--scale`` adds classifier-free guidance against the null class
(as textual inversion is used with Stable Diffusion), scale 1 being none.
"""

from __future__ import annotations

import argparse

import torch

from genlab.adapters import CFG
from genlab.metrics import train_digits_classifier
from genlab.training.experiment import load_pretrained


def accuracy(exp, label: int, digit: int, n: int, seed: int, scale: float = 1.0) -> float:
    """The fraction of ``n`` samples drawn with ``label`` (-1: unconditional) at guidance ``scale`` that the
    classifier calls ``digit``."""
    g = torch.Generator().manual_seed(seed)
    cond = {"class_labels": torch.full((n,), label, dtype=torch.long)}
    denoiser = exp.objective.denoiser(exp.model)
    denoiser = denoiser if scale == 1 or label < 0 else CFG(scale=scale).wrap(denoiser)
    with torch.no_grad():
        samples = exp.sampler.sample(denoiser, shape=(n, *exp.data_shape), generator=g, cond=cond, progress=False)
    clf = train_digits_classifier(image_size=samples.shape[-1])
    return clf.accuracy(samples, torch.full((n,), digit, dtype=torch.long))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--digit", type=int, default=7, help="the digit the new class was learnt from")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales (1: none)")
    args = parser.parse_args()
    tuned = load_pretrained(args.run)
    new = tuned.objective.label
    base = load_pretrained(tuned.objective.base)
    rows = [(f"fine-tuned run, new class {new}", tuned, new),
            (f"base run, label {args.digit} (never trained)", base, args.digit),
            ("base run, unconditional", base, -1)]
    for name, exp, label in rows:
        for scale in args.scale if label >= 0 else [1.0]:
            guided = f", guidance {scale:g}" if scale != 1 else ""
            print(f"{name + guided:<55} {accuracy(exp, label, args.digit, args.n, args.seed, scale):6.1%} "
                  f"classified as {args.digit}")


if __name__ == "__main__":
    main()
