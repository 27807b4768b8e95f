"""Conditioning a transform through its conditioner network (conditional flows: Winkler et al. 2019,
"Learning Likelihoods with Conditional Normalizing Flows"; Papamakarios et al. 2017, Sec. 3.4 for MAF).

A conditional coupling computes its parameters from the kept part *and* a context c,
theta = NN([x_a, c]); the Jacobian stays triangular (c is not transformed), so log|det| is unchanged in
form and the transform is a bijection of x for every c. The context is either class labels, seen as
one-hot vectors (the conditioner's first layer is then a learned class embedding), or a given tensor:
a vector [B, F], or for images [B, F, H, W] (a vector is broadcast over the positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Context(nn.Module):
    """``forward(cond, like) -> ctx [B, features, ...like's positions] | None``.

    ``num_classes`` K: cond is class labels [B] (long, 0..K-1), ctx their one-hot codes (features = K);
    else ``features`` F > 0: cond is a float tensor [B, F] or, for image-shaped ``like``, [B, F, H, W];
    F = 0 and no classes: an unconditional transform (ctx None, cond ignored: a flow hands the same
    cond to every step)."""

    def __init__(self, features: int = 0, num_classes: int | None = None, who: str = "transform") -> None:
        super().__init__()
        if features < 0 or (num_classes is not None and num_classes < 1):
            raise ValueError(f"{who}: context must be >= 0 features and num_classes >= 1, got context={features}, "
                             f"num_classes={num_classes}")
        if num_classes is not None and features:
            raise ValueError(f"{who}: give either num_classes (class labels as the context) or context (the "
                             f"features of a context tensor), not both; got {num_classes} and {features}")
        self.num_classes, self.who = num_classes, who
        self.features = num_classes if num_classes is not None else features

    def forward(self, cond: Tensor | None, like: Tensor) -> Tensor | None:
        if not self.features:
            return None
        b, spatial = like.shape[0], tuple(like.shape[2:])
        if self.num_classes is not None:
            if cond is None or cond.shape != (b,) or cond.dtype != torch.long:
                got = None if cond is None else f"{cond.dtype} {list(cond.shape)}"
                raise ValueError(f"{self.who}: cond must be class labels, a long tensor [{b}] in "
                                 f"0..{self.num_classes - 1}, got {got}")
            ctx = F.one_hot(cond, self.num_classes).to(like.dtype)
        else:
            ok = (cond is not None and cond.is_floating_point() and cond.shape[:2] == (b, self.features)
                  and tuple(cond.shape[2:]) in ((), spatial))
            if not ok:
                got = None if cond is None else f"{cond.dtype} {list(cond.shape)}"
                raise ValueError(f"{self.who}: cond must be a context tensor [{b}, {self.features}]"
                                 f"{f' or [{b}, {self.features}, ' + ', '.join(map(str, spatial)) + ']' if spatial else ''}"
                                 f" of floats, got {got}")
            ctx = cond.to(like.dtype)
        if ctx.ndim == 2 and spatial:
            ctx = ctx.view(b, self.features, *[1] * len(spatial)).expand(b, self.features, *spatial)
        return ctx


def with_context(h: Tensor, ctx: Tensor | None) -> Tensor:
    """The conditioner's input: h [B, C, ...] and the context [B, F, ...] concatenated on dim 1 (h alone
    without a context)."""
    return h if ctx is None else torch.cat([h, ctx], 1)
