"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) on the ``nn.Linear`` / ``nn.Conv2d`` layers of any
model, chosen by name pattern, attached without forking the model's class.

LoRA (Hu et al. 2021, Eq. 3): a layer ``y = W x + b`` becomes ``y = (W + s B A) x + b`` with
``A: [r, in]`` and ``B: [out, r]`` (a conv: ``A: [r, in, kh, kw]``, a conv of the layer's kernel, stride,
padding and dilation, then ``B: [out, r, 1, 1]``), ``s = alpha / r`` (rsLoRA, Kalajdzievski 2023:
``alpha / sqrt(r)``). ``B`` starts at zero, so a fresh adapter leaves the model exactly unchanged; ``A``
is Kaiming-uniform (a = sqrt(5), as peft). Dropout acts on the adapter's input: ``s B A dropout(x)``.

DoRA (Liu et al. 2024, Eq. 5): ``W' = m (W + s B A) / ||W + s B A||_c`` with the norm per output unit
(a row of ``W: [out, in]``, all of ``[in, kh, kw]`` for a conv; peft's convention), ``m: [out]`` starting
at ``||W||_c``, and the norm detached from the graph (Sec. 4.3). Added to the layer's output it is
``(g - 1) W x' + g s B A x'`` with ``g = m / ||W + s B A||_c`` and ``x'`` the (dropped-out) input, as peft.

Attaching: each target layer keeps its class and parameters; its adapters live in a child ``lora`` (a
:class:`LoRALayers`, ``<layer>.lora.<adapter>.{A, B, m}``) and one forward hook adds the terms of the
active adapters. ``model.state_dict()`` therefore keeps every base key and value and gains the adapter
keys; ``model.parameters()`` includes the adapters (:func:`mark_only_adapters_trainable` freezes the rest).

Several adapters: each has a weight ``w`` (default 1) multiplying its ``s`` (diffusers' ``set_adapters``);
the active ones add up, ``y = W x + b + sum_i term_i(x)``, each term computed from the unmerged ``W``.
Merging writes ``W + sum_i Delta_i`` into the layer, ``Delta_i = s_i B_i A_i`` (LoRA) or
``(g_i - 1) W + g_i s_i B_i A_i`` (DoRA, ``g_i`` scaling rows), and keeps the unmerged ``W``, which
unmerging restores exactly.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import PositiveFloat, PositiveInt, checked
from genlab.core.errors import did_you_mean
from genlab.models.layers import Dropout

Layer = nn.Linear | nn.Conv2d


def _names(target: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(target, str):
        return (target,)
    if isinstance(target, Sequence) and target and all(isinstance(t, str) for t in target):
        return tuple(target)
    raise TypeError(f"LoRA target must be a name pattern or a non-empty list of them (e.g. '*attn*.to_q' or "
                    f"'re:.*to_[qkv]'), got {target!r}")


@checked
@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get an adapter and its shape. ``target``: glob patterns (``fnmatch``, e.g. ``"*attn*.to_q"``)
    or regular expressions prefixed ``"re:"`` (full match), over ``model.named_modules()`` names. ``rank`` r >= 1;
    ``alpha`` > 0 (default: r, so s = 1); ``dropout`` in [0, 1); ``rslora``: s = alpha / sqrt(r); ``dora``: DoRA."""

    target: str | tuple[str, ...]
    rank: PositiveInt = 4
    alpha: PositiveFloat | None = None
    dropout: Dropout = 0.0
    rslora: bool = False
    dora: bool = False
    patterns: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", _names(self.target))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"LoRAConfig: rank must be an integer, got {self.rank!r}")
        for p in self.patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"LoRAConfig: target {p!r} is not a valid regular expression ({e})") from None


def _apply(layer: Layer, x: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s operation with ``weight`` and no bias: a linear map, or a conv of its geometry."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight)


class LoRA(nn.Module):
    """One adapter on one layer: ``A: [r, in(, kh, kw)]``, ``B: [out, r(, 1, 1)]``, with DoRA ``m: [out]``.
    ``scale`` is s = alpha / r (or alpha / sqrt(r)); ``adapter_weight`` (set by :func:`set_adapters`) multiplies it."""

    def __init__(self, layer: Layer, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False) -> None:
        super().__init__()
        w = layer.weight
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise ValueError(f"LoRA: conv layers need groups=1 and padding_mode='zeros', got "
                                 f"groups={layer.groups}, padding_mode={layer.padding_mode!r}")
            a_shape, b_shape = (rank, *w.shape[1:]), (w.shape[0], rank, 1, 1)
        else:
            a_shape, b_shape = (rank, w.shape[1]), (w.shape[0], rank)
        self.A = nn.Parameter(torch.empty(a_shape, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.m = nn.Parameter(self.column_norm(w.detach()).clone()) if dora else None
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.adapter_weight, self.active, self.merged = 1.0, True, False

    @staticmethod
    def column_norm(weight: Tensor) -> Tensor:
        """``||W||_c``: the L2 norm of each output unit's weights, ``[out, ...] -> [out]``."""
        return torch.linalg.vector_norm(weight.flatten(1), dim=1)

    @property
    def s(self) -> float:
        """The effective scale ``w * s`` of the low-rank term."""
        return self.adapter_weight * self.scale

    def low_rank_weight(self) -> Tensor:
        """``s B A`` in the layer's weight shape, ``[out, in]`` or ``[out, in, kh, kw]``."""
        return self.s * (self.B.flatten(1) @ self.A.flatten(1)).view(self.B.shape[0], *self.A.shape[1:])

    def magnitude_scale(self, weight: Tensor) -> Tensor:
        """DoRA's ``g = m / ||W + s B A||_c`` ``[out]``, the norm detached (Liu et al. 2024, Sec. 4.3)."""
        with torch.no_grad():
            norm = self.column_norm(weight + self.low_rank_weight())
        return self.m / norm

    def delta_weight(self, weight: Tensor) -> Tensor:
        """What merging adds to the unmerged ``weight``: ``s B A``, or for DoRA ``(g - 1) W + g s B A``."""
        delta = self.low_rank_weight()
        if self.m is None:
            return delta
        g = self.magnitude_scale(weight).view(-1, *(1,) * (weight.ndim - 1))  # scales rows
        return (g - 1) * weight + g * delta

    def add_to(self, out: Tensor, layer: Layer, x: Tensor, base: Tensor | None, weight: Tensor) -> Tensor:
        """``out`` plus the adapter's term for ``layer``'s input ``x``: ``s B A x`` (LoRA), or
        ``(g - 1) W x + g s B A x`` (DoRA). ``base`` is ``W x`` without bias when ``weight`` is the layer's
        current weight (None: computed from ``weight``, the unmerged W)."""
        if self.dropout is not None and self.training:
            x, base = self.dropout(x), None
        h = _apply(layer, x, self.A)
        h = F.conv2d(h, self.B) if isinstance(layer, nn.Conv2d) else F.linear(h, self.B)
        if self.m is None:
            return out.add(h, alpha=self.s)
        g = self.magnitude_scale(weight)
        g = g.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else g
        base = _apply(layer, x, weight) if base is None else base
        g_1, g_s = (g - 1).to(out.dtype), (g * self.s).to(out.dtype)  # the output's dtype under autocast too
        return torch.addcmul(torch.addcmul(out, g_1, base), g_s, h)  # exactly out while g = 1, B = 0

    def extra_repr(self) -> str:
        kind = "DoRA" if self.m is not None else "LoRA"
        return (f"{kind}(rank={self.rank}, alpha={self.alpha:g}, rslora={self.rslora}, "
                f"adapter_weight={self.adapter_weight:g})")


class LoRALayers(nn.ModuleDict):
    """A layer's adapters by name. ``unmerged`` keeps the layer's own weight while adapters are merged."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unmerged", None, persistent=False)


def _forward_hook(layer: Layer, args: tuple, out: Tensor) -> Tensor | None:
    """Add the terms of the layer's active, unmerged adapters to its output."""
    pending = [a for a in layer.lora.values() if a.active and not a.merged]
    if not pending:
        return None
    x, unmerged = args[0], layer.lora.unmerged
    weight = layer.weight if unmerged is None else unmerged
    base = None
    if unmerged is None and any(a.m is not None for a in pending):
        bias = None if layer.bias is None else layer.bias.to(out.dtype)  # autocast: out may be bf16
        base = out if bias is None else out - (bias.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else bias)
    for a in pending:
        out = a.add_to(out, layer, x, base, weight)
    return out


def _match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def find_targets(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` matched by ``target`` (see
    :class:`LoRAConfig`). A pattern that matches none of them is a ValueError naming the closest name."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    found: list[str] = []
    for pattern in _names(target):
        hits = [n for n in layers if _match(n, pattern)]
        if not hits:
            raise ValueError(f"LoRA target {pattern!r} matches no nn.Linear or nn.Conv2d of {type(model).__name__}"
                             f"{did_you_mean(pattern.removeprefix('re:'), layers)} (patterns match whole names, "
                             f"e.g. '*.to_q' for every to_q; layers: {', '.join(layers[:3])}, ...)")
        found += [n for n in hits if n not in found]
    return found


def lora_layers(model: nn.Module) -> dict[str, Layer]:
    """The layers of ``model`` that carry adapters, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoRALayers)}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters attached to ``model``, in attaching order."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora))
    return list(names)


def _adapters(model: nn.Module, name: str) -> dict[str, LoRA]:
    found = {n: layer.lora[name] for n, layer in lora_layers(model).items() if name in layer.lora}
    if not found:
        names = adapter_names(model)
        raise KeyError(f"no adapter {name!r} on {type(model).__name__}{did_you_mean(name, names)} "
                       f"(attached: {', '.join(names) or 'none'})")
    return found


def _check_unmerged(model: nn.Module, what: str) -> None:
    merged = sorted({n for layer in lora_layers(model).values() for n, a in layer.lora.items() if a.merged})
    if merged:
        raise ValueError(f"{what} while adapters {merged} are merged; call unmerge_adapters(model) first")


def attach_layers(model: nn.Module, name: str, specs: dict[str, tuple[int, float]], dropout: float = 0.0,
                  rslora: bool = False, dora: bool = False) -> LoRAAdapter:
    """Attach adapter ``name`` to the layers ``specs`` names, each with its ``(rank, alpha)`` (as loaded
    from a file); see :func:`attach_lora`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"LoRA: adapter name must be an identifier (e.g. 'default', 'style'), got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"LoRA: {type(model).__name__} already has an adapter {name!r}; remove_adapter it first "
                         "or choose another name")
    _check_unmerged(model, "attaching an adapter")
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for module_name in specs:
        layer = modules.get(module_name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            what = "no module" if layer is None else f"a {type(layer).__name__}"
            raise ValueError(f"LoRA: {module_name!r} is {what}, not an nn.Linear or nn.Conv2d"
                             f"{did_you_mean(module_name, layers)}")
    for module_name, (rank, alpha) in specs.items():
        layer = modules[module_name]
        if not isinstance(getattr(layer, "lora", None), LoRALayers):
            layer.lora = LoRALayers()
            layer.register_forward_hook(_forward_hook)
        layer.lora[name] = LoRA(layer, rank, alpha, dropout, rslora, dora).train(layer.training)
    return LoRAAdapter(model, name)


def attach_lora(model: nn.Module, config: LoRAConfig, name: str = "default") -> LoRAAdapter:
    """Attach a LoRA (or DoRA) adapter ``name`` to the layers of ``model`` that ``config.target`` matches, in
    place: ``model`` keeps its class and base weights, and computes what it computed before (B = 0)."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"attach_lora: expected a LoRAConfig, got {type(config).__name__}")
    alpha = float(config.rank if config.alpha is None else config.alpha)
    specs = {n: (config.rank, alpha) for n in find_targets(model, config.patterns)}
    return attach_layers(model, name, specs, config.dropout, config.rslora, config.dora)


def set_adapters(model: nn.Module, names: str | Iterable[str], weights: float | Iterable[float] | None = None) -> None:
    """Make exactly ``names`` the active adapters of ``model``, with ``weights`` (one for all, or one each;
    default 1) multiplying their scales."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else weights
    weights = [float(weights)] * len(names) if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(names)} names but {len(weights)} weights; give one weight or one each")
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise KeyError(f"set_adapters: no adapter {n!r}{did_you_mean(n, known)} (attached: {', '.join(known)})")
    _check_unmerged(model, "changing the active adapters")
    chosen = dict(zip(names, weights))
    for layer in lora_layers(model).values():
        for n, a in layer.lora.items():
            a.active, a.adapter_weight = n in chosen, chosen.get(n, a.adapter_weight)


def _refresh(layer: Layer) -> None:
    """Write the unmerged weight plus the merged adapters' deltas into ``layer.weight``."""
    hub: LoRALayers = layer.lora
    merged = [a for a in hub.values() if a.merged]
    with torch.no_grad():
        if merged and hub.unmerged is None:
            hub.unmerged = layer.weight.detach().clone()
        if hub.unmerged is None:
            return
        w0 = hub.unmerged
        layer.weight.copy_(w0 + sum(a.delta_weight(w0) for a in merged) if merged else w0)
        if not merged:
            hub.unmerged = None


def merge_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Merge the adapters ``names`` (default: the active ones) into their layers' weights: the outputs stay
    the same, and the adapters cost nothing at inference. :func:`unmerge_adapters` undoes it exactly."""
    active = {n for layer in lora_layers(model).values() for n, a in layer.lora.items() if a.active}
    names = sorted(active) if names is None else list(names)
    for n in names:
        _adapters(model, n)  # a KeyError for unknown names
        if n not in active:
            raise ValueError(f"merge_adapters: adapter {n!r} is not active; set_adapters(model, [..., {n!r}]) first")
    for layer in lora_layers(model).values():
        if any(n in layer.lora and not layer.lora[n].merged for n in names):
            for n in names:
                if n in layer.lora:
                    layer.lora[n].merged = True
            _refresh(layer)


def unmerge_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Take the adapters ``names`` (default: all merged ones) out of the weights again."""
    names = None if names is None else set(names)
    for layer in lora_layers(model).values():
        hit = [a for n, a in layer.lora.items() if a.merged and (names is None or n in names)]
        for a in hit:
            a.merged = False
        if hit:
            _refresh(layer)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Detach adapter ``name`` (unmerging it first); a layer left without adapters loses its hook."""
    found = _adapters(model, name)
    unmerge_adapters(model, [name])
    modules = dict(model.named_modules())
    for module_name in found:
        layer = modules[module_name]
        del layer.lora[name]
        if not len(layer.lora):
            del layer.lora
            # the hook is found by its function, not by a stored handle (a deep copy would not carry one)
            for key in [k for k, hook in layer._forward_hooks.items() if hook is _forward_hook]:
                del layer._forward_hooks[key]


def adapter_parameters(model: nn.Module, names: Iterable[str] | None = None) -> list[nn.Parameter]:
    """The parameters (A, B and DoRA's m) of adapters ``names`` (default: all)."""
    names = adapter_names(model) if names is None else list(names)
    return [p for n in names for a in _adapters(model, n).values() for p in a.parameters()]


def mark_only_adapters_trainable(model: nn.Module, names: Iterable[str] | None = None) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except those of adapters ``names`` (default: all); returns those."""
    trainable = adapter_parameters(model, names)
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return trainable


class LoRAAdapter:
    """Handle to the adapter ``name`` on ``model`` (what :func:`attach_lora` returns): its layers, and
    ``merge()`` / ``unmerge()`` / ``remove()`` of it alone."""

    def __init__(self, model: nn.Module, name: str) -> None:
        _adapters(model, name)
        self.model, self.name = model, name

    @property
    def layers(self) -> dict[str, LoRA]:
        """Module name -> this adapter's :class:`LoRA` on that layer."""
        return _adapters(self.model, self.name)

    def parameters(self) -> list[nn.Parameter]:
        """This adapter's A, B (and m) on every layer: what an optimizer of it takes."""
        return adapter_parameters(self.model, [self.name])

    def merge(self) -> None:
        """Merge this adapter into its layers' weights (:func:`merge_adapters`)."""
        merge_adapters(self.model, [self.name])

    def unmerge(self) -> None:
        """Take this adapter out of the weights again (:func:`unmerge_adapters`)."""
        unmerge_adapters(self.model, [self.name])

    def remove(self) -> None:
        """Detach this adapter from the model (:func:`remove_adapter`)."""
        remove_adapter(self.model, self.name)

    def __repr__(self) -> str:
        return f"LoRAAdapter({self.name!r}, {len(self.layers)} layers of {type(self.model).__name__})"
