"""LoRA / DoRA adapters: identity at initialisation, peft as the oracle (outputs and gradients), several
adapters with weights, merge / unmerge, removal, trainable parameters, and bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from genlab.adapters.lora import (LoRAConfig, adapter_names, attach_lora, lora_layers, mark_only_adapters_trainable,
                                  merge_adapters, remove_adapter, set_adapters, unmerge_adapters)
from genlab.models.dit import DiT
from genlab.models.unet import UNet

peft = pytest.importorskip("peft")

# every kind of layer a LoRA goes on: attention projections, feed-forward, 3x3 / 1x1 convs, the time MLP
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out", "ff.proj_in", "conv_1", "skip", "proj_in", "emb_proj"]
DIT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "mlp.0", "mlp.2", "modulation.1", "patch_embed"]


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=4, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                norm_groups=8, cross_attention_dim=8, num_heads=2, zero_init=False).double().eval()


def _dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero layers start at zero: make every layer matter
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def _inputs(model: nn.Module) -> tuple:
    g = torch.Generator().manual_seed(1)
    if isinstance(model, UNet):
        return (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3.0, 500.0]), None,
                torch.randn(2, 5, 8, generator=g, dtype=torch.float64))
    return torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3.0, 500.0]), torch.tensor([1, 4])


def _randomise(model: nn.Module, seed: int = 2) -> None:
    """Non-zero adapter weights (and DoRA magnitudes away from ||W||), drawn in module order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name or (".lora." in name and name.endswith(".m")):
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif "lora" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _peft_twin(model: nn.Module, targets: list[str], dora: bool, rank: int = 4, alpha: float = 8.0,
               rslora: bool = False) -> tuple[nn.Module, nn.Module]:
    """(genlab copy, peft copy) of ``model`` with the same random adapter on the same layers."""
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=targets, r=rank, lora_alpha=alpha, use_dora=dora,
                                                 use_rslora=rslora), theirs)
    pattern = "re:(.*\\.)?(" + "|".join(map(re.escape, targets)) + ")"  # peft's rule: the name or a dotted suffix
    adapter = attach_lora(ours, LoRAConfig(pattern, rank, alpha, rslora=rslora, dora=dora))
    _randomise(theirs)
    modules = dict(theirs.named_modules())
    assert set(adapter.layers) == {n for n, m in modules.items() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, lora in adapter.layers.items():
            layer = modules[name]
            lora.A.copy_(layer.lora_A["default"].weight.view_as(lora.A))
            lora.B.copy_(layer.lora_B["default"].weight.view_as(lora.B))
            if dora:
                lora.m.copy_(layer.lora_magnitude_vector["default"].weight.flatten())
    return ours, theirs


@pytest.mark.parametrize("make", [_unet, _dit], ids=["unet", "dit"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_is_the_identity_and_keeps_the_model(make, dora: bool) -> None:
    model = make()
    x = _inputs(model)
    before, state = model(*x), {k: v.clone() for k, v in model.state_dict().items()}
    kind = type(model)
    attach_lora(model, LoRAConfig("*to_[qkv]", rank=3, dora=dora))
    assert type(model) is kind
    assert torch.equal(model(*x), before)  # B = 0: exactly unchanged
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(".lora.default." in k for k in set(after) - set(state))


@pytest.mark.parametrize("make,targets", [(_unet, UNET_TARGETS), (_dit, DIT_TARGETS)], ids=["unet", "dit"])
@pytest.mark.parametrize("dora,rslora", [(False, False), (True, False), (False, True)], ids=["lora", "dora", "rslora"])
def test_outputs_and_gradients_equal_peft(make, targets: list[str], dora: bool, rslora: bool) -> None:
    model = make()
    ours, theirs = _peft_twin(model, targets, dora, rslora=rslora)
    x = _inputs(model)
    y_ours, y_theirs = ours(*x), theirs(*x)
    assert (y_theirs - model(*x)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-6)
    # gradients of A, B and m: peft's norm and detaching conventions
    (y_ours.square().mean()).backward()
    (y_theirs.square().mean()).backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if "lora_" in n}
    for name, lora in lora_layers(ours).items():
        a = lora.lora["default"]
        torch.testing.assert_close(a.A.grad, grads[f"{name}.lora_A.default.weight"].view_as(a.A), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(a.B.grad, grads[f"{name}.lora_B.default.weight"].view_as(a.B), rtol=1e-6, atol=1e-9)
        if dora:
            torch.testing.assert_close(a.m.grad, grads[f"{name}.lora_magnitude_vector.default.weight"].flatten(),
                                       rtol=1e-6, atol=1e-9)


def test_dora_with_dropout_in_training_equals_peft() -> None:
    ours, theirs = _peft_twin(_unet(), ["to_q", "conv_1"], dora=True)
    for model in (ours, theirs):
        for m in model.modules():
            if hasattr(m, "lora_dropout"):
                m.lora_dropout["default"] = nn.Dropout(0.3)
        model.train()
    for lora in lora_layers(ours).values():
        lora.lora["default"].dropout = nn.Dropout(0.3)
    x = _inputs(ours)
    torch.manual_seed(5)
    y_ours = ours(*x)
    torch.manual_seed(5)
    torch.testing.assert_close(y_ours, theirs(*x), rtol=0, atol=1e-6)


def _two_adapters(model: nn.Module) -> nn.Module:
    attach_lora(model, LoRAConfig("*attn_[12].to_[qv]", rank=2, alpha=4), name="a")
    attach_lora(model, LoRAConfig(["*to_q", "re:.*blocks\\.0\\.conv_1"], rank=3, dora=True), name="b")
    _randomise(model)
    return model


def test_merge_equals_unmerged_and_unmerge_restores_the_weights() -> None:
    model = _unet()
    x = _inputs(model)
    base, state = model(*x), {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    _two_adapters(model)
    set_adapters(model, ["a", "b"], [0.7, 1.3])
    y = model(*x)
    assert (y - base).abs().max() > 1e-2
    for first in ("a", "b"):  # one merged, the other still in the hook (DoRA's norm from the unmerged W)
        merge_adapters(model, [first])
        torch.testing.assert_close(model(*x), y, rtol=0, atol=1e-6)
        unmerge_adapters(model)
    merge_adapters(model)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(model(*x), y, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="merged"):
        set_adapters(model, "a")
    unmerge_adapters(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(layer.lora.unmerged is None for layer in lora_layers(model).values())  # the copy is freed
    torch.testing.assert_close(model(*x), y, rtol=0, atol=0)


def test_adapter_weights_scale_the_update() -> None:
    """A weight w multiplies s: weight 0.5 on alpha 4 equals weight 1 on alpha 2; inactive adapters add nothing."""
    model = _unet()
    x = _inputs(model)
    base = model(*x)
    attach_lora(model, LoRAConfig("*to_v", rank=2, alpha=4), name="a")
    _randomise(model)
    twin = copy.deepcopy(model)
    for layer in lora_layers(twin).values():
        layer.lora["a"].scale = 1.0  # alpha 2 / rank 2
    set_adapters(model, "a", 0.5)
    torch.testing.assert_close(model(*x), twin(*x), rtol=0, atol=1e-12)
    set_adapters(model, [])
    assert torch.equal(model(*x), base)


def test_two_adapters_add_up() -> None:
    model = _unet()
    x = _inputs(model)
    base = model(*x)
    _two_adapters(model)
    set_adapters(model, "a")
    only_a = model(*x)
    set_adapters(model, ["a", "b"])
    both = model(*x)
    set_adapters(model, "b")
    only_b = model(*x)
    set_adapters(model, [])
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    assert not torch.allclose(only_a, base) and not torch.allclose(only_b, base)
    assert torch.equal(model(*x), base)


def test_remove_adapter_restores_the_model() -> None:
    model = _unet()
    x = _inputs(model)
    base, keys = model(*x), set(model.state_dict())
    _two_adapters(model)
    merge_adapters(model, ["a"])
    remove_adapter(model, "a")
    assert adapter_names(model) == ["b"]
    remove_adapter(model, "b")
    assert adapter_names(model) == [] and set(model.state_dict()) == keys and not lora_layers(model)
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(*x), base, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = _unet().train()
    attach_lora(model, LoRAConfig(["*to_q", "*conv_1"], rank=2, dora=True))
    _randomise(model)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(*_inputs(model)).square().mean().backward()
        grads.append([p.grad.clone() for p in mark_only_adapters_trainable(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_only_adapter_parameters_train() -> None:
    model = _unet().train()
    attach_lora(model, LoRAConfig(["*to_q", "*conv_1"], rank=2, dora=True))
    _randomise(model)
    trainable = mark_only_adapters_trainable(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(trainable, lr=0.1)
    model(*_inputs(model)).square().mean().backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora." in k for k in changed)
    assert {k.rsplit(".", 1)[1] for k in changed} == {"A", "B", "m"}


def test_copies_and_modes_follow_the_model() -> None:
    """A deep copy carries its own adapters; an adapter attached to a model in eval mode drops nothing."""
    model = _unet()
    x = _inputs(model)
    attach_lora(model, LoRAConfig("*to_q", rank=2, dropout=0.5))
    _randomise(model)
    y = model(*x)
    torch.testing.assert_close(model(*x), y, rtol=0, atol=0)
    twin = copy.deepcopy(model)
    remove_adapter(twin, "default")
    assert adapter_names(model) == ["default"] and not twin(*x).equal(y)
    torch.testing.assert_close(model(*x), y, rtol=0, atol=0)
    model.train()
    assert not model(*x).equal(y)


def test_device_and_dtype_follow_the_layer() -> None:
    layer = nn.Conv2d(3, 5, 3, padding=1).to(torch.float16)
    attach_lora(layer, LoRAConfig("re:", rank=2))
    lora = layer.lora["default"]
    assert lora.A.dtype == lora.B.dtype == torch.float16
    assert lora.A.shape == (2, 3, 3, 3) and lora.B.shape == (5, 2, 1, 1)
    for make in (lambda: nn.Linear(8, 4), lambda: nn.Conv2d(3, 4, 3)):  # autocast: the base output's dtype
        layer = make()
        x = torch.randn(2, 8) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 6, 6)
        attach_lora(layer, LoRAConfig("re:", rank=2, dora=True))
        nn.init.normal_(layer.lora["default"].B)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16


def test_bad_input_names_what_is_wrong() -> None:
    model = _unet()
    with pytest.raises(ValueError, match="'to_q' matches no .*patterns match whole names, e.g. '\\*.to_q'"):
        attach_lora(model, LoRAConfig("to_q"))
    with pytest.raises(ValueError, match="to_qq.*did you mean"):
        attach_lora(model, LoRAConfig("down.1.attns.0.blocks.0.attn_1.to_qq"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig("*to_q", rank=0)
    with pytest.raises(TypeError, match="rank must be an integer"):
        LoRAConfig("*to_q", rank=2.5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRAConfig("*to_q", alpha=0.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig("*to_q", dropout=1.0)
    with pytest.raises(ValueError, match="regular expression"):
        LoRAConfig("re:to_q(")
    with pytest.raises(TypeError, match="name pattern"):
        LoRAConfig(["*to_q", 3])
    with pytest.raises(ValueError, match="groups=1"):
        attach_lora(nn.Conv2d(4, 4, 3, groups=2), LoRAConfig("re:"))
    attach_lora(model, LoRAConfig("*to_q"))
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        attach_lora(model, LoRAConfig("*to_k"))
    with pytest.raises(KeyError, match="did you mean 'default'"):
        set_adapters(model, "defualt")
    with pytest.raises(ValueError, match="2 names but 3 weights"):
        set_adapters(model, ["default", "default"], [1.0, 2.0, 3.0])
