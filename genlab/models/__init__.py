"""Backbones and layers. Models map ``(x, t_model, cond)`` to a tensor; they know nothing of processes."""

from genlab.models.attention import attention, available_backends
from genlab.models import flows  # noqa: F401  (registers the flow transforms and the flow model)
from genlab.models import autoencoders  # noqa: F401  (registers autoencoder_kl and autoencoder_vq)
from genlab.models.dit import DiT
from genlab.models.embeddings import timestep_embedding
from genlab.models.mlp import MLP, ConcatMLP
from genlab.models.quantizers import FSQ, LFQ, GroupedQuantizer, Quantizer, ResidualQuantizer, VectorQuantizer
from genlab.models.time_classifier import TimeClassifier
from genlab.models.unet import UNet

__all__ = ["FSQ", "LFQ", "ConcatMLP", "DiT", "GroupedQuantizer", "MLP", "Quantizer", "ResidualQuantizer",
           "TimeClassifier", "UNet", "VectorQuantizer", "attention", "available_backends", "timestep_embedding"]
