"""``from_diffusers`` from a saved checkpoint directory, for each supported class, and back."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genlab.core.errors import GenlabError  # noqa: E402
from genlab.interop.diffusers import from_diffusers, to_diffusers  # noqa: E402
from genlab.models import DiT, UNet  # noqa: E402


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def peer_models():
    torch.manual_seed(0)
    yield "unet2d", perturb(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                                  block_out_channels=(16, 32), norm_num_groups=8,
                                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))), {}
    yield "sd", perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))), \
        {"encoder_hidden_states": torch.randn(2, 5, 12)}


@pytest.mark.parametrize("name, peer, extra", list(peer_models()), ids=["UNet2DModel", "UNet2DConditionModel"])
def test_from_a_saved_directory_and_back(tmp_path, name, peer, extra):
    peer.save_pretrained(tmp_path / name)
    ours = from_diffusers(tmp_path / name)
    assert isinstance(ours, UNet)
    x, t = torch.randn(2, peer.config.in_channels, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        expected = peer(x, t, **extra).sample
        got = ours(x, t, context=extra.get("encoder_hidden_states"))
        back = to_diffusers(ours).eval()(x, t, **extra).sample
    assert (got - expected).abs().max() < 1e-5 and (back - expected).abs().max() < 1e-5


def test_dit_and_errors(tmp_path):
    dit = DiT(input_size=8, in_channels=4, patch_size=2, hidden=32, depth=1, num_heads=2, num_classes=3,
              time_freq_shift=1.0).eval()
    perturb(dit)
    to_diffusers(dit).save_pretrained(tmp_path / "dit")
    again = from_diffusers(tmp_path / "dit")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 500.0]), torch.tensor([0, 2])
    assert isinstance(again, DiT) and torch.allclose(again(x, t, y), dit(x, t, y), atol=1e-5)
    with pytest.raises(GenlabError, match="no config.json"):
        from_diffusers(tmp_path)
    with pytest.raises(GenlabError, match="expected a genlab UNet, DiT, ControlNet"):
        to_diffusers(torch.nn.Linear(2, 2))
