"""A tiny CLIP text encoder with random weights, built locally (nothing downloads), for tests and examples.

The tokenizer's vocabulary is single characters (each also as a word end, ``c</w>``) and no BPE merges, so any
lower-case text of letters, digits and a few signs tokenizes exactly, one token per character: distinct prompts
give distinct token sequences, and a frozen random encoder gives them distinct contexts. Point a config at a
real CLIP directory (a Stable Diffusion pipeline's, say) instead for meaningful text features.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

CHARACTERS = string.ascii_lowercase + string.digits + ".,'-!?"
SPECIAL = ("<unk>", "<|startoftext|>", "<|endoftext|>")


def tiny_clip(path: str | os.PathLike, hidden: int = 32, layers: int = 2, heads: int = 4, max_length: int = 32,
              seed: int = 0) -> Path:
    """Write a random ``CLIPTextModel`` (``hidden`` wide, ``layers`` deep, ``max_length`` positions, weights from
    ``seed``) and its character-level ``CLIPTokenizer`` to ``path`` in pipeline layout (``text_encoder/``,
    ``tokenizer/``); returns ``path``. Needs the transformers package."""
    import transformers

    root = Path(path)
    raw = root / "vocab"
    raw.mkdir(parents=True, exist_ok=True)
    tokens = [*CHARACTERS, *(c + "</w>" for c in CHARACTERS), *SPECIAL]
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"))
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(root / "tokenizer")
    ids = {t: i for i, t in enumerate(tokens)}
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         max_position_embeddings=max_length, bos_token_id=ids["<|startoftext|>"],
                                         eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root
