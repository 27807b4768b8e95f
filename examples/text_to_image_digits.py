"""Text-to-image digits, end to end: a UNet conditioned on captions through a frozen CLIP text encoder, trained
on captioned digits, then asked for each digit by a prompt; the digits classifier scores how often the samples
are the digit the prompt names, with and without classifier-free guidance.

    python examples/text_to_image_digits.py [--clip DIR] [--out runs/text_digits] [--steps 1500] [--scale 1 3]

Without ``--clip``, a tiny CLIP text encoder with random weights and a character-level tokenizer is built
locally (``genlab.testing.text.tiny_clip``, into ``runs/tiny_clip``): nothing downloads. Its features carry no
meaning, yet a frozen random encoder gives distinct prompts distinct contexts, which is all the UNet needs to
learn the mapping from the captions. ``--clip DIR`` points at a real CLIP directory in Hugging Face layout
instead (a model + tokenizer, or a pipeline with ``text_encoder/`` and ``tokenizer/``).

A thin layer over the config (``configs/text/text_digits.yaml``) and the command line: ``genlab train`` with
``text_encoder.path`` set, then ``genlab sample RUN guidance.scale=S`` per scale (each prints the accuracy on
the digits the prompts name). Further arguments are config overrides (``train.lr=1e-3``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genlab.cli import main as genlab

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text" / "text_digits.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", help="a local CLIP directory (default: a tiny random one built in runs/tiny_clip)")
    parser.add_argument("--out", default="runs/text_digits")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--n", type=int, default=400, help="samples per evaluation (split over the ten prompts)")
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales (1: none)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    clip = args.clip
    if clip is None:
        from genlab.testing.text import tiny_clip

        clip = str(tiny_clip("runs/tiny_clip"))
        print(f"built a tiny random CLIP text encoder in {clip} (character tokenizer, 32 wide, 2 layers)")
    train = [f"text_encoder.path={clip}", f"train.steps={args.steps}", f"train.eval_samples={args.n}"]
    if genlab(["train", str(CONFIG), *train, *args.overrides, "--out", args.out, "--quiet"]):
        raise SystemExit(2)
    for scale in args.scale:
        print(f"\nprompts 'a handwritten digit <word>', guidance scale {scale:g}:")
        if genlab(["sample", args.out, f"guidance.scale={scale}", "--n", str(args.n)]):
            raise SystemExit(2)


if __name__ == "__main__":
    main()
