"""A ControlNet and a T2I-Adapter on one UNet (``ControlledModel`` with the adapter's ``residuals``): at a
point both reach (the middle block) their residuals add, and elsewhere each lands where it would alone."""

from __future__ import annotations

import torch

from genlab.adapters.controlled import ControlledModel
from genlab.adapters.controlnet import ControlNet
from genlab.adapters.t2i_adapter import T2IAdapter, unet_points
from genlab.models.unet import UNet


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_controlnet_and_t2i_residuals_add() -> None:
    torch.manual_seed(0)  # one level: the T2I-Adapter's points are intra.1 and mid, both at the input's size
    unet = UNet(channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(), norm_groups=8,
                num_classes=3, zero_init=False).eval()
    net = ControlNet.from_unet(unet, 1, (16,))
    for i, p in enumerate([*net.zero_convs.parameters(), *net.mid_conv.parameters(), *net.cond_embed.conv_out.parameters()]):
        assert not p.any()  # fresh: zero projections, filled with known values
        p.copy_(_rand(*p.shape, seed=10 + i) * 0.1)
    adapter = T2IAdapter(2, (32, 32), 1, 1, "full_adapter_xl").eval()
    assert unet_points(unet) == ["intra.1", "mid"]
    x, y, control, hint = _rand(2, 3, 8, 8, seed=1), torch.tensor([0, 2]), _rand(2, 1, 8, 8, seed=2), _rand(2, 2, 8, 8, seed=3)
    t = torch.tensor([3.0, 700.0])
    from_cn, from_t2i = net(x, t, control, y), adapter(hint, unet)
    assert "mid" in from_cn and "mid" in from_t2i and from_cn["mid"].abs().sum() > 0 and from_t2i["mid"].abs().sum() > 0
    by_hand = {**from_cn, **from_t2i, "mid": from_cn["mid"] + from_t2i["mid"]}
    got = ControlledModel(unet, net)(x, t, y, control=control, residuals=from_t2i)
    torch.testing.assert_close(got, unet(x, t, y, residuals=by_hand), rtol=0, atol=1e-6)
    for overwritten in ({**from_cn, **from_t2i}, {**from_t2i, **from_cn}):  # either one alone at mid differs
        assert not torch.allclose(got, unet(x, t, y, residuals=overwritten), atol=1e-4)
