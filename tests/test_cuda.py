"""What needs a CUDA device: bf16 and fp16 autocast training steps of a UNet and a DiT, the attention
backends (flash where installed, sdpa) against ``math`` on the GPU, samplers drawing on the GPU
with a generator there, and a controlled UNet (its ControlNets' residuals) in float32 and bf16. Marked ``cuda`` and skipped without one (``pytest -m cuda`` runs only these);
``scripts/gpu_check.py`` runs the same checks, and more, on whatever GPU is present."""

from __future__ import annotations

import pytest
import torch

from genlab.core.registry import build, registered
from genlab.diffusion import VP, Denoiser
from genlab.testing.accelerator import attention_backend_errors, autocast_train_steps, small_dit, small_unet

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("make", [small_unet, small_dit], ids=["unet", "dit"])
def test_autocast_training_steps_are_finite_and_learn(make, dtype):
    """Finite losses and gradients (fp16: through a GradScaler, at most 2 steps skipped), and a loss
    that goes down on a fixed batch."""
    torch.manual_seed(0)
    model = make().to(CUDA)
    x = torch.randn(8, 3, 16, 16, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(1))
    report = autocast_train_steps(model, x, dtype, steps=8)
    assert report.problems() == [], report.summary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_attention_backends_equal_math_on_cuda(dtype):
    errors = attention_backend_errors(CUDA, dtype)
    assert {e.backend for e in errors} >= {"sdpa"}
    assert all(e.ok for e in errors), [str(e) for e in errors]


@pytest.mark.parametrize("name", sorted(registered("sampler")["sampler"]))
def test_samplers_draw_on_cuda_with_a_cuda_generator(name):
    """On the GPU, repeatable from the generator's seed, finite, in float32 and bf16."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)).to(CUDA)
    denoiser = Denoiser(lambda x, t: net(x.float()).to(x.dtype), VP(), "v")
    sampler = build("sampler", {"type": name, "steps": 6} if name != "ode" else name)
    g = torch.Generator(device=CUDA)
    for dtype in (torch.float32, torch.bfloat16):
        a = sampler.sample(denoiser, shape=(64, 2), generator=g.manual_seed(0), progress=False, dtype=dtype)
        b = sampler.sample(denoiser, shape=(64, 2), generator=g.manual_seed(0), progress=False, dtype=dtype)
        assert a.device.type == "cuda" and a.dtype == dtype and torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_controlled_unet_is_the_unet_at_initialisation_and_its_controlnet_learns_on_cuda(dtype):
    from genlab.adapters.controlled import ControlledModel
    from genlab.adapters.controlnet import ControlNet
    from genlab.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(preset="tiny", in_channels=1, norm_groups=8, num_classes=10, zero_init=False).to(CUDA).eval()
    net = ControlNet.from_unet(unet, 1, (16,))
    model = ControlledModel(unet.requires_grad_(False), net)
    g = torch.Generator(device=CUDA).manual_seed(1)
    x, c = torch.randn(8, 1, 16, 16, device=CUDA, generator=g), torch.rand(8, 1, 16, 16, device=CUDA, generator=g)
    t, y = torch.rand(8, device=CUDA, generator=g) * 1000, torch.arange(8, device=CUDA)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        with torch.no_grad():
            assert torch.equal(model(x, t, y, control=c), unet(x, t, y))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for _ in range(3):
            loss = (model(x, t, y, control=c) - x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert torch.isfinite(loss) and net.mid_conv.weight.abs().max() > 0 and net.mid_conv.weight.is_cuda
