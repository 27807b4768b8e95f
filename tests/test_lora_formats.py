"""LoRA files in the peft, diffusers and kohya layouts: read what peft writes, write what peft and diffusers
read, a round trip through every format, and bad files named precisely."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from genlab.adapters.lora import LoRAConfig, attach_lora, lora_layers
from genlab.interop.lora_formats import detect_format, load_lora, save_lora
from genlab.interop.unet_weights import unet_to_diffusers
from test_lora import _dit, _inputs, _randomise, _unet

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out", "ff.proj_in", "ff.proj_out", "conv_1", "conv_2", "proj_in", "emb_proj"]


def _peft_model(dora: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the base UNet, a peft model of a copy with random adapter weights; two ranks and alphas by pattern)."""
    base = _unet()
    config = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, use_dora=dora,
                             rank_pattern={"conv_1": 2}, alpha_pattern={"to_k": 3})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    _randomise(model)
    return base, model.eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_directories_both_ways(tmp_path, dora: bool) -> None:
    base, theirs = _peft_model(dora)
    x = _inputs(base)
    theirs.save_pretrained(tmp_path / "theirs")
    assert detect_format(tmp_path / "theirs") == "peft"
    ours = copy.deepcopy(base)
    adapter = load_lora(ours, tmp_path / "theirs")
    assert {a.rank for a in adapter.layers.values()} == {2, 4} and {a.alpha for a in adapter.layers.values()} == {3, 8}
    y = theirs(*x)
    torch.testing.assert_close(ours(*x), y, rtol=0, atol=1e-6)
    save_lora(ours, tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(*x), y, rtol=0, atol=1e-6)


def test_round_trip_through_every_format(tmp_path) -> None:
    """peft -> genlab -> diffusers -> kohya -> genlab keeps the outputs (rsLoRA too: kohya gets the plain alpha)."""
    base, theirs = _peft_model(dora=False)
    x = _inputs(base)
    theirs.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    load_lora(model, tmp_path / "peft")
    y = theirs(*x)
    for fmt, target in (("diffusers", tmp_path / "d"), ("kohya", tmp_path / "k.safetensors")):
        save_lora(model, target, format=fmt)
        assert detect_format(target) == fmt
        model = copy.deepcopy(base)
        load_lora(model, target)
        torch.testing.assert_close(model(*x), y, rtol=0, atol=1e-6)
    keys = load_file(tmp_path / "k.safetensors")
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_unet_up_blocks_0_resnets_1_time_emb_proj.alpha" in keys
    rs = copy.deepcopy(base)
    attach_lora(rs, LoRAConfig("*to_v", rank=4, alpha=2, rslora=True))
    _randomise(rs)
    save_lora(rs, tmp_path / "rs.safetensors", format="kohya")
    plain = copy.deepcopy(base)
    load_lora(plain, tmp_path / "rs.safetensors")
    torch.testing.assert_close(plain(*x), rs(*x), rtol=0, atol=1e-6)


def _sd_pair() -> tuple[torch.nn.Module, torch.nn.Module, tuple]:
    genlab = _unet().float()
    peer = unet_to_diffusers(genlab).eval()
    x, t, _, c = _inputs(genlab)
    return genlab, peer, (x.float(), t, None, c.float())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_diffusers_loads_our_diffusers_file(tmp_path, dora: bool) -> None:
    genlab, peer, (x, t, _, c) = _sd_pair()
    attach_lora(genlab, LoRAConfig([f"*{n}" for n in TARGETS], rank=4, alpha=6, dora=dora))
    _randomise(genlab)
    y = genlab(x, t, context=c)
    with torch.no_grad():
        assert (y - peer(x, t, encoder_hidden_states=c).sample).abs().max() > 1e-2
    file = save_lora(genlab, tmp_path, format="diffusers")
    peer.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="unet")  # alphas from the metadata
    with torch.no_grad():
        torch.testing.assert_close(peer(x, t, encoder_hidden_states=c).sample, y, rtol=0, atol=1e-5)


def test_diffusers_reads_our_kohya_file(tmp_path) -> None:
    genlab, peer, (x, t, _, c) = _sd_pair()
    attach_lora(genlab, LoRAConfig([f"*{n}" for n in TARGETS], rank=4, alpha=6))
    _randomise(genlab)
    file = save_lora(genlab, tmp_path / "kohya.safetensors", format="kohya")
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(file))
    peer.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    with torch.no_grad():
        torch.testing.assert_close(peer(x, t, encoder_hidden_states=c).sample, genlab(x, t, context=c), rtol=0,
                                   atol=1e-5)


def test_older_diffusers_layout_with_alphas(tmp_path) -> None:
    """``.lora.down`` / ``.lora.up`` keys with ``.alpha`` (diffusers' older layout) read as the new one."""
    model = _unet()
    attach_lora(model, LoRAConfig("*attn_1.to_[qk]", rank=2, alpha=5))
    _randomise(model)
    x = _inputs(model)
    new = load_file(save_lora(model, tmp_path, format="diffusers"))
    old = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in new.items()}
    old |= {k.split(".lora_A.")[0] + ".alpha": torch.tensor(5.0) for k in new if ".lora_A." in k}
    save_file(old, tmp_path / "old.safetensors")
    twin = _unet()
    load_lora(twin, tmp_path / "old.safetensors", format="diffusers")
    torch.testing.assert_close(twin(*x), model(*x), rtol=0, atol=1e-12)


def test_bad_files_name_the_key(tmp_path) -> None:
    model = _unet()
    attach_lora(model, LoRAConfig("*attn_1.to_q", rank=2))
    file = save_lora(model, tmp_path / "k.safetensors", format="kohya")
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith(".lora_down.weight"))
    typo = {k.replace("attn1_to_q", "attn1_to_qq"): v for k, v in tensors.items()}
    save_file(typo, tmp_path / "typo.safetensors")
    with pytest.raises(ValueError, match="to_qq'.*did you mean '.*attn1_to_q'"):
        load_lora(_unet(), tmp_path / "typo.safetensors")
    wrong = dict(tensors) | {key: torch.zeros(2, 5)}
    save_file(wrong, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"needs A \[2, 32\]"):
        load_lora(_unet(), tmp_path / "shape.safetensors")
    save_file(dict(tensors) | {"lora_unet_conv_in.hada_w1_a": torch.zeros(1)}, tmp_path / "kind.safetensors")
    with pytest.raises(ValueError, match="hada_w1_a' .* is no LoRA weight"):
        load_lora(_unet(), tmp_path / "kind.safetensors")
    save_file({key: tensors[key]}, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="needs both A"):
        load_lora(_unet(), tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="needs a genlab UNet"):
        dit = _dit()
        attach_lora(dit, LoRAConfig("*to_q"))
        save_lora(dit, tmp_path / "dit", format="diffusers")
    with pytest.raises(ValueError, match="did you mean 'peft'"):
        save_lora(model, tmp_path / "x", format="pefт")
    assert len(lora_layers(_unet())) == 0
