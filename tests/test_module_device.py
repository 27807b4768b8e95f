"""module_device: a module's device from its parameters or buffers, the CPU for one that holds neither; the
held-out NLL of a parameterless flow (the standard normal itself) is computed, not a StopIteration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genlab.core.devices import module_device
from genlab.models.flows import Flow
from genlab.training.evaluation import heldout_nll


def test_module_device_reads_parameters_then_buffers_then_defaults_to_the_cpu():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    holder = nn.Module()
    holder.register_buffer("b", torch.zeros(1, device="meta"))
    assert module_device(holder) == torch.device("meta")
    assert module_device(nn.Identity()) == torch.device("cpu")


def test_heldout_nll_of_a_parameterless_flow_is_the_standard_normal_s():
    flow = Flow([2], []).double()
    assert not list(flow.parameters())
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float(0.5 * x.square().sum(1).mean() + math.log(2 * math.pi))
    assert heldout_nll(flow, x)["heldout_nll_nats"] == pytest.approx(expected, rel=1e-12)
