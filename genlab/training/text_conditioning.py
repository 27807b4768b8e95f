"""Text conditioning in a training config: the ``text_encoder:`` section.

A frozen CLIP text encoder (:class:`~genlab.adapters.text_encoder.TextEncoder`, loaded from a local directory in
Hugging Face layout; nothing downloads) turns the data set's captions into the backbone's cross-attention context
(Rombach et al. 2022, Sec. 3.3)::

    text_encoder: {path: DIR, caption_dropout: 0.1}
    data: {type: digits, captions: templates}
    model: {type: unet, attention_levels: [1]}      # cross_attention_dim is the encoder's width

- training: each batch's captions (``batch["caption"]``, B strings) are encoded (each distinct caption once: the
  encoder's cache) into ``batch["context"]`` [B, L, D]; with probability ``caption_dropout`` a caption's context
  is the empty prompt's (the null condition of classifier-free guidance, Ho & Salimans 2022), drawn from the
  global generator as class dropout is (the Trainer seeds it per step);
- guidance: the unconditional branch of ``guidance: {scale: w}`` is the empty prompt's context;
- sampling: the evaluation asks for each class's prompt (the data set's ``prompt(k)``, "a handwritten digit
  seven") and scores the samples as class k, or for the ``prompts`` listed (``genlab sample RUN prompt="..."``),
  unscored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.bounds import NonNegativeInt, PositiveInt, UnitInterval, checked
from ..core.errors import ConfigError, GenlabError


@checked
@dataclass
class TextConfig:
    """The ``text_encoder:`` section."""

    path: str  # a local directory in Hugging Face layout (a CLIP text model + tokenizer, or a pipeline)
    caption_dropout: UnitInterval = 0.1  # the fraction of captions replaced by the empty prompt in training
    skip: NonNegativeInt = 0  # the hidden state this many layers before the last (clip_skip)
    max_length: PositiveInt | None = None  # the context length L (default: the tokenizer's)
    prompts: list[str] = field(default_factory=list)  # what the evaluation samples (empty: each class's prompt)


class TextConditioning:
    """The built ``text_encoder:`` section: the encoder, caption dropout and the evaluation's prompts."""

    def __init__(self, cfg: TextConfig, source: str = "config") -> None:
        from ..adapters.text_encoder import TextEncoder

        self.cfg = cfg
        try:
            self.encoder = TextEncoder.from_pretrained(cfg.path, skip=cfg.skip, max_length=cfg.max_length)
        except (GenlabError, ValueError, OSError) as e:
            raise ConfigError(f"{source}: text_encoder.path: {e}") from None

    @property
    def hidden_size(self) -> int:
        """D, the width of the context: the backbone's ``cross_attention_dim``."""
        return self.encoder.hidden_size

    def context(self, prompts: list[str], device: torch.device) -> Tensor:
        """The context [B, L, D] of ``prompts`` on ``device`` (the encoder moved there once)."""
        if next(self.encoder.parameters()).device != torch.device(device):
            self.encoder.to(device)
        with torch.no_grad():
            return self.encoder(prompts)

    def null(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """The empty prompt's context [batch, L, D]: the unconditional condition."""
        return self.context([""], torch.device(device)).expand(batch, -1, -1)

    def condition(self, batch: dict[str, Any], training: bool = True) -> dict[str, Any]:
        """``batch`` with its captions (``"caption"``, B strings) replaced by their context (``"context"`` [B, L, D]
        on the device of ``batch["x"]``), each the null context with probability ``caption_dropout`` in
        training (a draw from the global generator)."""
        captions = batch.get("caption")
        if captions is None:
            return batch
        x = batch["x"]
        context = self.context(list(captions), x.device)
        if training and self.cfg.caption_dropout > 0:
            drop = torch.rand(len(captions), device=x.device) < self.cfg.caption_dropout
            context = torch.where(drop[:, None, None], self.null(len(captions), x.device), context)
        return {**{k: v for k, v in batch.items() if k != "caption"}, "context": context}

    def requested(self, data: Any, classes: int | None) -> list[str]:
        """The prompts the evaluation samples, one per grid row: the config's ``prompts``, else each class's
        prompt (``data.prompt(k)``, k < ``classes``), else the empty prompt."""
        if self.cfg.prompts:
            return list(self.cfg.prompts)
        if classes and callable(getattr(data, "prompt", None)):
            return [data.prompt(k) for k in range(classes)]
        return [""]
