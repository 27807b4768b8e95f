"""Time embeddings of the backbones: sinusoidal (the default) and random Fourier features."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.core.registry import build
from genlab.models import DiT, MLP, UNet
from genlab.models.layers import FourierFeatures, TimestepEmbedding


def test_fourier_features_are_cos_and_sin_of_2_pi_w_t() -> None:
    torch.manual_seed(0)
    features = FourierFeatures(8, scale=16.0)
    w, t = features.weight, torch.tensor([0.0, 0.25, -1.5])
    assert w.shape == (4,) and 4 < w.std() < 40  # w ~ N(0, 16^2)
    angles = 2 * math.pi * t[:, None] * w[None, :]
    torch.testing.assert_close(features(t), torch.cat([angles.cos(), angles.sin()], dim=1))
    assert "weight" in features.state_dict()  # the random frequencies are saved with the model
    with pytest.raises(ValueError, match="even"):
        FourierFeatures(7)


def test_timestep_embedding_kinds() -> None:
    torch.manual_seed(0)
    fourier = TimestepEmbedding(16, freq_dim=8, kind="fourier", fourier_scale=2.0)
    t = torch.tensor([0.1, 0.9])
    torch.testing.assert_close(fourier.features(t), fourier.fourier(t))
    assert fourier(t).shape == (2, 16)
    assert set(fourier.state_dict()) == {"fourier.weight", "linear_1.weight", "linear_1.bias", "linear_2.weight",
                                         "linear_2.bias"}
    assert "fourier.weight" not in TimestepEmbedding(16, freq_dim=8).state_dict()
    with pytest.raises(ValueError, match="kind must be 'sinusoidal' or 'fourier', got 'gaussian'"):
        TimestepEmbedding(16, kind="gaussian")  # type: ignore[arg-type]


@pytest.mark.parametrize("make, x, labels", [
    (lambda **kw: MLP(dim=3, hidden=32, depth=2, time_dim=16, num_classes=2, **kw), torch.randn(4, 3), [0, 1, -1, 0]),
    (lambda **kw: UNet(preset="tiny", norm_groups=8, num_classes=2, zero_init=False, **kw), torch.randn(4, 3, 8, 8),
     [0, 1, -1, 0]),
    (lambda **kw: DiT(input_size=8, in_channels=3, hidden=32, depth=1, num_heads=2, num_classes=2, **kw),
     torch.randn(4, 3, 8, 8), [0, 1, -1, 0]),
], ids=["mlp", "unet", "dit"])
def test_backbones_run_with_fourier_time_features(make, x, labels) -> None:
    torch.manual_seed(0)
    model = make(time_embedding="fourier", fourier_scale=4.0)
    t = torch.tensor([0.0, 0.2, 0.5, 1.0])
    out = model(x, t, torch.tensor(labels))
    assert out.shape == x.shape and torch.isfinite(out).all()
    w = model.time_embed.fourier.weight
    angles = 2 * math.pi * t[:, None] * w[None, :]
    torch.testing.assert_close(model.time_embed.features(t), torch.cat([angles.cos(), angles.sin()], dim=1))
    assert w.std() < 16  # fourier_scale reached the features
    default = make()  # the default's keys are those of before (tests/test_interop_*.py check them)
    assert set(model.state_dict()) - set(default.state_dict()) == {"time_embed.fourier.weight"}


def test_fourier_time_embedding_from_a_config() -> None:
    model = build("model", {"type": "mlp", "dim": 2, "hidden": 16, "depth": 1, "time_dim": 8,
                            "time_embedding": "fourier"})
    assert model.time_embed.kind == "fourier" and model(torch.zeros(3, 2), 0.5).shape == (3, 2)
