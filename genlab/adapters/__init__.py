"""Conditioning adapters: guidance (wrapping a Denoiser, keeping its protocol) and modules that attach
to a backbone's named injection points (LoRA, ControlNet, T2I-Adapter, GLIGEN, ...), never forking it.

The layer sits above ``genlab.models`` and ``genlab.diffusion`` and below ``genlab.objectives``.
"""

from genlab.adapters.controlled import ControlledModel, controlled_unet
from genlab.adapters.controlnet import ControlNet, MultiControlNet
from genlab.adapters.dit_controlnet import DiTControlNet

__all__ = ["ControlNet", "ControlledModel", "DiTControlNet", "MultiControlNet", "controlled_unet"]
