"""Maximum likelihood for normalizing flows (Dinh et al. 2017, Sec. 3.1): the loss of a batch is the
negative log-likelihood by the change of variables,

    -log p_X(x | c) = -log p_Z(f(x) | c) - log|det df/dx|,

averaged over the batch, in nats or in bits per dimension (divided by D log 2, the helper of
:mod:`genlab.metrics.likelihood`). The data are taken as continuous (toy sets, or images already
dequantised); samples are f^{-1}(z), z from the base distribution at ``temperature``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat
from ..core.registry import register
from ..metrics.likelihood import bits_per_dim
from ..models.flows import Flow, probes_from
from .base import Batch, BuildContext, Objective


@register("objective", "flow_likelihood")
class FlowLikelihood(Objective):
    """Negative log-likelihood of a ``flow`` model, in ``units`` ``bits_per_dim`` or ``nats`` (the logs
    give both). Class-conditional flows (model ``num_classes``) get the batch's labels. Sampling ignores
    the experiment's process and sampler. Range: temperature >= 0."""

    def __init__(self, units: Literal["bits_per_dim", "nats"] = "bits_per_dim",
                 temperature: NonNegativeFloat = 1.0) -> None:
        self.units, self.temperature = units, temperature

    def build(self, context: BuildContext) -> None:
        """ValueError unless the model is a ``flow`` whose item shape is the data's."""
        super().build(context)
        if not isinstance(context.model, Flow):
            raise ValueError(f"flow_likelihood trains a normalizing flow (model type: flow), got "
                             f"{type(context.model).__name__}")
        if context.data_shape and tuple(context.model.shape) != tuple(context.data_shape):
            raise ValueError(f"flow_likelihood: the flow's shape {list(context.model.shape)} is not the data's "
                             f"{list(context.data_shape)}; set model.shape: {list(context.data_shape)}")

    def sampling_steps(self) -> int | None:
        return None  # one pass of f^{-1}

    def sampling_method(self) -> str:
        return f"flow inverse (temperature {self.temperature:g})"

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> tuple[Tensor, dict[str, float]]:
        """Mean -log p(x | labels) over the batch: (loss, {nll_nats, bits_per_dim}). The only draws are a
        CNF's Hutchinson probes, from ``generator``."""
        net = modules["model"]
        flow: Flow = getattr(net, "module", net)  # the forward runs through a distributed wrapper, if any
        x = batch["x"]
        cond = batch.get("class_labels") if flow.num_classes is not None else None
        with probes_from(generator):
            z, logdet = net(x, cond)
        log_p = flow.base_log_prob(z, cond) + logdet
        nll = -log_p.mean()
        bpd = bits_per_dim(log_p, flow.dims).mean()
        return (bpd if self.units == "bits_per_dim" else nll), {"nll_nats": float(nll.detach()), "bits_per_dim": float(bpd.detach())}

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None) -> Tensor:
        """``n`` samples f^{-1}(z) [n, *shape], z from the base at ``temperature`` drawn with ``generator``."""
        labels = None if cond is None else cond.get("class_labels")
        return modules["model"].sample(n, labels, generator, self.temperature)

