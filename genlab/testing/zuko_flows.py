"""genlab's spline flows carrying the weights of a zuko neural spline flow (``zuko.flows.NSF``), for oracle
tests and for benchmarks that start both libraries from the same weights.

zuko's ``NSF(features, bins=K, transforms=T, passes=P, hidden_features=(H, ..., H))`` is a masked
autoregressive flow: layer t computes the 3K - 1 spline parameters of every feature with a masked MLP
(ReLU) of the features earlier in its order (ascending for even t, descending for odd t; the mask keeps
its full weight matrices, so its parameter count includes masked-out weights) and splines every feature on
[-5, 5], with a N(0, I) base. With ``passes=2`` (D even) it is a coupling: the first half of the order is
kept and only passes through a spline whose parameters are the output layer's biases (an unconditional
spline), which is ``SplineCoupling(mask="channel", parity=t % 2, kept_spline=True)``; with ``passes=D``
(zuko's default) it is fully autoregressive, ``SplineAutoregressive(reverse=t % 2 == 1)`` (MADE's degrees
cycle over the hidden units in the order zuko's ``MaskedMLP`` gives them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genlab.models.flows import Flow, SplineAutoregressive, SplineCoupling


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _check(nsf: Any) -> tuple[int, int, int, int]:
    """(features D, bins K, hidden H, depth) of a zuko NSF genlab can carry; ValueError otherwise."""
    layers = list(nsf.transform.transforms)
    first = layers[0]
    features, bins = first.order.numel(), first.shapes[0][0]
    if first.hyper.in_features != features:
        raise ValueError(f"zuko NSF: a context ({first.hyper.in_features - features} features) is not carried over")
    hidden = [lin.out_features for lin in _linears(first.hyper)[:-1]]
    for t, layer in enumerate(layers):
        order = torch.arange(features) if t % 2 == 0 else torch.arange(features).flip(0)
        expected = torch.div(order, -(-features // layer.passes), rounding_mode="floor")
        if not torch.equal(layer.order.cpu(), expected):
            raise ValueError("zuko NSF: the orders must alternate ascending / descending (randperm=False)")
    slope = getattr(first.univariate, "keywords", {}).get("slope", 1e-3)
    relu = all(isinstance(m, nn.ReLU) for m in first.hyper if not isinstance(m, nn.Linear))
    if slope != 1e-3 or not relu or len(set(hidden)) != 1 or first.passes not in (2, features):
        raise ValueError(f"zuko NSF: need slope 1e-3, ReLU, equal hidden sizes and passes 2 or {features}; "
                         f"got slope {slope}, hidden {hidden}, passes {first.passes}")
    if first.passes == 2 and features % 2:
        raise ValueError(f"zuko NSF: a coupling (passes=2) needs an even number of features, got {features}")
    return features, bins, hidden[0], len(hidden)


def nsf_layers(features: int, bins: int, hidden: int, depth: int, transforms: int, coupling: bool
               ) -> list[SplineCoupling] | list[SplineAutoregressive]:
    """genlab's layers of zuko's ``NSF(features, bins, transforms, passes=2 if coupling else features,
    hidden_features=(hidden,) * depth)``, freshly initialised (genlab's own draw): channel-split couplings with
    a spline on the kept half and random last layers, or MADE spline layers, the order reversed every other
    layer."""
    if coupling:
        return [SplineCoupling(features, bins, 5.0, parity=t % 2, hidden=hidden, depth=depth, kept_spline=True,
                               zero_init=False, mask="channel") for t in range(transforms)]
    return [SplineAutoregressive(features, bins, 5.0, hidden=hidden, depth=depth, reverse=t % 2 == 1)
            for t in range(transforms)]


@torch.no_grad()
def flow_from_zuko_nsf(nsf: Any) -> Flow:
    """A genlab :class:`Flow` equal to the zuko ``NSF`` ``nsf`` as a function (same log-density, same
    inverse), its weights copied, on nsf's device and dtype: ``SplineCoupling`` layers for ``passes=2``,
    ``SplineAutoregressive`` layers for the fully autoregressive flow."""
    features, bins, hidden, depth = _check(nsf)
    layers = list(nsf.transform.transforms)
    coupling = layers[0].passes == 2  # with 2 features the autoregressive flow is this coupling too
    ours = nsf_layers(features, bins, hidden, depth, len(layers), coupling)
    like = _linears(layers[0].hyper)[0].weight
    flow = Flow([features], ours).to(device=like.device, dtype=like.dtype)
    for layer, mine in zip(layers, ours):
        theirs = _linears(layer.hyper)
        weights, biases = [lin.weight for lin in theirs], [lin.bias for lin in theirs]
        if coupling:  # the conditioner sees the kept half and outputs the changed half's parameters
            out_w, out_b = (v.unflatten(0, (features, -1)) for v in (weights[-1], biases[-1]))
            weights[0], weights[-1], biases[-1] = weights[0][:, mine.kept], out_w[mine.changed].flatten(0, 1), \
                out_b[mine.changed].flatten()
            mine.kept_params.copy_(out_b[mine.kept])
        for target, w, b in zip(_linears(mine.net if coupling else mine.made), weights, biases, strict=True):
            target.weight.copy_(w)
            target.bias.copy_(b)
    return flow
