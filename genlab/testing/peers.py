"""Running diffusers' schedulers at float64 so that algorithms, not roundings, are compared.

diffusers builds its tables in float32, rounds sigmas to float32, and casts the sample to float32
inside ``step()``. These helpers keep the peer's own grid and algorithm but in float64. They
touch only attributes of the scheduler object passed in; diffusers itself is not imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class KeepFloat64(torch.Tensor):
    """A sample whose ``.to(torch.float32)`` is a no-op (``x.as_subclass(KeepFloat64)``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.Tensor.to and (torch.float32 in args[1:] or kwargs.get("dtype") is torch.float32):
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def set_timesteps_float64(scheduler: Any, steps: int) -> Any:
    """``scheduler.set_timesteps(steps)`` with float64 ``alphas_cumprod`` and sigmas on the same grid
    (Karras sigma = sqrt((1 - ab) / ab), linear in the step index, as diffusers interpolates)."""
    for name in ("alphas_cumprod", "final_alpha_cumprod"):
        if torch.is_tensor(getattr(scheduler, name, None)):
            setattr(scheduler, name, getattr(scheduler, name).double())
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas"):
        ab = scheduler.alphas_cumprod.double().numpy()
        inner = np.interp(scheduler.timesteps.double().numpy(), np.arange(len(ab)), np.sqrt((1 - ab) / ab))
        scheduler.sigmas = torch.from_numpy(np.append(inner, scheduler.sigmas[-1].item()))
    return scheduler
