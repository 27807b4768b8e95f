"""Checks that matter most on an accelerator, shared by ``scripts/gpu_check.py`` and ``tests/test_cuda.py``
(and run on the CPU by the ordinary tests, where they can be).

- :func:`autocast_train_steps` runs a few AdamW steps of a model under ``torch.autocast`` in bf16 or
fp16 on one fixed batch (fp16 with a ``GradScaler``, as accelerate does) and returns a
:class:`StepReport`, whose :meth:`~StepReport.problems` names what is wrong: a non-finite loss, a
non-finite gradient on a step the scaler did not skip, too many skipped steps, a loss that did not
decrease. :func:`small_unet` and :func:`small_dit` are the backbones it is run on.
- :func:`attention_backend_errors`: each attention backend against ``math`` in the same dtype,
  forward and gradients, with and without a mask, measured against :data:`ATTENTION_TOLERANCE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from genlab.models.attention import attention, available_backends, flash_available
from genlab.models.dit import DiT
from genlab.models.unet import UNet

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def small_unet(in_channels: int = 3, channels: int = 32, attention_backend: str = "auto", **kwargs: object) -> UNet:
    """A two-level UNet with attention at the second level and in the middle (random output layer:
    ``zero_init=False``, so every parameter gets a gradient on the first step)."""
    return UNet(in_channels=in_channels, channels=channels, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), norm_groups=8, head_dim=16, zero_init=False,
                attention_backend=attention_backend, **kwargs)


def small_dit(in_channels: int = 3, input_size: int = 16, attention_backend: str = "auto", **kwargs: object) -> DiT:
    """A two-block DiT (hidden 64, 4 heads, patch 2)."""
    return DiT(input_size=input_size, in_channels=in_channels, patch_size=2, hidden=64, depth=2, num_heads=4,
               attention_backend=attention_backend, **kwargs)


@dataclass
class StepReport:
    """What :func:`autocast_train_steps` saw: per step the loss, the gradient norm after unscaling
    (inf or nan where it was not finite) and whether the step was skipped (fp16 loss scaling skips
    steps whose gradients overflowed)."""

    dtype: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    max_skipped: int = 2

    def problems(self) -> list[str]:
        """What is wrong with the run, empty if nothing is."""
        out = []
        if not all(math.isfinite(v) for v in self.losses):
            out.append(f"non-finite loss: {self.losses}")
        bad = [i for i, (n, s) in enumerate(zip(self.grad_norms, self.skipped)) if not math.isfinite(n) and not s]
        if bad:
            out.append(f"non-finite gradients on steps {bad} that were not skipped")
        if sum(self.skipped) > self.max_skipped:
            out.append(f"{sum(self.skipped)} of {len(self.skipped)} steps skipped by the loss scaler "
                       f"(more than {self.max_skipped})")
        finite = [i for i, s in enumerate(self.skipped) if not s]
        if finite and not self.losses[-1] < self.losses[finite[0]]:
            out.append(f"the loss did not decrease on a fixed batch: {self.losses[finite[0]]:.4g} -> "
                       f"{self.losses[-1]:.4g}")
        return out

    def summary(self) -> str:
        """One line: the first and last loss, steps skipped, the largest finite gradient norm."""
        finite = [n for n in self.grad_norms if math.isfinite(n)]
        return (f"{self.dtype}: loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f} in {len(self.skipped)} steps, "
                f"{sum(self.skipped)} skipped, max grad norm {max(finite, default=float('nan')):.3g}")


def autocast_train_steps(model: nn.Module, x: Tensor, dtype: str, steps: int = 8, lr: float = 1e-3,
                         seed: int = 0) -> StepReport:
    """``steps`` AdamW steps of ``model`` under autocast in ``dtype`` (``"bf16"`` or ``"fp16"``, the
    latter with a GradScaler) on the fixed batch ``x`` [B, C, H, W] (on the model's device): the model
    learns to predict fixed noise from a fixed noisy input at fixed times, an MSE that can only go
    down on one batch. ``losses[k]`` is the loss before step k's update; one more forward gives the last."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_train_steps: dtype must be one of {', '.join(AUTOCAST_DTYPES)}, got {dtype!r}")
    if steps < 1:
        raise ValueError(f"autocast_train_steps: steps must be >= 1, got {steps}")
    device = x.device
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, device=device)
    t = torch.rand(x.shape[0], generator=g, device=device)
    alpha, sigma = torch.cos(t * math.pi / 2)[:, None, None, None], torch.sin(t * math.pi / 2)[:, None, None, None]
    x_t = alpha * x + sigma * noise
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
    report = StepReport(dtype)
    model.train()

    def loss_now() -> Tensor:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype]):
            out = model(x_t, t)
        return torch.nn.functional.mse_loss(out.float(), noise)

    for _ in range(steps):
        loss = loss_now()
        report.losses.append(loss.item())
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        report.grad_norms.append(norm.item())
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(opt)  # skipped when a gradient is not finite
            scaler.update()
            report.skipped.append(scaler.get_scale() < before)
        else:
            report.skipped.append(False)
            opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        report.losses.append(loss_now().item())
    return report


# max |backend - math| allowed, relative to max(1, max |math|): forward, gradients
ATTENTION_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-4, 5e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (3e-3, 1e-2)}


@dataclass
class BackendError:
    """How far ``backend`` is from ``math`` in ``dtype``: max abs differences of the output and of the
    gradients of q, k and v (relative to max(1, max |math|)), and whether they are within tolerance."""

    backend: str
    dtype: torch.dtype
    masked: bool
    forward: float
    grad: float

    @property
    def ok(self) -> bool:
        tol_forward, tol_grad = ATTENTION_TOLERANCE[self.dtype]
        return self.forward <= tol_forward and self.grad <= tol_grad

    def __str__(self) -> str:
        tol_forward, tol_grad = ATTENTION_TOLERANCE[self.dtype]
        mask = " masked" if self.masked else ""
        return (f"{self.backend} {str(self.dtype).removeprefix('torch.')}{mask}: forward {self.forward:.1e} "
                f"(tol {tol_forward:.0e}), grad {self.grad:.1e} (tol {tol_grad:.0e})")


def _relative(a: Tensor, ref: Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1)).item()


def attention_backend_errors(device: torch.device | str, dtype: torch.dtype, shape: tuple[int, ...] = (2, 4, 128, 64),
                             seed: int = 0, backends: tuple[str, ...] | None = None) -> list[BackendError]:
    """``backends`` (default: every available one but ``math``) against ``math``, on ``device`` in
    ``dtype``, unmasked and (not flash) with a random mask keeping at least one key per query; q, k, v
    [B, H, N, D] of ``shape``. Flash is measured only where it can run (CUDA, fp16/bf16)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, grad_out = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(4))
    mask = torch.rand(shape[0], 1, shape[2], shape[2], generator=g, device=device) < 0.7
    mask[..., 0] = True

    def run(backend: str, mask: Tensor | None) -> tuple[Tensor, ...]:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, backend=backend, mask=mask)
        grads = torch.autograd.grad(out, leaves, grad_out)
        return (out.detach(), *grads)

    out = []
    for masked in (False, True):
        reference = run("math", mask if masked else None)
        for backend in backends or available_backends():
            if backend == "math" or (backend == "flash" and (masked or not flash_available(q))):
                continue
            got = run(backend, mask if masked else None)
            out.append(BackendError(backend, dtype, masked, _relative(got[0], reference[0]),
                                    max(_relative(a, b) for a, b in zip(got[1:], reference[1:]))))
    return out
