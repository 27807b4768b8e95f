"""Checking device-generic code on a machine without an accelerator.

Tensors on PyTorch's ``meta`` device have shapes and dtypes but no data. Running code on them finds
what would break on a GPU: an operation that mixes a CPU tensor (other than a 0-dim one) with a
device tensor fails, and so does reading a device value on the host (``bool(t)``, ``t.item()``,
``t.tolist()``). What meta tensors do not find is a random draw on one device with a generator on
another, which CUDA refuses: :class:`DeviceAudit` checks that, with generators from
:func:`generator_on` that say they live on the meta device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

class _TaggedGenerator(torch.Generator):
    """A CPU generator that reports another device (drawing on meta with a CPU generator is allowed)."""

    tagged_device: torch.device

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.tagged_device


def generator_on(device: str | torch.device = "meta", seed: int = 0) -> torch.Generator:
    """A seeded generator whose ``.device`` is ``device`` (for meta-device runs of code that takes its
    draw device from the generator)."""
    g = _TaggedGenerator()
    g.tagged_device = torch.device(device)
    g.manual_seed(seed)
    return g


class DeviceAudit(TorchFunctionMode):
    """While active, raise AssertionError for a random draw whose result is not on its generator's
    device (``generator.device``), as CUDA would; ``draws`` counts the draws seen."""

    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None:  # only random draws take a generator
            self.draws += 1
            result = out if torch.is_tensor(out) else args[0]
            if result.device.type != generator.device.type:
                raise AssertionError(f"{getattr(func, '__name__', func)}: a draw on {result.device} with a generator "
                                     f"on {generator.device} (CUDA refuses this); draw on the generator's device")
        return out
