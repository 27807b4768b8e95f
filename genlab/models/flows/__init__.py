"""Normalizing flows: invertible transforms (namespace ``flow_transform``) and the ``flow`` model.

Every transform maps data to noise, ``forward(x, cond) -> (z, logdet [B])``, and back,
``inverse(z, cond) -> (x, logdet [B])``; :class:`Flow` adds the base distribution and gives exact
``log_prob``, ``sample`` and bits/dim. Couplings and MADE flows condition on class labels or a context
tensor through their networks (:mod:`.context`); discrete data are dequantized uniformly or variationally
(:mod:`.dequantization`).
"""

from genlab.models.flows.autoregressive import IAF, MAF, SplineAutoregressive
from genlab.models.flows.base import FlowChain, FlowTransform
from genlab.models.flows.cnf import CNF, probes_from
from genlab.models.flows.context import Context
from genlab.models.flows.couplings import AdditiveCoupling, AffineCoupling, DiagonalScaling
from genlab.models.flows.dequantization import UniformDequantization, VariationalDequantization
from genlab.models.flows.glow import GlowCoupling, GlowStep, InvertibleConv1x1
from genlab.models.flows.made import MADE
from genlab.models.flows.model import Flow
from genlab.models.flows.multiscale import FactorOut, Squeeze, Unsqueeze
from genlab.models.flows.normalization import ActNorm, BatchNormFlow
from genlab.models.flows.spline_coupling import SplineCoupling
from genlab.models.flows.splines import rq_knots, rq_spline

__all__ = ["CNF", "IAF", "MADE", "MAF", "ActNorm", "AdditiveCoupling", "AffineCoupling", "BatchNormFlow", "Context",
           "DiagonalScaling", "UniformDequantization", "VariationalDequantization",
           "FactorOut", "Flow", "FlowChain", "FlowTransform", "GlowCoupling", "GlowStep", "InvertibleConv1x1",
           "SplineAutoregressive", "SplineCoupling", "Squeeze", "Unsqueeze", "probes_from", "rq_knots", "rq_spline"]
