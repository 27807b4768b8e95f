"""Textual inversion (Gal et al. 2023, "An Image is Worth One Word", Eq. 2): new rows learnt in a frozen
embedding table, everything else frozen, v* = argmin_v E |eps - eps_theta(z_t, t, c(v))|^2.

The table is any ``nn.Embedding`` of a model: a text encoder's token embedding (a new word, with
the tokenizer taught the word: :meth:`~genlab.adapters.text_encoder.TextEncoder.add_tokens`) or a
label-conditioned backbone's class embedding (a new class: ``label_embed.embedding`` of genlab's
UNet and DiT). :class:`NewEmbeddings` takes the table's place in its parent module: ids below the
table's size read the frozen table, ids from ``first`` on read the new rows, the only parameters
that train. Files use diffusers' layout for learnt embeddings: ``{token: [D] or [k, D]}`` in a
safetensors file (``learned_embeds.safetensors``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.io import atomic_write


def _parent(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding ``path``'s last part, that part); KeyError naming the path otherwise."""
    *outer, leaf = path.split(".")
    parent = module
    for part in outer:
        if not hasattr(parent, part):
            raise KeyError(f"textual inversion: {type(module).__name__} has no module {path!r} ({part!r} missing)")
        parent = getattr(parent, part)
    return parent, leaf


class NewEmbeddings(nn.Module):
    """``count`` new rows after a frozen table: ``forward(ids [...]) -> [..., D]``.

    Args:
        table: the embedding being extended (kept as ``base``, its weight frozen).
        count: k >= 1 new rows, with ids ``first .. first + k - 1`` where ``first`` = the table's size.
        init: ids of existing rows to start from (one, or k; e.g. a related word or class), or None:
            the mean row of the table.
    """

    def __init__(self, table: nn.Embedding, count: int = 1, init: int | Sequence[int] | None = None) -> None:
        super().__init__()
        if not isinstance(table, nn.Embedding):
            raise TypeError(f"textual inversion extends an nn.Embedding, got {type(table).__name__}")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"textual inversion: count must be an int >= 1, got {count!r}")
        weight = table.weight.detach()
        if init is None:
            start = weight.mean(0, keepdim=True).expand(count, -1)
        else:
            ids = torch.as_tensor([init] if isinstance(init, int) else list(init), dtype=torch.long)
            if len(ids) not in (1, count) or not ((ids >= 0) & (ids < len(weight))).all():
                raise ValueError(f"textual inversion: init must be 1 or {count} ids in [0, {len(weight)}), got "
                                 f"{ids.tolist()}")
            start = weight[ids.to(weight.device)].expand(count, -1)
        self.base = table.requires_grad_(False)
        self.first = table.num_embeddings
        self.new = nn.Parameter(start.clone())

    @property
    def ids(self) -> list[int]:
        """The ids of the new rows."""
        return list(range(self.first, self.first + len(self.new)))

    @property
    def num_embeddings(self) -> int:
        return self.first + len(self.new)

    @property
    def weight(self) -> Tensor:
        """The whole table [first + k, D] (the base rows without gradient)."""
        return torch.cat([self.base.weight.detach(), self.new])

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.base.padding_idx)

    @classmethod
    def attach(cls, module: nn.Module, path: str, count: int = 1,
               init: int | Sequence[int] | None = None) -> NewEmbeddings:
        """Replace the embedding ``path`` of ``module`` (e.g. ``"label_embed.embedding"``) by new rows over it."""
        parent, leaf = _parent(module, path)
        table = getattr(parent, leaf, None)
        if isinstance(table, NewEmbeddings):
            raise ValueError(f"textual inversion: {path} already has new rows; detach them first")
        new = cls(table, count, init) if isinstance(table, nn.Embedding) else None
        if new is None:
            raise TypeError(f"textual inversion: {path} is {type(table).__name__}, not an nn.Embedding")
        setattr(parent, leaf, new)
        return new

    @staticmethod
    def detach(module: nn.Module, path: str) -> nn.Embedding:
        """Put the original table back at ``path``; returns it."""
        parent, leaf = _parent(module, path)
        new = getattr(parent, leaf)
        if not isinstance(new, NewEmbeddings):
            raise ValueError(f"textual inversion: {path} has no new rows")
        setattr(parent, leaf, new.base)
        return new.base

    def save(self, path: str | os.PathLike, token: str) -> None:
        """The new rows as ``{token: [k, D]}`` (``[D]`` for one row) in a safetensors file, written atomically."""
        from safetensors.torch import save

        rows = self.new.detach().cpu().contiguous()
        atomic_write(path, save({token: rows[0] if len(rows) == 1 else rows}))

    def load(self, path: str | os.PathLike, token: str | None = None) -> None:
        """Set the new rows from a file :meth:`save` (or diffusers' textual inversion) wrote; ``token``:
        which entry (default: the only one). ValueError naming the entries or shapes that do not fit."""
        from safetensors.torch import load_file

        entries = load_file(str(path))
        if token is None and len(entries) != 1:
            raise ValueError(f"textual inversion: {path} holds {sorted(entries)}; name the token to load")
        key = token if token is not None else next(iter(entries))
        if key not in entries:
            raise ValueError(f"textual inversion: {path} has no {key!r}; it holds {sorted(entries)}")
        rows = entries[key].reshape(-1, entries[key].shape[-1])
        if rows.shape != self.new.shape:
            raise ValueError(f"textual inversion: {path}[{key!r}] has shape {list(rows.shape)}, the new rows "
                             f"{list(self.new.shape)}")
        with torch.no_grad():
            self.new.copy_(rows)
