"""The Trainer's optimizer step: genlab's direct call of torch's fused AdamW kernel equals ``opt.step()``
bit for bit, and every case it does not cover goes through ``opt.step()``."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from genlab.training.steps import _plain_fused_adamw, adamw, optimizer_step


def twins(**kwargs: object) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], torch.optim.AdamW,
                                     torch.optim.AdamW]:
    """Two equal parameter sets (two groups, the second with its own lr and weight decay, one parameter
    without a gradient) and an AdamW over each."""
    torch.manual_seed(0)
    shapes = [(6, 3), (6,), (4, 6), (4,), (5,)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]

    def groups(ps: list[torch.nn.Parameter]) -> list[dict]:
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}]

    options = {"lr": 1e-3, "betas": (0.8, 0.95), "weight_decay": 0.01, "fused": True, **kwargs}
    return a, b, torch.optim.AdamW(groups(a), **options), torch.optim.AdamW(groups(b), **options)


def run(params: list[torch.nn.Parameter], opt: torch.optim.AdamW, step, steps: int = 6) -> None:
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = group["lr"] * (0.9 if k % 2 else 1.1)
        for i, p in enumerate(params):
            p.grad = None if i == 4 else torch.randn(p.shape, generator=g)
        step(opt)


def assert_same(a: list[torch.nn.Parameter], b: list[torch.nn.Parameter], oa: torch.optim.AdamW,
                ob: torch.optim.AdamW) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(a, b):
        sx, sy = oa.state.get(x, {}), ob.state.get(y, {})
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


def test_optimizer_step_equals_adamw_step_bit_for_bit() -> None:
    a, b, oa, ob = twins()
    run(a, oa, lambda o: o.step())
    run(b, ob, optimizer_step)
    assert_same(a, b, oa, ob)
    assert ob.state[b[0]]["step"].item() == 6 and b[4] not in ob.state
    assert oa.state_dict()["param_groups"] == ob.state_dict()["param_groups"]


def test_the_trainers_adamw_takes_the_direct_path_after_its_first_step() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw([p], 1e-3, 0.0)
    p.grad = torch.ones(3)
    assert not _plain_fused_adamw(opt)  # no state yet: torch creates it
    opt.step()
    assert _plain_fused_adamw(opt)


@pytest.mark.parametrize("case", ["amsgrad", "not fused", "hook", "global hook", "tensor lr", "first step",
                                  "patched step"])
def test_other_cases_go_through_opt_step(case: str) -> None:
    kwargs = {"amsgrad": {"amsgrad": True}, "not fused": {"fused": False},
              "tensor lr": {"lr": torch.tensor(1e-3)}}.get(case, {})
    a, b, oa, ob = twins(**kwargs)
    calls: list[int] = []
    handle = None
    if case == "hook":
        ob.register_step_post_hook(lambda *args: calls.append(1))
    if case == "global hook":
        handle = register_optimizer_step_post_hook(lambda *args: calls.append(1))
    if case == "patched step":
        ob.step = lambda *args, _step=ob.step: (calls.append(1), _step())[1]
    try:
        if case != "first step":  # the states exist, and still the direct path is not taken
            run(a, oa, lambda o: o.step(), 1)
            run(b, ob, lambda o: o.step(), 1)
            assert not _plain_fused_adamw(ob)
        run(a, oa, lambda o: o.step(), 5)
        run(b, ob, optimizer_step, 5)
    finally:
        if handle is not None:
            handle.remove()
    assert_same(a, b, oa, ob)
    if "hook" in case or case == "patched step":
        assert len(calls) == (12 if case == "global hook" else 6)  # the global hook saw both optimizers
