"""LoRA fine-tuning on digits with genlab's one Trainer: teach a trained run a label it never learnt,
then save the adapter in the peft, diffusers and kohya layouts.

The config (``configs/finetune/lora_digits.yaml``) starts from a run whose 7s were never labelled
(``configs/finetune/digits_holdout7.yaml``), attaches rank-4 LoRA adapters to its convolutions and
projections and freezes every base weight; the Trainer updates the adapters alone. The script prints
how often samples asked for a 7 are 7s before and after, and writes the adapter files.

Run (a few minutes on 2 CPU cores, after ``genlab train configs/finetune/digits_holdout7.yaml --out
runs/digits_holdout7``):

    python examples/finetune_lora.py --base runs/digits_holdout7 --out runs/lora_digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from genlab.adapters import adapter_parameters
from genlab.core.config import load_config
from genlab.interop.lora_formats import save_lora
from genlab.metrics import train_digits_classifier
from genlab.training import Experiment, Trainer
from genlab.training.experiment import load_pretrained

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "lora_digits.yaml"


def sevens(exp: Experiment, model: torch.nn.Module, n: int = 200) -> float:
    """The fraction of ``n`` samples asked for label 7 that the library's digits classifier calls 7."""
    labels = torch.full((n,), 7, dtype=torch.long)
    with torch.no_grad():
        x = exp.objective.sample({"model": model}, n, torch.Generator().manual_seed(0), {"class_labels": labels})
    return train_digits_classifier(image_size=x.shape[-1]).accuracy(x, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/digits_holdout7", help="the trained run to fine-tune")
    parser.add_argument("--out", default="runs/lora_digits", help="the fine-tuning run's directory")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (train.steps=200 ...)")
    args = parser.parse_args()

    exp = Experiment.from_config(load_config(CONFIG, [f"adapters.base={args.base}", *args.overrides]))
    trained = sum(p.numel() for p in adapter_parameters(exp.model))
    total = sum(p.numel() for p in exp.model.parameters())
    print(f"training {trained:,} adapter parameters of {total:,} ({trained / total:.1%})")
    before = sevens(load_pretrained(args.base), load_pretrained(args.base).model)
    with Trainer(exp, args.out) as trainer:
        trainer.fit()
        tuned = trainer.sampling_modules()["model"]
    print(f"samples asked for a 7 that are 7s: {before:.1%} before, {sevens(exp, tuned):.1%} after LoRA")
    for fmt, name in (("peft", "lora_peft"), ("diffusers", "lora_diffusers.safetensors"),
                      ("kohya", "lora_kohya.safetensors")):
        print(f"{fmt}: {save_lora(tuned, Path(args.out) / name, format=fmt)}")


if __name__ == "__main__":
    main()
