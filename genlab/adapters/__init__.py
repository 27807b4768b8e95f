"""Conditioning adapters: guidance (wrapping a Denoiser, keeping its protocol) and modules that attach
to a backbone's named injection points (LoRA, ControlNet, T2I-Adapter, GLIGEN, ...), never forking it.

The layer sits above ``genlab.models`` and ``genlab.diffusion`` and below ``genlab.objectives``.
"""

from .guidance import (CFG, CFGDenoiser, CFGOnOutputs, ClassifierGuidance, GradientGuidance, GradientGuided, Guidance,
                       GuidedDenoiser, UniversalGuidance, noisy_logits)

__all__ = ["CFG", "CFGDenoiser", "CFGOnOutputs", "ClassifierGuidance", "GradientGuidance", "GradientGuided",
           "Guidance", "GuidedDenoiser", "UniversalGuidance", "noisy_logits"]
