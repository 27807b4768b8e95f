"""The ``adapters:`` section of a training config: fine-tune the model through a LoRA / DoRA adapter.

```yaml
adapters:
  base: runs/digits            # optional: start from this run's (or checkpoint's) EMA weights
  lora: {target: "*to_[qkv]", rank: 8, alpha: 8, dropout: 0.0, rslora: false, dora: false}
```

The ``model:`` section builds the model; it takes the base weights (the run's config must build the same
architecture), the adapter ``default`` is attached (:func:`genlab.adapters.lora.attach_lora`) and every
other parameter frozen. The trainer's optimizer then updates the adapter alone (frozen parameters get no
gradient, which AdamW skips), and checkpoints hold the base weights and the adapter together, so a run
loads back as it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters.lora import LoRAConfig, attach_lora, mark_only_adapters_trainable
from ..core.checkpoint import load_run_weights
from ..core.errors import ConfigError, GenlabError
from ..core.registry import construct


@dataclass
class AdaptersConfig:
    """The ``adapters:`` section: ``lora`` (a :class:`LoRAConfig`), ``base`` (a run or checkpoint directory)."""

    lora: LoRAConfig | None = None
    base: str | None = None


def attach_adapters(model: nn.Module, section: Mapping[str, Any], source: str,
                    resolve: Callable[[str], Path] | None = None) -> nn.Module:
    """Apply the ``adapters:`` ``section`` to ``model`` in place (see the module docstring) and return it.
    ``resolve``: the checkpoint a ``base`` run names (an Experiment's pinned one; default its newest)."""
    cfg = construct(AdaptersConfig, section, path="adapters", source=source)
    if cfg.base is not None:
        try:
            load_run_weights(model, cfg.base if resolve is None else resolve(cfg.base))
        except GenlabError as e:
            raise ConfigError(f"{source}: adapters.base: {e}") from None
    if cfg.lora is not None:
        try:
            attach_lora(model, cfg.lora)
        except ValueError as e:
            raise ConfigError(f"{source}: adapters.lora: {e}") from None
        mark_only_adapters_trainable(model)
    return model
