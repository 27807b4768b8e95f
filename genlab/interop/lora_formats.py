"""LoRA / DoRA adapter files in the three layouts users have, read and written through safetensors only.

- ``"peft"``: a directory with ``adapter_model.safetensors`` and ``adapter_config.json``, as peft's
  ``save_pretrained`` writes them: keys ``base_model.model.<name>.lora_A.weight`` ``[r, in(, kh, kw)]``,
  ``.lora_B.weight`` ``[out, r(, 1, 1)]``, DoRA's ``.lora_magnitude_vector`` (``[out]``, a conv
  ``[1, out, 1, 1]``); ``r`` / ``lora_alpha`` with per-module ``rank_pattern`` / ``alpha_pattern``.
  ``<name>`` is the genlab module name; any model.
- ``"diffusers"``: ``pytorch_lora_weights.safetensors`` (or any ``.safetensors`` file) with keys
  ``unet.<diffusers name>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_magnitude_vector``) and the
  adapter's peft config, prefixed ``unet.``, in the metadata entry ``lora_adapter_metadata``, as
  ``StableDiffusionPipeline.save_lora_weights`` writes it and ``load_lora_weights`` /
  ``UNet2DConditionModel.load_lora_adapter`` read it. Reading also takes the older layouts diffusers reads
  (``.lora.down.weight`` / ``.lora.up.weight``, ``.processor.to_q_lora.down.weight``, ``.alpha`` keys).
- ``"kohya"``: one ``.safetensors`` file with ``lora_unet_<diffusers name, dots as _>.lora_down.weight``
  (A), ``.lora_up.weight`` (B) and ``.alpha`` (sd-scripts; rsLoRA is written as the plain alpha
  ``alpha * sqrt(r)`` giving the same scale), and for DoRA ``.dora_scale``: LyCORIS's magnitude with
  ``wd_on_out`` (``[out, 1]``, a conv ``[out, 1, 1, 1]``), the merged weight being
  ``dora_scale * W' / ||W'||`` with ``W' = W + (alpha / r) up @ down`` and the norm over all but the output
  axis, which is peft's DoRA (the magnitude genlab keeps). LyCORIS's other layout (``wd_on_out: false``,
  ``[1, in, ...]``: norms per input column) is refused with its shape named.

The diffusers and kohya names are those of the UNet ``genlab.interop.to_diffusers`` makes
(``UNet2DModel`` / ``UNet2DConditionModel``), from the weight-name map of ``unet_weights``; they need a
genlab ``UNet``. Loading checks every key: one that names no ``nn.Linear`` / ``nn.Conv2d`` of the model,
or an unknown kind of key, is a ValueError naming it and the closest valid name; shapes must fit the
layer. Per-adapter weights (:func:`genlab.adapters.lora.set_adapters`) are not saved.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from genlab.adapters.lora import LoRA, LoRAAdapter, _adapters, attach_layers
from genlab.core.errors import did_you_mean
from genlab.core.io import atomic_write, write_json_atomic
from genlab.models.unet import UNet

Format = Literal["peft", "diffusers", "kohya"]
FORMATS: tuple[str, ...] = ("peft", "diffusers", "kohya")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_PEFT_PREFIX, _UNET_PREFIX, _KOHYA_PREFIX = "base_model.model.", "unet.", "lora_unet_"
# the older diffusers layouts, rewritten as diffusers' own loader does (its UNET_TO_DIFFUSERS table)
_OLD_DIFFUSERS = [(".processor.", "."), *((f".to_{p}_lora.{d}", f".to_{p}.lora_{x}") for p in "qkv"
                                          for d, x in (("down", "A"), ("up", "B"))),
                  (".to_out_lora.down", ".to_out.0.lora_A"), (".to_out_lora.up", ".to_out.0.lora_B"),
                  (".lora.down", ".lora_A"), (".lora.up", ".lora_B")]


def _module_names(model: nn.Module, fmt: str) -> dict[str, str]:
    """genlab module name -> its name in ``fmt`` for every ``nn.Linear`` / ``nn.Conv2d`` of ``model``."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if fmt == "peft":
        return {n: n for n in layers}
    if not isinstance(model, UNet):
        raise ValueError(f"the {fmt} LoRA format names layers as diffusers' UNet does and needs a genlab UNet, got "
                         f"{type(model).__name__}; use format='peft'")
    from genlab.interop.unet_weights import diffusers_key_map

    weights = diffusers_key_map(model)
    names = {n: weights[f"{n}.weight"].removesuffix(".weight") for n in layers}
    return names if fmt == "diffusers" else {n: _KOHYA_PREFIX + d.replace(".", "_") for n, d in names.items()}


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` rule: the first key k with ``(.*\\.)?(k)$`` matching ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_config(entries: dict[str, dict[str, Any]], dora: bool, rslora: bool, dropout: float) -> dict[str, Any]:
    """peft ``LoraConfig`` fields for ``entries`` (name -> rank, alpha): the most common rank and alpha, and
    patterns (exact names, ``^``-anchored) for the layers that differ."""
    ranks = Counter(e["rank"] for e in entries.values())
    r = ranks.most_common(1)[0][0]
    alpha = Counter(e["alpha"] for e in entries.values() if e["rank"] == r).most_common(1)[0][0]
    exact = {n: "^" + re.escape(n) for n in entries}
    return dict(peft_type="LORA", task_type=None, base_model_name_or_path=None, inference_mode=True, r=r,
                lora_alpha=alpha, target_modules=sorted(entries), lora_dropout=dropout, use_dora=dora,
                use_rslora=rslora, bias="none", fan_in_fan_out=False, init_lora_weights=True, modules_to_save=None,
                rank_pattern={exact[n]: e["rank"] for n, e in entries.items() if e["rank"] != r},
                alpha_pattern={exact[n]: e["alpha"] for n, e in entries.items() if e["alpha"] != alpha})


def _entries(model: nn.Module, name: str) -> tuple[dict[str, dict[str, Any]], LoRA]:
    """Module name -> {A, B, m, rank, alpha} of adapter ``name`` (and one of its layers, for the options)."""
    layers = _adapters(model, name)
    entries = {n: dict(A=a.A.detach(), B=a.B.detach(), m=None if a.m is None else a.m.detach(), rank=a.rank,
                       alpha=a.alpha) for n, a in layers.items()}
    return entries, next(iter(layers.values()))


def save_lora(model: nn.Module, path: str | os.PathLike, name: str = "default", format: Format = "peft") -> Path:
    """Write adapter ``name`` of ``model`` to ``path`` in ``format`` (see the module docstring): a directory
    for "peft", a directory or ``.safetensors`` file for "diffusers", a ``.safetensors`` file for "kohya".
    Returns the weights file written. Files are written atomically."""
    if format not in FORMATS:
        raise ValueError(f"save_lora: unknown format {format!r}{did_you_mean(str(format), FORMATS)}; "
                         f"expected one of {', '.join(FORMATS)}")
    entries, first = _entries(model, name)
    names = _module_names(model, format)
    dora, rslora = first.m is not None, first.rslora
    dropout = first.dropout.p if first.dropout is not None else 0.0
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    if format == "kohya":
        if path.suffix != ".safetensors":
            raise ValueError(f"save_lora: the kohya format is one .safetensors file, got {path}")
        for n, e in entries.items():
            k = names[n]
            alpha = e["alpha"] * math.sqrt(e["rank"]) if rslora else e["alpha"]  # the same scale as alpha / r
            tensors |= {f"{k}.lora_down.weight": e["A"], f"{k}.lora_up.weight": e["B"],
                        f"{k}.alpha": torch.tensor(alpha, dtype=e["A"].dtype)}
            if e["m"] is not None:  # LyCORIS's dora_scale on the output axis: [out, 1(, 1, 1)]
                tensors[f"{k}.dora_scale"] = e["m"].view(-1, *[1] * (e["A"].ndim - 1))
        file, metadata = path, None
    else:
        prefix = _PEFT_PREFIX if format == "peft" else _UNET_PREFIX
        for n, e in entries.items():
            k = prefix + names[n]
            tensors |= {f"{k}.lora_A.weight": e["A"], f"{k}.lora_B.weight": e["B"]}
            if e["m"] is not None:
                m = e["m"].view(1, -1, 1, 1) if e["A"].ndim == 4 else e["m"]
                tensors[f"{k}.lora_magnitude_vector"] = m
        config = _peft_config({names[n]: e for n, e in entries.items()}, dora, rslora, dropout)
        if format == "peft":
            path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path / PEFT_CONFIG, config)
            file, metadata = path / PEFT_WEIGHTS, None
        else:
            if path.suffix != ".safetensors":
                path.mkdir(parents=True, exist_ok=True)
                path = path / DIFFUSERS_WEIGHTS
            packed = {_UNET_PREFIX + k: v for k, v in config.items() if k not in ("peft_type", "task_type")}
            file, metadata = path, {METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write(file, save(tensors, metadata={"format": "pt", **(metadata or {})}))
    return file


def _read(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not file.is_file():
        raise FileNotFoundError(f"load_lora: no file {file}")
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def detect_format(path: str | os.PathLike) -> str:
    """"peft" for a directory with ``adapter_config.json``, "kohya" for a file of ``lora_unet_`` keys, else
    "diffusers"."""
    path = Path(path)
    if path.is_dir():
        return "peft" if (path / PEFT_CONFIG).is_file() else "diffusers"
    tensors, _ = _read(path)
    return "kohya" if any(k.startswith(_KOHYA_PREFIX) for k in tensors) else "diffusers"


def _split(key: str, kinds: dict[str, str], source: str) -> tuple[str, str]:
    """``(module name, kind)`` of a key ending in one of ``kinds`` (suffix -> kind)."""
    for suffix, kind in kinds.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    raise ValueError(f"load_lora: key {key!r} of {source} is no LoRA weight (expected names ending in "
                     f"{', '.join(kinds)})")


def _parse(path: Path, fmt: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any], str]:
    """Foreign module name -> {A, B, m, alpha} tensors, the peft config fields found, and the file read."""
    if fmt == "peft":
        file = path / PEFT_WEIGHTS
        if not (path / PEFT_CONFIG).is_file():
            raise FileNotFoundError(f"load_lora: {path} has no {PEFT_CONFIG} (a peft adapter directory has one)")
        config = json.loads((path / PEFT_CONFIG).read_text())
        tensors, _ = _read(file)
        prefix, kinds = _PEFT_PREFIX, {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
    elif fmt == "diffusers":
        file = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
        tensors, metadata = _read(file)
        # a pipeline's file prefixes keys "unet." (and its config's fields), a model's save_lora_adapter does not
        prefix = _UNET_PREFIX if any(k.startswith(_UNET_PREFIX) for k in tensors) else ""
        packed = json.loads(metadata.get(METADATA_KEY, "{}"))
        config = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
        kinds = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m", ".alpha": "alpha"}
        for old, new in _OLD_DIFFUSERS:
            tensors = {k.replace(old, new): v for k, v in tensors.items()}
    else:
        file = path
        tensors, _ = _read(file)
        config, prefix = {}, ""
        kinds = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha", ".dora_scale": "m"}
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            raise ValueError(f"load_lora: key {key!r} of {file} does not start with {prefix!r} (the {fmt} layout; "
                             "a LoRA of another model part, e.g. a text encoder, cannot load into this model)")
        module, kind = _split(key[len(prefix):], kinds, str(file))
        found.setdefault(module, {})[kind] = value
    return found, config, str(file)


def load_lora(model: nn.Module, path: str | os.PathLike, name: str = "default", format: Format | None = None
              ) -> LoRAAdapter:
    """Attach adapter ``name`` to ``model`` with the weights in ``path`` (``format`` detected when None, see
    :func:`detect_format`). Every key must name an ``nn.Linear`` / ``nn.Conv2d`` of ``model`` whose shapes
    fit; alpha comes from the file (``.alpha`` keys, else the config's ``lora_alpha`` / ``alpha_pattern``,
    else the rank)."""
    path = Path(path)
    fmt = detect_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"load_lora: unknown format {fmt!r}{did_you_mean(str(fmt), FORMATS)}; "
                         f"expected one of {', '.join(FORMATS)}")
    found, config, source = _parse(path, fmt)
    if not found:
        raise ValueError(f"load_lora: {source} holds no LoRA weights")
    genlab_name = {v: k for k, v in _module_names(model, fmt).items()}
    modules = dict(model.named_modules())
    specs, weights = {}, {}
    dora = {"m" in e for e in found.values()}
    if len(dora) > 1:
        raise ValueError(f"load_lora: {source} has DoRA magnitudes for some layers only; genlab needs all or none")
    for foreign, e in found.items():
        if foreign not in genlab_name:
            raise ValueError(f"load_lora: {source}: {foreign!r} names no nn.Linear or nn.Conv2d of "
                             f"{type(model).__name__}{did_you_mean(foreign, genlab_name)}")
        if "A" not in e or "B" not in e:
            raise ValueError(f"load_lora: {source}: {foreign!r} needs both A (down) and B (up) weights, got "
                             f"{sorted(e)}")
        n = genlab_name[foreign]
        layer, A, B = modules[n], e["A"], e["B"]
        rank, out = A.shape[0], layer.weight.shape[0]
        a_shape = (rank, *layer.weight.shape[1:]) if isinstance(layer, nn.Conv2d) else (rank, layer.weight.shape[1])
        b_shape = (out, rank, 1, 1) if isinstance(layer, nn.Conv2d) else (out, rank)
        if fmt == "kohya" and "m" in e and (e["m"].shape[0] != out or e["m"].numel() != out):
            raise ValueError(f"load_lora: {source}: {foreign!r} has dora_scale {list(e['m'].shape)}, LyCORIS's "
                             f"magnitudes per input column (wd_on_out: false); genlab's DoRA (peft's) keeps one per "
                             f"output, dora_scale [{out}, 1{', 1, 1' if A.ndim == 4 else ''}]: train it with wd_on_out")
        if tuple(A.shape) != a_shape or tuple(B.shape) != b_shape or ("m" in e and e["m"].numel() != out):
            got = {k: list(v.shape) for k, v in e.items() if k != "alpha"}
            raise ValueError(f"load_lora: {source}: {foreign!r} has shapes {got}; the layer {n!r} "
                             f"({type(layer).__name__} {list(layer.weight.shape)}) needs A {list(a_shape)}, "
                             f"B {list(b_shape)}" + (f", m [{out}]" if "m" in e else ""))
        alpha = e.get("alpha", _pattern_value(config.get("alpha_pattern") or {}, foreign,
                                              config.get("lora_alpha", rank)))
        specs[n], weights[n] = (rank, float(alpha)), e
    adapter = attach_layers(model, name, specs, float(config.get("lora_dropout", 0.0)),
                            bool(config.get("use_rslora", False)), dora.pop())
    with torch.no_grad():
        for n, lora in adapter.layers.items():
            lora.A.copy_(weights[n]["A"])
            lora.B.copy_(weights[n]["B"])
            if lora.m is not None:
                lora.m.copy_(weights[n]["m"].flatten())
    return adapter
