"""MADE: a masked autoencoder whose output i depends only on inputs before i in an order
(Germain et al. 2015, Sec. 4): degrees m(d) = d (1..D) for the inputs, hidden degrees cycling over
1..D-1, masks M^l[k', k] = 1[m^l(k') >= m^{l-1}(k)] and for the output M^V[d, k] = 1[d > m^L(k)].
Output: ``params_per_value`` numbers per input value, ``[B, D, P]``, output (d, p) a function of
x_{<d} (in the order) only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask [out, in]`` (a buffer)."""

    def __init__(self, features_in: int, features_out: int, mask: Tensor) -> None:
        super().__init__(features_in, features_out)
        self.register_buffer("mask", mask.float())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


class MADE(nn.Module):
    """``x [B, D] -> [B, D, params_per_value]`` autoregressive in the order ``reverse`` (False: 1..D,
    True: D..1); ``depth`` hidden layers of ``hidden`` units (hidden >= D - 1 keeps every connection
    possible). The output layer starts at zero (the flow starts as the identity). ``context`` F extra
    inputs ``ctx [B, F]`` of degree 0 reach every hidden unit (a conditional MADE, Papamakarios et al. 2017,
    Sec. 3.4): output (d, p) is a function of x_{<d} and ctx."""

    def __init__(self, features: int, params_per_value: int, hidden: int, depth: int, reverse: bool = False,
                 context: int = 0) -> None:
        super().__init__()
        self.features, self.params_per_value = features, params_per_value
        degrees_in = torch.arange(1, features + 1)
        if reverse:
            degrees_in = degrees_in.flip(0)
        layers: list[nn.Module] = []
        prev = torch.cat([degrees_in, torch.zeros(context, dtype=torch.long)])
        for _ in range(depth):
            deg = torch.arange(hidden) % max(features - 1, 1) + 1
            layers += [MaskedLinear(len(prev), hidden, deg[:, None] >= prev[None, :]), nn.ReLU()]
            prev = deg
        out_deg = degrees_in.repeat_interleave(params_per_value)  # output (d, p) has input d's degree
        last = MaskedLinear(len(prev), features * params_per_value, out_deg[:, None] > prev[None, :])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.order: list[int] = degrees_in.argsort().tolist()  # positions in autoregressive order (host ints)

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        h = x if ctx is None else torch.cat([x, ctx], 1)
        return rearrange(self.net(h), "b (d p) -> b d p", p=self.params_per_value)
