"""Quantizers for discrete autoencoders: ``quantized, indices, losses = q(z)``, ``q.codes(indices)``.

Registered under ``quantizer``: ``vq`` (:class:`VectorQuantizer`), ``fsq``, ``lfq``, ``residual``, ``grouped``.
"""

from genlab.models.quantizers.base import Quantized, Quantizer
from genlab.models.quantizers.estimators import rotation_trick, straight_through
from genlab.models.quantizers.fsq import FSQ
from genlab.models.quantizers.grouped import GroupedQuantizer
from genlab.models.quantizers.lfq import LFQ
from genlab.models.quantizers.residual import ResidualQuantizer
from genlab.models.quantizers.vq import VectorQuantizer

__all__ = ["FSQ", "LFQ", "GroupedQuantizer", "Quantized", "Quantizer", "ResidualQuantizer", "VectorQuantizer",
           "rotation_trick", "straight_through"]
