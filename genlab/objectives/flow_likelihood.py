"""Maximum likelihood for normalizing flows (Dinh et al. 2017, Sec. 3.1): the loss of a batch is the
negative log-likelihood by the change of variables,

    -log p_X(x | c) = -log p_Z(f(x) | c) - log|det df/dx|,

averaged over the batch, in nats or in bits per dimension (divided by D log 2, the helper of
:mod:`genlab.metrics.likelihood`). With ``dequantization`` ``none`` the data are taken as continuous
(toy sets); ``uniform`` or ``variational`` take them as discrete, on ``levels`` evenly spaced values
of ``data_range``, and the loss is minus the dequantization bound on log P(x) (Ho et al. 2019, Flow++,
Sec. 3.1, with the bin-count term; :mod:`genlab.models.flows.dequantization`), so that bits/dim are
those of the discrete data. The variational dequantizer q(u | x) is a module ``dequantizer`` trained
with the flow by the same optimizer. Samples are f^{-1}(z), z from the base distribution at ``temperature``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat, PositiveInt, Range
from ..core.devices import module_device
from ..core.registry import register
from ..metrics.likelihood import bits_per_dim
from ..models.flows import Flow, probes_from
from ..models.flows.dequantization import (UniformDequantization, VariationalDequantization,
                                           dequantized_log_likelihood)
from .base import Batch, BuildContext, Objective


@register("objective", "flow_likelihood")
class FlowLikelihood(Objective):
    """Negative log-likelihood of a ``flow`` model, in ``units`` ``bits_per_dim`` or ``nats`` (the logs
    give both). Class-conditional flows (model ``num_classes``) get the batch's labels. Sampling ignores
    the experiment's process and sampler. ``dequantization``: ``none`` (continuous data), ``uniform`` or
    ``variational`` (discrete data on ``levels`` values of ``data_range``; the variational dequantizer has
    ``dequantizer_steps`` conditional affine couplings of width ``dequantizer_hidden``); held-out bits/dim use
    ``heldout_draws`` draws of u (more than one: the importance-weighted bound). Ranges: temperature >= 0,
    levels >= 2, dequantizer_steps, dequantizer_hidden, heldout_draws >= 1."""

    uses_process = False

    def __init__(self, units: Literal["bits_per_dim", "nats"] = "bits_per_dim",
                 temperature: NonNegativeFloat = 1.0,
                 dequantization: Literal["none", "uniform", "variational"] = "none",
                 levels: Annotated[int, Range(ge=2)] = 256, data_range: tuple[float, float] = (-1.0, 1.0),
                 dequantizer_steps: PositiveInt = 4, dequantizer_hidden: PositiveInt = 32,
                 heldout_draws: PositiveInt = 1) -> None:
        self.units, self.temperature, self.dequantization = units, temperature, dequantization
        self.dequantizer: UniformDequantization | None = None  # built by build()
        self.levels, self.data_range = levels, (float(data_range[0]), float(data_range[1]))
        self.dequantizer_steps, self.dequantizer_hidden, self.heldout_draws = (dequantizer_steps, dequantizer_hidden,
                                                                               heldout_draws)
        if not self.data_range[1] > self.data_range[0]:
            raise ValueError(f"flow_likelihood: data_range must be [lo, hi] with hi > lo, got {list(data_range)}")

    def build(self, context: BuildContext) -> None:
        """ValueError unless the model is a ``flow`` whose item shape is the data's; builds the dequantizer."""
        super().build(context)
        if not isinstance(context.model, Flow):
            raise ValueError(f"flow_likelihood trains a normalizing flow (model type: flow), got "
                             f"{type(context.model).__name__}")
        if context.data_shape and tuple(context.model.shape) != tuple(context.data_shape):
            raise ValueError(f"flow_likelihood: the flow's shape {list(context.model.shape)} is not the data's "
                             f"{list(context.data_shape)}; set model.shape: {list(context.data_shape)}")
        if self.dequantization == "uniform":
            self.dequantizer = UniformDequantization(self.levels, self.data_range)
        elif self.dequantization == "variational":
            self.dequantizer = VariationalDequantization.default(
                tuple(context.model.shape), self.dequantizer_steps, self.dequantizer_hidden, self.levels,
                self.data_range)

    def modules(self) -> dict[str, nn.Module]:
        """The flow and, with variational dequantization, the dequantizer q(u | x) (trained with it)."""
        out = super().modules()
        if isinstance(getattr(self, "dequantizer", None), VariationalDequantization):
            out["dequantizer"] = self.dequantizer
        return out

    def ema_modules(self) -> tuple[str, ...]:
        return tuple(self.modules())

    def optimizers(self) -> dict[str, tuple[str, ...]]:
        return {"model": tuple(self.modules())}

    def log_likelihood(self, modules: dict[str, nn.Module], x: Tensor, labels: Tensor | None,
                       generator: torch.Generator, draws: int = 1) -> Tensor:
        """log p(x | labels) [B] nats: the exact log-density of continuous x, or for discrete x the
        dequantization bound on log P(x) with ``draws`` draws of u from ``generator``."""
        net = modules["model"]
        flow: Flow = getattr(net, "module", net)  # the forward runs through a distributed wrapper, if any
        cond = labels if flow.num_classes is not None else None

        def log_prob(y: Tensor) -> Tensor:
            with probes_from(generator):  # a CNF's Hutchinson probes, if the chain has one
                z, logdet = net(y, cond)
            return flow.base_log_prob(z, cond) + logdet

        if self.dequantizer is None:
            return log_prob(x)
        dequantizer = modules.get("dequantizer", self.dequantizer)
        return dequantized_log_likelihood(log_prob, dequantizer, x, generator, draws)

    @torch.no_grad()
    def heldout_likelihood(self, modules: dict[str, nn.Module], x: Tensor, labels: Tensor | None,
                           generator: torch.Generator, batch_size: int = 1024) -> dict[str, float]:
        """Mean held-out -log p of x [N, ...] (labels [N] or None) in nats and bits/dim: for discrete data
        the bound on the discrete data's (``heldout_draws`` draws of u)."""
        device = module_device(modules["model"])
        chunks = x.split(batch_size)
        conds = [None] * len(chunks) if labels is None else [c.to(device) for c in labels.split(batch_size)]
        log_p = torch.cat([self.log_likelihood(modules, b.to(device), c, generator, self.heldout_draws).double().cpu()
                           for b, c in zip(chunks, conds)])
        return {"heldout_nll_nats": float(-log_p.mean()),
                "heldout_bits_per_dim": float(bits_per_dim(log_p, x[0].numel()).mean())}

    def sampling_steps(self) -> int | None:
        return None  # one pass of f^{-1}

    def sampling_method(self) -> str:
        return f"flow inverse (temperature {self.temperature:g})"

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> tuple[Tensor, dict[str, float]]:
        """Mean -log p(x | labels) over the batch (draws of u only with dequantization, and a CNF's Hutchinson probes): (loss,
        {nll_nats, bits_per_dim})."""
        x = batch["x"]
        log_p = self.log_likelihood(modules, x, batch.get("class_labels"), generator)
        nll = -log_p.mean()
        bpd = bits_per_dim(log_p, x[0].numel()).mean()
        return (bpd if self.units == "bits_per_dim" else nll), {"nll_nats": float(nll.detach()), "bits_per_dim": float(bpd.detach())}

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None) -> Tensor:
        """``n`` samples f^{-1}(z) [n, *shape], z from the base at ``temperature`` drawn with ``generator``;
        with dequantization, y's bin k = floor((y - lo) / w) is mapped back to the data's level k."""
        labels = None if cond is None else cond.get("class_labels")
        y = modules["model"].sample(n, labels, generator, self.temperature)
        if self.dequantizer is None:
            return y
        lo, hi = self.data_range
        k = ((y - lo) * (self.levels / (hi - lo))).floor().clamp(0, self.levels - 1)
        return lo + k * ((hi - lo) / (self.levels - 1))

