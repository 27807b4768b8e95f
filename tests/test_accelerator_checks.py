"""The checks ``scripts/gpu_check.py`` and ``tests/test_cuda.py`` run on a GPU, run here on the CPU
where they can be (bf16 autocast, attention backends in float32 and bf16), and shown to catch what
they are for (a non-finite or non-decreasing loss, a backend that differs from ``math``)."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.testing import accelerator
from genlab.testing.accelerator import StepReport, attention_backend_errors, autocast_train_steps, small_dit, small_unet


@pytest.mark.parametrize("make", [small_unet, small_dit], ids=["unet", "dit"])
def test_bf16_autocast_steps_on_the_cpu(make):
    torch.manual_seed(0)
    report = autocast_train_steps(make(channels=16) if make is small_unet else make(input_size=8),
                                  torch.randn(2, 3, 8, 8), "bf16", steps=4)
    assert report.problems() == [] and len(report.losses) == 5 and report.skipped == [False] * 4
    assert report.summary().startswith("bf16: loss ")


def test_a_step_report_names_what_is_wrong():
    nan, inf = float("nan"), float("inf")
    assert StepReport("bf16", [1.0, 0.5, 0.4], [1.0, 1.0], [False, False]).problems() == []
    assert "non-finite loss" in StepReport("bf16", [1.0, nan, 0.4], [1.0, 1.0], [False, False]).problems()[0]
    assert "did not decrease" in StepReport("bf16", [1.0, 0.9, 1.0], [1.0, 1.0], [False, False]).problems()[0]
    assert "not skipped" in StepReport("bf16", [1.0, 0.9, 0.8], [inf, 1.0], [False, False]).problems()[0]
    scaled = StepReport("fp16", [9.0, 1.0, 0.9, 0.8], [inf, 1.0, 1.0], [True, False, False])
    assert scaled.problems() == []  # an overflow skipped by the scaler; the loss is compared from step 1
    assert "3 of 3 steps skipped" in StepReport("fp16", [1.0] * 4, [inf] * 3, [True] * 3).problems()[0]
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp16, got 'fp8'"):
        autocast_train_steps(torch.nn.Identity(), torch.zeros(1, 1, 2, 2), "fp8")


def test_attention_backends_against_math_on_the_cpu(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        errors = attention_backend_errors("cpu", dtype, shape=(1, 2, 32, 16))
        assert [(e.backend, e.masked) for e in errors] == [("sdpa", False), ("sdpa", True)]
        assert all(e.ok for e in errors), [str(e) for e in errors]
    real = accelerator.attention

    def off_by_a_bit(q, k, v, backend="auto", mask=None):
        return real(q, k, v, backend, mask) * (1.01 if backend == "sdpa" else 1.0)

    monkeypatch.setattr(accelerator, "attention", off_by_a_bit)
    errors = attention_backend_errors("cpu", torch.float32, shape=(1, 2, 32, 16))
    assert not any(e.ok for e in errors) and all(1e-3 < e.forward < 1e-1 and math.isfinite(e.grad) for e in errors)


def gpu_check_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_gpu_check_without_cuda_says_so_and_exits_0(capsys):
    gpu_check = gpu_check_module()
    assert gpu_check.main([]) == 0 and gpu_check.main(["--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert out.count("no CUDA device") == 2 and "--device cpu" in out and gpu_check.RESULTS == []


def test_gpu_check_on_the_cpu_ends_with_a_table(capsys):
    gpu_check = gpu_check_module()
    others = [p for p in gpu_check.PARTS if p != "attention"]
    assert gpu_check.main(["--device", "cpu", "--skip", *others]) == 0
    out = capsys.readouterr().out
    table = out[out.index("== summary (cpu, CPU)"):]
    assert "attention sdpa == math, float16" in table and "attention flash == math" in table
    rows = [line for line in table.splitlines() if line.startswith("attention sdpa == math")]
    assert len(rows) == 3 and all("  ok      no mask: forward" in row for row in rows) and "0 failed: none" in out
    assert {status for _, status, _ in gpu_check.RESULTS} == {"ok", "skip"}
