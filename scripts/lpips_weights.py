"""Write the weights file of genlab's LPIPS perceptual loss (``genlab.models.autoencoders.perceptual``) from
an installed ``lpips`` package (its calibrated lin weights ship inside it) and a torchvision VGG16 state dict
you already have (e.g. torchvision's ``vgg16-397923af.pth``). Nothing is downloaded.

Usage: ``python scripts/lpips_weights.py VGG16_STATE_DICT OUT.safetensors``; then name the file in the
autoencoder objective: ``objective.perceptual_weights=OUT.safetensors objective.perceptual_weight=1.0``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from genlab.models.autoencoders.perceptual import LPIPS, lpips_state_dict, read_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vgg", type=Path, help="torchvision VGG16 state dict (.pth, read with weights_only=True)")
    parser.add_argument("out", type=Path, help="the LPIPS weights file to write (.safetensors)")
    args = parser.parse_args()
    try:
        import lpips
    except ImportError:
        raise SystemExit("needs the lpips package (pip install lpips) for its lin weights") from None
    lins = torch.load(Path(lpips.__file__).parent / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    vgg = torch.load(args.vgg, map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in lpips_state_dict(vgg, lins).items()}
    save_file(state, str(args.out))
    read_state_dict(args.out, LPIPS())  # every key there, none extra
    print(f"wrote {args.out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
