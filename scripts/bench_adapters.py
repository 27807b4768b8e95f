"""Benchmark genlab's adapters against their reference implementations, side by side in one process.

Parts (``--parts lora,...``; each adds rows to one table):

- ``lora``: a LoRA (and a DoRA) fine-tuning step of one UNet, genlab's ``attach_lora`` against peft's
  ``inject_adapter_in_model`` on copies of it: the same targets (the attention projections ``to_q, to_k,
  to_v, to_out`` and the ResBlock convs ``conv_1, conv_2``), rank 8, alpha 8, the same random adapter
  weights (outputs checked equal), base frozen. Step: forward, MSE to a fixed target, backward,
  ``zero_grad(set_to_none)``; also the forward alone under ``no_grad`` (inference, unmerged) and after
  ``merge_adapters`` (genlab). UNet: 64/128/256 channels, 2 ResBlocks per level, cross-attention
  transformers (context [B, 16, 128]) at the two lower levels and the middle, x [8, 4, 32, 32].

- ``controlnet``: a ControlNet training step (UNet frozen, ControlNet trained; forward, MSE, backward)
  of genlab's ``ControlNet.from_unet`` of the UNet above against diffusers' ``ControlNetModel`` and
  ``UNet2DConditionModel`` converted from the same modules (``to_diffusers``; outputs checked equal).
- ``cfg``: one DDIM step with classifier-free guidance (scale 3) of a class-conditional UNet (the same
  widths): genlab's ``CFG`` (cond and uncond in one batched call) against two separate calls.

Times: the runs alternate (ABBA) with ``bench_models.step_times``; median over repeats after warm-up. On
the CPU they are this process's CPU seconds (``time.process_time``), which other processes sharing the
cores do not inflate as they do wall time; on CUDA, wall time.

Usage: ``python scripts/bench_adapters.py [--parts lora] [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_models import DEVICE, step_times, sync
from torch import Tensor, nn

from genlab.adapters.lora import LoRAConfig, attach_lora, lora_layers, mark_only_adapters_trainable, merge_adapters
from genlab.models.unet import UNet

Row = tuple[str, float | None, float | None, float | None, str]
CLOCK = time.process_time if DEVICE == "cpu" else time.perf_counter
TARGETS = ["to_q", "to_k", "to_v", "to_out", "conv_1", "conv_2"]


def _unet_and_inputs(batch: int) -> tuple[UNet, tuple]:
    torch.manual_seed(0)
    unet = UNet(in_channels=4, channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                head_dim=32, cross_attention_dim=128, zero_init=False).to(DEVICE)
    x, c = torch.randn(batch, 4, 32, 32, device=DEVICE), torch.randn(batch, 16, 128, device=DEVICE)
    return unet, (x, torch.randint(0, 1000, (batch,), device=DEVICE), None, c)


def _pair(unet: UNet, dora: bool) -> tuple[nn.Module, nn.Module]:
    """(genlab copy, peft copy) of ``unet`` with the same random adapter; base weights frozen in both."""
    import peft

    ours, theirs = copy.deepcopy(unet), copy.deepcopy(unet)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=8, use_dora=dora), theirs)
    attach_lora(ours, LoRAConfig([f"*.{t}" for t in TARGETS], rank=8, alpha=8, dora=dora))
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            a, p = layer.lora["default"], modules[name]
            p.lora_B["default"].weight.normal_(0, 0.02)
            a.A.copy_(p.lora_A["default"].weight.view_as(a.A))
            a.B.copy_(p.lora_B["default"].weight.view_as(a.B))
            if dora:
                a.m.copy_(p.lora_magnitude_vector["default"].weight.flatten())
    mark_only_adapters_trainable(ours)
    for n, p in theirs.named_parameters():
        p.requires_grad_("lora_" in n)
    return ours.train(), theirs.train()


def _fwd_bwd(model: nn.Module, inputs: tuple, target: Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        F.mse_loss(model(*inputs), target).backward()
        for p in params:
            p.grad = None
    return step


def _forward(model: nn.Module, inputs: tuple) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(*inputs)
    return run


def lora_part(args: argparse.Namespace) -> list[Row]:
    unet, inputs = _unet_and_inputs(4 if args.quick else 8)
    target = torch.randn_like(inputs[0])
    rows: list[Row] = []
    for dora in (False, True):
        kind = "DoRA" if dora else "LoRA"
        ours, theirs = _pair(unet, dora)
        with torch.no_grad():
            diff = (ours(*inputs) - theirs(*inputs)).abs().max().item()
        print(f"{kind}: {len(lora_layers(ours))} layers, "
              f"{sum(p.numel() for p in ours.parameters() if p.requires_grad) / 1e6:.2f} M adapter parameters; "
              f"max |genlab - peft| output {diff:.1e}")
        runs = [(sync, _fwd_bwd(ours, inputs, target)), (sync, _fwd_bwd(theirs, inputs, target))]
        times, _ = step_times(runs, args.repeats, args.warmup, CLOCK)
        t_ours, t_theirs = map(statistics.median, times)
        rows.append((f"{kind} forward+backward ms", 1e3 * t_ours, 1e3 * t_theirs, t_ours / t_theirs, "<= 1.00x"))
        ours.eval(), theirs.eval()
        merged = copy.deepcopy(ours)
        merge_adapters(merged)
        runs = [(sync, _forward(ours, inputs)), (sync, _forward(theirs, inputs)), (sync, _forward(merged, inputs))]
        times, _ = step_times(runs, args.repeats, args.warmup, CLOCK)
        t_ours, t_theirs, t_merged = map(statistics.median, times)
        rows.append((f"{kind} inference forward ms", 1e3 * t_ours, 1e3 * t_theirs, t_ours / t_theirs, "<= 1.00x"))
        rows.append((f"{kind} inference forward, merged ms", 1e3 * t_merged, None, None, ""))
    return rows


def controlnet_part(args: argparse.Namespace) -> list[Row]:
    """A ControlNet training step: genlab's ``ControlNet.from_unet`` + frozen UNet against diffusers'
    ``ControlNetModel`` + ``UNet2DConditionModel`` converted from them (``to_diffusers``: the same weights)."""
    from genlab.adapters.controlnet import ControlNet
    from genlab.interop.diffusers import to_diffusers

    unet, (x, t, _, ctx) = _unet_and_inputs(4 if args.quick else 8)
    net = ControlNet.from_unet(unet)
    with torch.no_grad():  # not the zero start: both must compute the control
        for q in net.parameters():
            q.add_(0.02 * torch.randn_like(q))
    their_unet, their_net = to_diffusers(unet).to(DEVICE), to_diffusers(net).to(DEVICE)
    f = net.control_factor
    cond = torch.rand(x.shape[0], 3, f * x.shape[-2], f * x.shape[-1], device=DEVICE)
    target = torch.randn_like(x)
    for frozen in (unet, their_unet):
        frozen.requires_grad_(False)

    def ours() -> Tensor:
        return unet(x, t, None, ctx, residuals=net(x, t, cond, None, ctx))

    def theirs() -> Tensor:
        down, mid = their_net(x, t, ctx, cond, return_dict=False)
        return their_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    with torch.no_grad():
        print(f"ControlNet: {sum(q.numel() for q in net.parameters()) / 1e6:.2f} M trainable parameters; "
              f"max |genlab - diffusers| output {(ours() - theirs()).abs().max().item():.1e}")

    def step(forward: Callable[[], Tensor], params: list[nn.Parameter]) -> Callable[[], None]:
        def run() -> None:
            F.mse_loss(forward(), target).backward()
            for q in params:
                q.grad = None
        return run

    runs = [(sync, step(ours, list(net.parameters()))), (sync, step(theirs, list(their_net.parameters())))]
    times, _ = step_times(runs, args.repeats, args.warmup, CLOCK)
    t_ours, t_theirs = map(statistics.median, times)
    return [("ControlNet training step (forward+backward) ms", 1e3 * t_ours, 1e3 * t_theirs, t_ours / t_theirs,
             "<= 1.00x")]


def cfg_part(args: argparse.Namespace) -> list[Row]:
    """Classifier-free guidance per sampling step: genlab's ``CFG`` (one batched call of 2B) against the
    conditional and unconditional calls made separately, on the same UNet and DDIM step."""
    from genlab.adapters.guidance import CFG
    from genlab.diffusion import DDIM, VP, Denoiser

    torch.manual_seed(0)
    unet = UNet(in_channels=4, channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                head_dim=32, num_classes=10, zero_init=False).to(DEVICE).eval()
    batch = 4 if args.quick else 8
    x, labels = torch.randn(batch, 4, 32, 32, device=DEVICE), torch.arange(batch, device=DEVICE) % 10
    denoiser = Denoiser(unet, VP(), "eps")
    guided, sampler = CFG(scale=3.0).wrap(denoiser), DDIM(1)

    class TwoCalls(nn.Module):  # the same guidance from two separate model calls
        def __init__(self) -> None:
            super().__init__()
            self.process = denoiser.process

        def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> tuple[Tensor, Tensor]:
            x0_c, eps_c = denoiser(x, t, **cond)
            x0_u, eps_u = denoiser(x, t, class_labels=torch.full_like(cond["class_labels"], -1))
            return x0_u + 3.0 * (x0_c - x0_u), eps_u + 3.0 * (eps_c - eps_u)

    cond = {"class_labels": labels}

    def one_step(d: nn.Module) -> Callable[[], None]:
        return lambda: sampler.sample(d, x.clone(), cond=cond, progress=False)

    with torch.no_grad():
        diff = (sampler.sample(guided, x.clone(), cond=cond, progress=False)
                - sampler.sample(TwoCalls(), x.clone(), cond=cond, progress=False)).abs().max().item()
    print(f"CFG: max |one batched call - two calls| sample {diff:.1e}")
    with torch.no_grad():
        times, _ = step_times([(sync, one_step(guided)), (sync, one_step(TwoCalls()))], args.repeats, args.warmup,
                              CLOCK)
    t_ours, t_theirs = map(statistics.median, times)
    return [("CFG sampling step ms (one batched call vs two calls)", 1e3 * t_ours, 1e3 * t_theirs,
             t_ours / t_theirs, "one call")]


PARTS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {"lora": lora_part, "controlnet": controlnet_part,
                                                                "cfg": cfg_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats, args.warmup = (5, 1) if args.quick else (15, 3)
    print(f"device {DEVICE}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [row for part in parts for row in PARTS[part](args)]
    print("\n| metric | genlab | reference | genlab/reference | target |\n|---|---|---|---|---|")
    for name, ours, theirs, ratio, target in rows:
        cells = [f"{v:.1f}" if v is not None else "" for v in (ours, theirs)] + [f"{ratio:.2f}x" if ratio else ""]
        print(f"| {name} | {' | '.join(cells)} | {target} |")


if __name__ == "__main__":
    main()
