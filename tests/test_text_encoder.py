"""The CLIP text encoder as a conditioning module: loaded from a local directory in Hugging Face
layout (built here with random weights and a small tokenizer), equal to transformers' own model,
cached per prompt, the empty prompt as the null condition, clear errors for missing files."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from genlab.adapters.text_encoder import TextEncoder  # noqa: E402
from genlab.core.errors import GenlabError  # noqa: E402

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>",
         "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pipeline-layout directory: text_encoder/ (random CLIPTextModel) and tokenizer/."""
    root = tmp_path_factory.mktemp("clip")
    (root / "raw").mkdir()
    (root / "raw" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (root / "raw" / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "raw" / "vocab.json"), str(root / "raw" / "merges.txt"))
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=12,
                                         bos_token_id=21, eos_token_id=22, pad_token_id=22)
    transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


def reference(root, prompts, layer=-1):
    model = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    ids = tok(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.last_hidden_state if layer == -1 else getattr(model, "text_model", model).final_layer_norm(out.hidden_states[layer])


def test_equals_transformers_and_caches(pipeline_dir):
    enc = TextEncoder.from_pretrained(pipeline_dir)
    assert enc.max_length == 12 and enc.hidden_size == 32
    prompts = ["lower newer", "wider", "lowest lowest lowest lowest lowest lowest lowest lowest lowest lowest"]
    ref = reference(pipeline_dir, prompts)
    torch.testing.assert_close(enc(prompts), ref, rtol=0, atol=0)
    calls = []
    enc.model.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    again = enc(["wider", "low", "lower newer", "low"])  # two cached, one new prompt (twice)
    assert calls == [1]  # only "low" was encoded, once
    torch.testing.assert_close(again[[0, 2]], ref[[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(again[1], again[3], rtol=0, atol=0)
    torch.testing.assert_close(again[1:2], reference(pipeline_dir, ["low"]), rtol=0, atol=0)
    assert enc([]).shape == (0, 12, 32)


def test_null_condition_and_skip(pipeline_dir):
    enc = TextEncoder.from_pretrained(pipeline_dir, skip=1)
    torch.testing.assert_close(enc(["lower"]), reference(pipeline_dir, ["lower"], layer=-2), rtol=0, atol=0)
    null = enc.null(3)
    assert null.shape == (3, 12, 32)
    torch.testing.assert_close(null, reference(pipeline_dir, [""] * 3, layer=-2), rtol=0, atol=0)


def test_single_directory_layout_and_cache_limit(pipeline_dir, tmp_path):
    import shutil

    for sub in ("text_encoder", "tokenizer"):
        for f in (pipeline_dir / sub).iterdir():
            shutil.copy(f, tmp_path / f.name)
    enc = TextEncoder.from_pretrained(tmp_path, cache_size=2)
    enc(["l", "o", "w"])
    assert list(enc._cache) == ["o", "w"]
    enc.to(torch.float64)
    assert not enc._cache and enc(["l"]).dtype == torch.float64


def test_missing_files_are_named(pipeline_dir, tmp_path):
    with pytest.raises(GenlabError, match="is not a directory"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(GenlabError, match="no text_encoder in"):
        TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(GenlabError, match="no tokenizer in"):
        TextEncoder.from_pretrained(pipeline_dir, tokenizer_subfolder="text_encoder")
    enc = TextEncoder.from_pretrained(pipeline_dir)
    with pytest.raises(TypeError, match="sequence of strings"):
        enc("lower")
    with pytest.raises(ValueError, match="skip"):
        TextEncoder(enc.model, enc.tokenizer, skip=3)
    with pytest.raises(ValueError, match="exceeds"):
        TextEncoder(enc.model, enc.tokenizer, max_length=13)


def test_new_token_equals_a_resized_transformers_model(pipeline_dir):
    """Textual inversion's new word: the tokenizer knows it, its row trains alone, and the encoder's
    output equals transformers' model with the embedding resized and that row set."""
    enc = TextEncoder.from_pretrained(pipeline_dir)
    rows = enc.add_tokens(["<d7>"], init="lower")
    assert enc.trainable and rows.ids == [len(VOCAB)]
    with torch.no_grad():
        rows.new.normal_()
    out = enc(["lower <d7> newer"])
    out.sum().backward()
    assert rows.new.grad is not None and rows.new.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in enc.named_parameters() if not n.endswith(".new"))
    ref = transformers.CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", local_files_only=True)
    ref.resize_token_embeddings(len(VOCAB) + 1)
    with torch.no_grad():
        ref.get_input_embeddings().weight[-1] = rows.new[0]
        ids = enc.tokenize(["lower <d7> newer"])
        assert ids[0].tolist().count(len(VOCAB)) == 1  # one id for the new word
        torch.testing.assert_close(out.detach(), ref(ids).last_hidden_state, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        enc.add_tokens(["lo"])
