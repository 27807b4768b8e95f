"""New rows in a frozen embedding table (textual inversion): old ids unchanged, only the new rows
train, files in diffusers' layout, and a UNet's class embedding extended by a new class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genlab.adapters.textual_inversion import NewEmbeddings
from genlab.models import UNet


def test_new_rows_extend_a_frozen_table(tmp_path):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.table = nn.Embedding(5, 3)
    before = holder.table.weight.detach().clone()
    rows = NewEmbeddings.attach(holder, "table", count=2, init=[1, 4])
    assert rows.ids == [5, 6] and isinstance(holder.table, NewEmbeddings)
    ids = torch.tensor([0, 4, 5, 6])
    out = holder.table(ids)
    torch.testing.assert_close(out, before[[0, 4, 1, 4]], rtol=0, atol=0)  # new rows start at their init rows
    (out * torch.arange(12.0).reshape(4, 3)).sum().backward()
    assert rows.base.weight.grad is None
    torch.testing.assert_close(rows.new.grad, torch.arange(6.0, 12.0).reshape(2, 3))
    mean = NewEmbeddings(nn.Embedding(5, 3), count=1)
    torch.testing.assert_close(mean.new[0], mean.base.weight.mean(0))
    rows.save(tmp_path / "learned_embeds.safetensors", "<x>")
    other = NewEmbeddings(nn.Embedding(5, 3), count=2)
    other.load(tmp_path / "learned_embeds.safetensors")
    torch.testing.assert_close(other.new, rows.new, rtol=0, atol=0)
    assert NewEmbeddings.detach(holder, "table") is rows.base and holder.table is rows.base


def test_bad_uses_are_named(tmp_path):
    holder = nn.Module()
    holder.table, holder.lin = nn.Embedding(5, 3), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"init must be 1 or 2 ids in \[0, 5\)"):
        NewEmbeddings.attach(holder, "table", count=2, init=[7])
    with pytest.raises(TypeError, match="lin is Linear, not an nn.Embedding"):
        NewEmbeddings.attach(holder, "lin")
    with pytest.raises(KeyError, match="no module 'nowhere.table'"):
        NewEmbeddings.attach(holder, "nowhere.table")
    rows = NewEmbeddings.attach(holder, "table")
    with pytest.raises(ValueError, match="already has new rows"):
        NewEmbeddings.attach(holder, "table")
    rows.save(tmp_path / "one.safetensors", "<x>")
    with pytest.raises(ValueError, match=r"shape \[1, 3\], the new rows \[2, 3\]"):
        NewEmbeddings(nn.Embedding(5, 3), count=2).load(tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match="has no '<y>'"):
        rows.load(tmp_path / "one.safetensors", "<y>")


def test_a_new_class_of_a_unet_leaves_the_old_ones_unchanged():
    torch.manual_seed(0)
    unet = UNet(in_channels=1, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                norm_groups=8, num_classes=10).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000
    labels = torch.tensor([0, 3, -1, 9])
    with torch.no_grad():
        before = unet(x, t, class_labels=labels)
    rows = NewEmbeddings.attach(unet, "label_embed.embedding", init=7)
    assert rows.ids == [11]  # after the ten classes and the null class
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, class_labels=labels), before, rtol=0, atol=0)
        # started from class 7's row, the new class is class 7 until it trains
        torch.testing.assert_close(unet(x, t, class_labels=torch.full((4,), 11)),
                                   unet(x, t, class_labels=torch.full((4,), 7)), rtol=0, atol=0)
