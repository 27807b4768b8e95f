"""Conditioning adapters: guidance (wrapping a Denoiser, keeping its protocol) and modules that attach
to a backbone's named injection points (LoRA, ControlNet, T2I-Adapter, GLIGEN, ...), never forking it.

The layer sits above ``genlab.models`` and ``genlab.diffusion`` and below ``genlab.objectives``.
"""

from .controlled import ControlledModel, controlled_unet
from .controlnet import ControlNet, MultiControlNet
from .dit_controlnet import DiTControlNet
from .dit_t2i_adapter import DiTT2IAdapter, MultiDiTT2IAdapter
from .gradient_guidance import ClassifierGuidance, GradientGuidance, GradientGuided, UniversalGuidance, noisy_logits
from .guidance import CFG, CFGDenoiser, CFGOnOutputs, Guidance, GuidedDenoiser
from .lora import (LoRA, LoRAAdapter, LoRAConfig, adapter_names, adapter_parameters, attach_lora, lora_layers,
                   mark_only_adapters_trainable, merge_adapters, remove_adapter, set_adapters, unmerge_adapters)

__all__ = ["CFG", "CFGDenoiser", "CFGOnOutputs", "ClassifierGuidance", "ControlNet", "ControlledModel", "DiTControlNet",
           "DiTT2IAdapter",
           "GradientGuidance", "GradientGuided", "Guidance", "GuidedDenoiser", "LoRA", "LoRAAdapter", "LoRAConfig",
           "MultiControlNet", "MultiDiTT2IAdapter", "UniversalGuidance", "adapter_names", "adapter_parameters",
           "attach_lora", "controlled_unet", "lora_layers", "mark_only_adapters_trainable", "merge_adapters",
           "noisy_logits", "remove_adapter", "set_adapters", "unmerge_adapters"]
