"""Visualisation is a pure function of the recorded sources."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import build, images
from tokenreduce.viz import patch_assignment, render_merges

# Final tokens: 0 = CLS, 1 covers patches 0 and 3, 2 covers patch 2; patch 1 was pruned.
OWNER = torch.tensor([0, 1, -1, 2, 1])


def test_patch_assignment():
    assert patch_assignment(OWNER, num_prefix=1, grid=(2, 2)).tolist() == [[1, -1], [2, 1]]
    with pytest.raises(ValueError, match="grid 3x3 has 9 patches, owner covers 4"):
        patch_assignment(OWNER, num_prefix=1, grid=(3, 3))


def test_render_paints_token_means_and_dims_pruned():
    image = torch.zeros(3, 4, 4)
    image[0, :2, :2] = 1.0  # patch 0 red
    image[1, 2:, 2:] = 1.0  # patch 3 green
    image[2, :2, 2:] = 1.0  # patch 1 blue, pruned
    out = render_merges(image, patch_assignment(OWNER, 1, (2, 2)), dim_pruned=0.5, border=False)
    assert out[:, 0, 0].tolist() == [0.5, 0.5, 0.0] == out[:, 3, 3].tolist()  # merged red + green
    assert out[:, 0, 3].tolist() == [0.0, 0.0, 0.5]  # pruned blue, dimmed
    assert out[:, 3, 0].tolist() == [0.0, 0.0, 0.0]
    with_border = render_merges(image, patch_assignment(OWNER, 1, (2, 2)), dim_pruned=0.5)
    assert with_border[0, 2, 3] < out[0, 2, 3]  # the line between token 1 and the pruned patch above


@pytest.mark.parametrize("method,config", [("tome", dict(r=6)), ("evit", dict(keep_rate=0.5)), ("random", dict(keep_rate=0.5))])
def test_every_patch_is_accounted_for_on_a_real_model(method, config):
    model = build("dinov2_reg")
    tokenreduce.apply(model, method, **config)
    with torch.no_grad():
        model(images(batch=1))
    rec = tokenreduce.record(model)
    owner = patch_assignment(rec.owner[0], rec.num_prefix, (8, 8))
    assert owner.min() >= (0 if method in ("tome", "evit") else -1)
    assert owner.max() < rec.tokens_per_layer[-1] and (owner < 0).any() == (method == "random")
    assert not ((owner >= 0) & (owner < rec.num_prefix)).any(), "a patch was attributed to a prefix token"
