"""Training objectives, one module per family: what a batch's loss is, which modules train, which are
frozen or kept as an EMA target, which optimizers update them and when, and how the family samples.

The layer sits above ``genlab.models`` and ``genlab.diffusion``; the Trainer (``genlab.training``)
runs any objective and knows nothing of diffusion.
"""

from .base import Batch, BuildContext, Objective, Reference, conditions
from .autoencoder import AutoencoderObjective
from .denoising import DenoisingObjective, FlowMatchingObjective
from .classifier import NoisyClassifier
from .consistency import ConsistencyDistillation
from .controlnet import ControlNetTraining
from .consistency_training import ConsistencyTraining, EasyConsistencyTuning, ImprovedConsistencyTraining
from .distillation import ProgressiveDistillation
from .finetune import FineTune
from .guided_distillation import GuidedDistillation
from .flow_likelihood import FlowLikelihood
from .flow_matching import CFMDraw, ConditionalFlowMatching, check_path_process
from .meanflow import MeanFlow

__all__ = ["AutoencoderObjective", "Batch", "BuildContext", "Objective", "CFMDraw", "ConditionalFlowMatching", "ConsistencyDistillation",
           "ConsistencyTraining", "ControlNetTraining", "DenoisingObjective", "EasyConsistencyTuning", "FineTune",
           "FlowLikelihood", "FlowMatchingObjective", "GuidedDistillation", "ImprovedConsistencyTraining", "MeanFlow", "NoisyClassifier",
           "ProgressiveDistillation", "Reference", "check_path_process", "conditions"]
