"""Text conditioning: a frozen CLIP text encoder (transformers' ``CLIPTextModel`` with its tokenizer)
whose token embeddings are a UNet's or DiT's cross-attention context.

As Stable Diffusion does (Rombach et al. 2022, Sec. 3.3): a prompt is tokenized to the encoder's
context length (padded with the end token), encoded, and the last hidden state [L, D] is the
context; ``skip`` = k takes the hidden state k layers before the last, through the final layer norm
(diffusers' ``clip_skip``). The empty prompt's embedding is the null condition of classifier-free
guidance (:meth:`TextEncoder.null`). Embeddings are cached per prompt (a frozen encoder gives a
prompt one embedding), so a training loop over a fixed set of captions encodes each once.

Weights come from a local directory in Hugging Face layout, nothing downloads: a directory holding
the model's ``config.json`` + weights and the tokenizer's files, or a pipeline directory with
``text_encoder/`` and ``tokenizer/``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import GenlabError
from .textual_inversion import NewEmbeddings

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise GenlabError("text encoders need the transformers package: pip install 'genlab[interop]'") from e
    return transformers


def _model_dir(root: Path, subfolder: str | None, who: str, files: Sequence[str]) -> Path:
    """``root/subfolder`` (default: ``root``, or ``root/<who>`` for a pipeline directory), checked to
    hold one of ``files``; GenlabError naming the path and what was expected otherwise."""
    if not root.is_dir():
        raise GenlabError(f"text encoder: {root} is not a directory; pass a local directory in Hugging Face layout "
                          "(config.json and tokenizer files, or a pipeline with text_encoder/ and tokenizer/)")
    candidates = [root / subfolder] if subfolder is not None else [root, root / who]
    for path in candidates:
        if any((path / f).is_file() for f in files):
            return path
    raise GenlabError(f"text encoder: no {who} in {' or '.join(str(p) for p in candidates)} (expected one of "
                      f"{', '.join(files)})")


class TextEncoder(nn.Module):
    """A frozen CLIP text encoder: ``forward(prompts) -> context [B, L, D]``.

    Args:
        model: a transformers ``CLIPTextModel`` (or any model with its call signature and outputs).
        tokenizer: its tokenizer.
        max_length: the context length L (default: the tokenizer's ``model_max_length``, at most the
            model's ``max_position_embeddings``; 77 for Stable Diffusion's).
        skip: k >= 0: the hidden state k layers before the last, through the final layer norm.
        cache_size: prompts whose embeddings are kept (least recently used dropped; 0: no cache).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int | None = None, skip: int = 0,
                 cache_size: int = 4096) -> None:
        super().__init__()
        positions = getattr(model.config, "max_position_embeddings", None)
        length = max_length or min(getattr(tokenizer, "model_max_length", positions) or positions, positions or 10**9)
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"TextEncoder: max_length must be an int >= 1, got {length!r}")
        if positions is not None and length > positions:
            raise ValueError(f"TextEncoder: max_length {length} exceeds the model's {positions} positions")
        layers = getattr(model.config, "num_hidden_layers", None)
        if not isinstance(skip, int) or skip < 0 or (layers is not None and skip >= layers):
            raise ValueError(f"TextEncoder: skip must be an int in [0, {layers}), got {skip!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"TextEncoder: cache_size must be an int >= 0, got {cache_size!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.max_length, self.skip, self.cache_size = tokenizer, length, skip, cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, subfolder: str | None = None,
                        tokenizer_subfolder: str | None = None, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> TextEncoder:
        """Load ``CLIPTextModel`` and ``CLIPTokenizer`` from the local directory ``path`` (see the module
        docstring; ``subfolder`` / ``tokenizer_subfolder`` name them explicitly), never downloading.
        ``kwargs`` go to the constructor."""
        tf, root = _transformers(), Path(path)
        model_dir = _model_dir(root, subfolder, "text_encoder", ("config.json",))
        tokenizer_dir = _model_dir(root, tokenizer_subfolder, "tokenizer", TOKENIZER_FILES)
        model = tf.CLIPTextModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        tokenizer = tf.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, **kwargs)

    @property
    def hidden_size(self) -> int:
        """D, the width of the context (a backbone's ``cross_attention_dim``)."""
        return int(self.model.config.hidden_size)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, L] (int64, the model's device): padded to L with the tokenizer's pad token,
        truncated beyond it (the end token kept last, as CLIP's tokenizer does)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"TextEncoder: prompts must be a sequence of strings, got {type(prompts).__name__}")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        return ids.to(next(self.model.parameters()).device)

    @property
    def trainable(self) -> bool:
        """Whether some weight trains (new tokens being learnt): then nothing is cached and gradients flow."""
        return any(p.requires_grad for p in self.parameters())

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """The context [B, L, D] of ``prompts``, computed now (no cache; with autograd only while
        :attr:`trainable`)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            out = self.model(self.tokenize(prompts), output_hidden_states=self.skip > 0)
            if self.skip == 0:
                return out.last_hidden_state
            return self._text_model.final_layer_norm(out.hidden_states[-(self.skip + 1)])

    @property
    def _text_model(self) -> nn.Module:
        return getattr(self.model, "text_model", self.model)  # transformers < 5 nests it

    def add_tokens(self, tokens: Sequence[str], init: str | None = None) -> NewEmbeddings:
        """Teach the tokenizer the new words ``tokens`` and give each a trainable row after the token
        embedding (textual inversion, Gal et al. 2023), started from the first token of ``init`` (a
        related word) or the mean embedding; returns the rows (:class:`NewEmbeddings`). ValueError if a
        word is known already or does not tokenize to one new id."""
        tokens = list(tokens)
        vocab = self.tokenizer.get_vocab()
        known = [t for t in tokens if t in vocab]
        if known or not tokens:
            raise ValueError(f"TextEncoder.add_tokens: {known or 'no tokens'}: give new words not in the vocabulary")
        first = len(self.tokenizer)
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(first, first + len(tokens))):
            raise ValueError(f"TextEncoder.add_tokens: {tokens} got ids {ids}, expected {first}..")
        start = None if init is None else self.tokenizer(init, add_special_tokens=False).input_ids[:1] or None
        rows = NewEmbeddings.attach(self._text_model, "embeddings.token_embedding", len(tokens), start)
        if rows.first != first:
            raise ValueError(f"TextEncoder.add_tokens: the tokenizer has {first} tokens, the embedding {rows.first}")
        self.clear_cache()
        return rows

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """The context [B, L, D] of ``prompts`` (the model's device and dtype); prompts met before come
        from the cache, the others are encoded in one call."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"TextEncoder: prompts must be a sequence of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if self.trainable:
            return self.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(missing, self.encode(missing))) if missing else {}
        if self.cache_size:
            for p in prompts:
                if p in self._cache:
                    self._cache.move_to_end(p)
            self._cache.update(fresh)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if not prompts:
            weight = next(self.model.parameters())
            return weight.new_empty(0, self.max_length, self.hidden_size)
        return torch.stack([fresh[p] if p in fresh else self._cache[p] for p in prompts])

    def null(self, batch: int) -> Tensor:
        """The empty prompt's context repeated [batch, L, D]: the unconditional branch of
        classifier-free guidance."""
        return self([""]).expand(batch, -1, -1)

    def clear_cache(self) -> None:
        """Forget the cached embeddings (after the encoder's weights changed, e.g. a new token learnt)."""
        self._cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> TextEncoder:
        """``.to()`` / ``.half()`` ...: the cache is dropped with the old device or dtype."""
        self._cache.clear()
        return super()._apply(fn, recurse)
