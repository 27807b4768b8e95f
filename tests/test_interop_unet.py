from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genlab.interop.diffusers import from_diffusers  # noqa: E402
from genlab.interop.unet_weights import diffusers_key_map, unet_from_diffusers, unet_to_diffusers  # noqa: E402
from genlab.models.unet import UNet  # noqa: E402

SMALL = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
PLAIN = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
CROSS = dict(cross_attention_dim=32, attention_head_dim=8, in_channels=4, out_channels=4,  # SD 1.x layout
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))




def _reloaded(cls: type, tmp_path, **config):
    """A diffusers model with random weights, saved and loaded back as a user would have it."""
    torch.manual_seed(0)
    cls(**config).save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path).eval()


def _inputs(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, channels, 16, 16, generator=g), torch.tensor([7, 913])  # DDPM step indices


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"resnet_time_scale_shift": "scale_shift"},  # AdaGN; its mid attention has no GroupNorm in diffusers
        {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
        {"num_class_embeds": 10},
        {"attention_head_dim": None, "flip_sin_to_cos": False, "freq_shift": 1, "add_attention": False},  # DDPM's
        {"down_block_types": ("AttnDownBlock2D",) * 2, "up_block_types": ("AttnUpBlock2D",) * 2,
         "downsample_type": "resnet", "upsample_type": "resnet", "dropout": 0.1},
    ],
    ids=["default", "scale_shift", "scale_shift_mid_norm", "classes", "ddpm", "resblock_updown"],
)
def test_unet2dmodel_round_trip(tmp_path, config: dict) -> None:
    peer = _reloaded(diffusers.UNet2DModel, tmp_path, **{**SMALL, **PLAIN, **config})
    unet = unet_from_diffusers(peer).eval()
    x, t = _inputs(3)
    labels = torch.tensor([3, 9]) if "num_class_embeds" in config else None
    back = unet_to_diffusers(unet, sample_size=16).eval()
    with torch.no_grad():
        ref = peer(x, t, class_labels=labels).sample
        torch.testing.assert_close(unet(x, t, labels), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(x, t, class_labels=labels).sample, ref, rtol=0, atol=1e-5)
    for name, value in config.items():  # the exported config says the same
        assert back.config[name] == (list(value) if isinstance(value, tuple) else value) or back.config[name] == value


@pytest.mark.parametrize(
    "config",
    [{}, {"use_linear_projection": True, "attention_head_dim": (4, 8), "num_class_embeds": 5},
     {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
      "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": 2,
      "resnet_time_scale_shift": "scale_shift"}],
    ids=["sd1", "sd2_linear_head_dim", "deeper_scale_shift"],
)
def test_unet2dconditionmodel_round_trip(tmp_path, config: dict) -> None:
    peer = _reloaded(diffusers.UNet2DConditionModel, tmp_path, **{**SMALL, **CROSS, **config})
    unet = unet_from_diffusers(peer).eval()
    x, t = _inputs(4)
    ctx = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 4]) if "num_class_embeds" in config else None
    back = unet_to_diffusers(unet).eval()
    with torch.no_grad():
        ref = peer(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        torch.testing.assert_close(unet(x, t, labels, ctx), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(x, t, encoder_hidden_states=ctx, class_labels=labels).sample, ref, rtol=0,
                                   atol=1e-5)


UNEVEN = dict(block_out_channels=(32, 48, 64), attention_head_dim=8)  # widths not multiples of the first


@pytest.mark.parametrize(
    ("cls", "blocks"),
    [("UNet2DModel", dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=3)),
     ("UNet2DConditionModel", dict(**{k: v for k, v in CROSS.items() if not k.endswith("block_types")},
                                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))],
)
def test_uneven_block_out_channels(tmp_path, cls: str, blocks: dict) -> None:
    """``block_out_channels=(32, 48, 64)`` converts to ``channels_per_level``, exactly in float64, and back."""
    peer = _reloaded(getattr(diffusers, cls), tmp_path, **{**SMALL, **blocks, **UNEVEN})
    unet = from_diffusers(tmp_path).eval()
    assert unet.config["channels_per_level"] == (32, 48, 64) and unet.widths == [32, 48, 64]
    back = unet_to_diffusers(unet, sample_size=16).eval()
    assert list(back.config["block_out_channels"]) == [32, 48, 64]
    x, t = _inputs(peer.config.in_channels)
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, 32)} if "cross_attention_dim" in blocks else {}
    labels = torch.tensor([0, 2]) if "num_class_embeds" in blocks else None
    with torch.no_grad():
        ref = peer(x, t, class_labels=labels, **kwargs).sample
        torch.testing.assert_close(unet(x, t, labels, kwargs.get("encoder_hidden_states")), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(x, t, class_labels=labels, **kwargs).sample, ref, rtol=0, atol=1e-5)
        peer, unet = peer.double(), unet_from_diffusers(peer.double()).eval()
        kwargs = {k: v.double() for k, v in kwargs.items()}
        ref = peer(x.double(), t, class_labels=labels, **kwargs).sample
        got = unet(x.double(), t, labels, kwargs.get("encoder_hidden_states"))
        assert got.dtype == torch.float64 and ref.abs().max() > 0.1
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_residuals_match_controlnet_residuals(tmp_path) -> None:
    """genlab's "down.{k}" / "mid" injection points are diffusers' ControlNet residuals."""
    peer = _reloaded(diffusers.UNet2DConditionModel, tmp_path, **{**SMALL, **CROSS})
    unet = unet_from_diffusers(peer).eval()
    x, t = _inputs(4)
    ctx = torch.randn(2, 7, 32)
    residuals = {name: torch.randn(shape) for name, shape in unet.injection_points(x.shape).items()}
    down = tuple(residuals[f"down.{k}"] for k in range(len(residuals) - 1))
    with torch.no_grad():
        ref = peer(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=residuals["mid"]).sample
        torch.testing.assert_close(unet(x, t, context=ctx, residuals=residuals), ref, rtol=0, atol=1e-5)


def test_key_map_is_one_to_one() -> None:
    unet = UNet(preset="tiny", attention_levels=(1,), cross_attention_dim=8, norm_groups=8, num_classes=2)
    keys = diffusers_key_map(unet)
    assert set(keys) == set(unet.state_dict()) and len(set(keys.values())) == len(keys)
    ff = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    assert keys["down.1.attns.0.blocks.0.ff.proj_in.weight"] == ff
    assert keys["mid.res_2.emb_proj.bias"] == "mid_block.resnets.1.time_emb_proj.bias"
    assert keys["label_embed.embedding.weight"] == "class_embedding.weight"


@pytest.mark.parametrize(
    ("cls", "config", "option"),
    [
        ("UNet2DModel", {"center_input_sample": True}, "center_input_sample"),
        ("UNet2DModel", {"mid_block_scale_factor": 1.414}, "mid_block_scale_factor"),
        ("UNet2DModel", {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                         "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}, "up_block_types"),
        ("UNet2DModel", {"downsample_type": "resnet", "upsample_type": "resnet"}, "downsample_type"),
        ("UNet2DConditionModel", {"layers_per_block": (1, 2)}, "layers_per_block"),
        ("UNet2DConditionModel", {"only_cross_attention": True}, "only_cross_attention"),
        ("UNet2DConditionModel", {"attention_head_dim": (2, 8)}, "attention_head_dim"),
        ("UNet2DConditionModel", {"time_embedding_act_fn": "silu"}, "time_embedding_act_fn"),
    ],
)
def test_unsupported_options_are_named(cls: str, config: dict, option: str) -> None:
    torch.manual_seed(0)
    base = {**SMALL, **(PLAIN if cls == "UNet2DModel" else CROSS)}
    peer = getattr(diffusers, cls)(**{**base, **config})
    with pytest.raises(ValueError, match=option):
        unet_from_diffusers(peer)


def test_to_diffusers_rejects_what_it_cannot_express() -> None:
    small = dict(preset="tiny", norm_groups=8)
    with pytest.raises(ValueError, match="resblock"):
        unet_to_diffusers(UNet(**small, resample="resblock"))
    with pytest.raises(ValueError, match="mid_attention_norm=False"):
        unet_to_diffusers(UNet(**small, mid_attention_norm=False))
    with pytest.raises(ValueError, match="set head_dim instead"):
        unet_to_diffusers(UNet(**small, attention_levels=(0,), num_heads=2))
    with pytest.raises(ValueError, match="cannot express time_embedding='fourier'"):
        unet_to_diffusers(UNet(**small, time_embedding="fourier"))
    with pytest.raises(ValueError, match=r"channels \(conv_in's width, 16\) equal to the first level's width \(32\)"):
        unet_to_diffusers(UNet(channels=16, channel_mult=(2, 3), num_res_blocks=1, norm_groups=8))
