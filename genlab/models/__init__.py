"""Backbones and layers. Models map ``(x, t_model, cond)`` to a tensor; they know nothing of processes."""

from genlab.models.embeddings import timestep_embedding
from genlab.models.mlp import MLP

__all__ = ["MLP", "timestep_embedding"]
