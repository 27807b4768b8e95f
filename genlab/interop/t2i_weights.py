"""Convert between genlab's ``T2IAdapter`` and diffusers' ``T2IAdapter`` (full, light and XL variants).

genlab's adapter has diffusers' layout and names without the wrapper: diffusers' ``adapter.{name}`` is
genlab's ``{name}``. diffusers is imported only inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from genlab.adapters.t2i_adapter import T2IAdapter

if TYPE_CHECKING:
    from diffusers import T2IAdapter as DiffusersT2IAdapter

_PREFIX = "adapter."


def t2i_adapter_from_diffusers(model: DiffusersT2IAdapter) -> T2IAdapter:
    """A genlab ``T2IAdapter`` whose ``features(cond)`` equal ``model(cond)`` (same dtype)."""
    c = model.config
    adapter = T2IAdapter(c["in_channels"], tuple(c["channels"]), c["num_res_blocks"], c["downscale_factor"],
                         c["adapter_type"])
    state = model.state_dict()
    if any(not k.startswith(_PREFIX) for k in state) or {k[len(_PREFIX):] for k in state} != set(adapter.state_dict()):
        raise ValueError(f"t2i_adapter_from_diffusers: diffusers' weights do not match genlab's layout for "
                         f"{dict(c)}: {sorted(set(state) ^ {_PREFIX + k for k in adapter.state_dict()})[:5]}")
    adapter.load_state_dict({k[len(_PREFIX):]: v for k, v in state.items()})
    return adapter.to(next(model.parameters()).dtype)


def t2i_adapter_to_diffusers(adapter: T2IAdapter) -> DiffusersT2IAdapter:
    """The diffusers ``T2IAdapter`` computing ``adapter.features`` (``save_pretrained`` it for diffusers)."""
    from diffusers import T2IAdapter as DiffusersT2IAdapter

    model = DiffusersT2IAdapter(in_channels=adapter.in_channels, channels=list(adapter.channels),
                                num_res_blocks=adapter.num_res_blocks, downscale_factor=adapter.downscale_factor,
                                adapter_type=adapter.adapter_type)
    model.load_state_dict({_PREFIX + k: v for k, v in adapter.state_dict().items()})
    dtype = next(adapter.parameters()).dtype
    return model if dtype == torch.float32 else model.to(dtype)
