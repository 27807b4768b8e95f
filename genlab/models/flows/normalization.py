"""Normalisation layers that are flow steps: Glow's actnorm (Kingma and Dhariwal 2018, Sec. 3.1) and
RealNVP's batch normalisation (Dinh et al. 2017, Sec. 3.7).

Both act per feature (vectors [B, D]) or per channel (images [B, C, H, W]); an image's log-determinant
is the per-channel sum times H W (Glow Table 1).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.distributed as dist
from torch import Tensor, nn

from genlab.core.bounds import PositiveFloat, PositiveInt, Range
from genlab.core.registry import register
from genlab.models.flows.base import FlowTransform, batch_logdet, check_channels


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector [C] shaped to broadcast against x [B, C, ...]."""
    return v.to(x.dtype).view(-1, *[1] * (x.ndim - 2))


def _spatial(x: Tensor) -> int:
    return x[0, 0].numel()  # H W for images, 1 for vectors


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.ndim)]  # reduce over the batch and the spatial positions


@register("flow_transform", "actnorm")
class ActNorm(FlowTransform):
    """``y = exp(log_scale) * x + bias`` per channel (Glow Table 1: y = s x + b, log|det| = H W sum log|s|).

    Data-dependent initialisation (Glow Sec. 3.1): the first forward call in training mode sets
    log_scale = -log(std + eps) and bias = -mean exp(log_scale) from that batch, so that it leaves with
    zero mean and unit variance per channel (under torch.distributed, with the mean and std averaged over
    the processes, so that they start alike). A channel whose batch gives no spread (a batch of one
    vector, or a constant channel) keeps log_scale 0 and is only centred: -log(eps) would blow it up by
    1 / eps. ``features``: D or C. Range: features >= 1, eps > 0.
    """

    def __init__(self, features: PositiveInt, eps: PositiveFloat = 1e-6) -> None:
        super().__init__()
        self.features, self.eps = features, eps
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        mean, std = x.mean(_dims(x)), x.std(_dims(x), unbiased=False)
        if dist.is_available() and dist.is_initialized():  # every process starts from the same values
            stats = torch.stack([mean, std]) / dist.get_world_size()
            dist.all_reduce(stats)
            mean, std = stats[0], stats[1]
        spread = (x[:, 0].numel() > 1) & (std > self.eps)
        log_scale = torch.where(spread, -torch.log(std + self.eps), torch.zeros_like(std))
        self.log_scale.copy_(log_scale)
        self.bias.copy_(-mean * log_scale.exp())
        self.initialized.fill_(True)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.features, "ActNorm")
        if self.training and not bool(self.initialized):
            self._initialize(x)
        s = self.log_scale
        y = x * _per_channel(s, x).exp() + _per_channel(self.bias, x)
        return y, batch_logdet(s.sum() * _spatial(x), x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.features, "ActNorm")
        s = self.log_scale
        x = (z - _per_channel(self.bias, z)) * _per_channel(-s, z).exp()
        return x, batch_logdet(-s.sum() * _spatial(z), z)


Momentum = Annotated[float, Range(gt=0, le=1)]


@register("flow_transform", "batch_norm")
class BatchNormFlow(FlowTransform):
    """Batch normalisation as a flow step (RealNVP Sec. 3.7, with a learned scale and shift):

        y = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta,   log|det| = H W sum (log_gamma - log(var + eps) / 2)

    In training mode mu and var are the batch's statistics (the log-determinant treats them as
    constants, as RealNVP does) and the running averages move by ``momentum``; in eval mode the running
    averages are used, and the layer is an exact bijection of each sample. Range: features >= 1,
    eps > 0, momentum in (0, 1].
    """

    def __init__(self, features: PositiveInt, eps: PositiveFloat = 1e-5, momentum: Momentum = 0.1) -> None:
        super().__init__()
        self.features, self.eps, self.momentum = features, eps, momentum
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        mean, var = x.mean(_dims(x)), x.var(_dims(x), unbiased=False)
        with torch.no_grad():  # the running variance is the unbiased estimate, as in torch.nn.BatchNorm
            n = x.numel() // self.features
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), self.momentum)
        return mean, var

    def _log_scale(self, var: Tensor, x: Tensor) -> Tensor:
        return self.log_gamma.to(x.dtype) - 0.5 * torch.log(var + self.eps)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.features, "BatchNormFlow")
        mean, var = self._stats(x)
        s = self._log_scale(var, x)
        y = (x - _per_channel(mean, x)) * _per_channel(s, x).exp() + _per_channel(self.beta, x)
        return y, batch_logdet(s.sum() * _spatial(x), x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.features, "BatchNormFlow")
        s = self._log_scale(self.running_var.to(z.dtype), z)  # sampling uses the running statistics
        x = (z - _per_channel(self.beta, z)) * _per_channel(-s, z).exp() + _per_channel(self.running_mean, z)
        return x, batch_logdet(-s.sum() * _spatial(z), z)
