"""Text conditioning in training configs (``text_encoder:``): a tiny random CLIP built locally, captioned digits,
caption dropout to exactly the empty prompt's context, each distinct caption encoded once, the empty prompt as
the unconditional branch of classifier-free guidance, prompts when sampling, a missing directory refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from genlab.core.config import ConfigDict, load_config  # noqa: E402
from genlab.core.errors import ConfigError  # noqa: E402
from genlab.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS, Digits  # noqa: E402
from genlab.testing.text import tiny_clip  # noqa: E402
from genlab.training import Experiment  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"), hidden=16, layers=1, heads=2)


def text_overrides(path) -> list[str]:
    return [f"text_encoder.path={path}", "data.captions=templates", "model.num_classes=null", "model.channels=8",
            "model.channel_mult=[1]", "model.attention_levels=[0]", "train.eval_samples=20", "train.steps=2",
            "train.checkpoint_every=2", "train.batch_size=8", "sampler.steps=3"]


def test_digits_captions_are_deterministic_and_name_the_digit():
    a, b = Digits(captions="templates"), Digits(captions="templates")
    assert a.captions == b.captions and len(a.captions) == len(a.labels)
    for caption, label in zip(a.captions[:50], a.labels[:50].tolist()):
        assert caption.split()[-1] in (DIGIT_WORDS[label], str(label))
    assert len(set(a.captions)) > 10  # several templates
    assert Digits(captions="templates", seed=1).captions != a.captions
    assert Digits(captions="templates", classes=[7]).captions == [c for c, y in zip(
        Digits(captions="templates").captions, Digits().labels.tolist()) if y == 7]  # an image keeps its caption
    assert a.prompt(7) == CAPTION_TEMPLATES[0].format(word="seven", digit=7) == "a handwritten digit seven"
    assert Digits().captions is None


def test_caption_dropout_is_exactly_the_null_context_and_each_caption_is_encoded_once(clip_dir):
    exp = Experiment.from_config(load_config(DIGITS, [*text_overrides(clip_dir), "text_encoder.caption_dropout=0.5"]))
    text = exp.text
    sizes = []
    text.encoder.model.register_forward_hook(lambda m, a, out: sizes.append(a[0].shape[0]))
    captions = exp.data.captions[:64]
    batch = {"x": exp.data.data[:64], "caption": captions}
    torch.manual_seed(0)
    out = text.condition(batch)
    assert set(out) == {"x", "context"} and out["context"].shape == (64, text.encoder.max_length, 16)
    separate = torch.stack([text.encoder.encode([c])[0] for c in captions])
    null = text.encoder.encode([""])[0]
    dropped = [bool(torch.equal(row, null)) for row in out["context"]]
    kept = [bool(torch.equal(row, ref)) for row, ref in zip(out["context"], separate)]
    assert all(d or k for d, k in zip(dropped, kept)) and 16 < sum(dropped) < 48
    encoded = sum(sizes[:2])  # the batch's distinct captions in one call, then the empty prompt
    assert sizes[:2] == [len(set(captions)), 1]
    sizes.clear()
    torch.manual_seed(1)
    text.condition({"x": exp.data.data[:64], "caption": list(reversed(captions))})
    assert sizes == [] and encoded == len(set(captions)) + 1  # all cached: nothing encoded again
    kept_all = text.condition(batch, training=False)["context"]
    assert all(torch.equal(row, ref) for row, ref in zip(kept_all, separate))


def test_guidance_uses_the_empty_prompt_and_the_model_takes_the_encoder_width(clip_dir):
    exp = Experiment.from_config(load_config(DIGITS, [*text_overrides(clip_dir), "guidance.scale=3"]))
    assert exp.model.cross_attention_dim == 16
    assert torch.equal(exp.guidance.uncond["context"], exp.text.encoder.encode([""]))
    assert exp.sampled_classes == 10 and exp.prompts[7] == "a handwritten digit seven" and exp.prompts_name_classes
    with pytest.raises(ConfigError, match="differs from the text encoder's width 16"):
        Experiment.from_config(load_config(DIGITS, [*text_overrides(clip_dir), "model.cross_attention_dim=8"]))
    with pytest.raises(ConfigError, match="gives no captions"):
        Experiment.from_config(load_config(DIGITS, [*text_overrides(clip_dir), "data.captions=null"]))


def test_a_missing_directory_is_one_line_naming_it(tmp_path, capsys):
    from genlab.cli import main

    missing = tmp_path / "no_clip_here"
    with pytest.raises(ConfigError, match=f"text_encoder.path: text encoder: {missing} is not a directory"):
        Experiment.from_config(ConfigDict(load_config(DIGITS, text_overrides(missing))))
    assert main(["train", str(DIGITS), *text_overrides(missing), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genlab: error: ") and str(missing) in err and len(err.strip().splitlines()) == 1


def test_a_text_conditioned_config_trains_and_samples_prompts(clip_dir, tmp_path, capsys):
    """Two steps of a text-conditioned UNet on captioned digits: the final evaluation samples each class's prompt
    and scores it; ``genlab sample RUN prompt=...`` samples a free prompt (unscored), with CFG on the empty
    prompt."""
    from genlab.cli import main

    run = tmp_path / "run"
    assert main(["train", str(DIGITS), *text_overrides(clip_dir), "--out", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "samples.json").read_text())
    assert "classifier_accuracy" in metrics
    capsys.readouterr()
    assert main(["sample", str(run), "prompt=the number 7", "guidance.scale=3", "--n", "4",
                 "--out", str(tmp_path / "s")]) == 0
    out = json.loads((tmp_path / "s" / "samples-ddpm-3steps-cfg3-the_number_7-seed1234.json").read_text())
    assert "classifier_accuracy" not in out and "frechet_distance" in out


def test_a_dit_takes_the_captions_as_its_context(clip_dir):
    """The same section conditions a DiT: its cross_attention_dim is the encoder's, a conditioned batch's loss
    has a gradient on the cross-attention."""
    config = load_config(DIGITS, text_overrides(clip_dir))
    config["model"] = {"type": "dit", "hidden": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "class_dropout": 0.0}
    exp = Experiment.from_config(ConfigDict(config))
    assert exp.model.cross_attention_dim == 16
    with torch.no_grad():  # the zero-initialised cross-attention output would hide the context's gradient
        exp.model.blocks[0].cross_attn.to_out.weight.normal_()
        exp.model.blocks[0].modulation[-1].weight.normal_(std=0.1)
        exp.model.proj_out.weight.normal_(std=0.1)
    batch = exp.text.condition({"x": exp.data.data[:8], "caption": exp.data.captions[:8]})
    exp.objective.loss(exp.objective.modules(), batch, torch.Generator().manual_seed(0)).backward()
    assert exp.model.blocks[0].cross_attn.to_q.weight.grad.abs().sum() > 0
