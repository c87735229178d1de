"""timm heads and wrappers around reduced tokens: the attention-pool head (``global_pool='map'``, SigLIP's)
attends over the reduced tokens, weighted by size under proportional attention; timm's ``features_only``
wrapper (``FeatureGetterNet``) around a ViT or EVA gives full patch grids."""

from __future__ import annotations

import pytest
import torch

import naive_families
import tokenreduce
from conftest import build, images
from family_checks import METHODS, check_cls_pruning_matches, check_defaults_plan, check_method, check_tome_matches

timm = pytest.importorskip("timm")

MAP = {
    "vit_map": dict(class_token=False, global_pool="map"),  # SigLIP's tower: no class token
    "vit_map_cls": dict(global_pool="map"),  # a class token, left out of the pool (pool_include_prefix=False)
}


def build_map(name: str, **overrides):
    return build("vit", **MAP[name], **overrides)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_an_attention_pool(method):
    check_method(build_map("vit_map"), method, has_cls_token=False)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("name", sorted(MAP))
def test_tome_matches_naive_forward(name, prop_attn):
    check_tome_matches(build_map(name), naive_families.vit_map_forward, prop_attn)


def test_evit_matches_naive_forward():
    check_cls_pruning_matches(build_map("vit_map_cls", depth=6), naive_families.vit_map_forward, "evit")


def test_pool_weights_by_size_only_under_proportional_attention():
    model, x = build_map("vit_map"), images()
    outputs = {}
    for prop_attn in (True, False):
        tokenreduce.apply(model, "tome", r=6, prop_attn=prop_attn)
        with torch.no_grad():
            tokens = model.forward_features(x)
            outputs[prop_attn] = model.attn_pool(tokens)
            plain = model.attn_pool(tokens, attn_mask=torch.zeros(2, 1, 1, tokens.shape[1]))
        if prop_attn:
            assert not torch.allclose(outputs[prop_attn], plain, atol=1e-4)
        else:
            torch.testing.assert_close(outputs[prop_attn], plain)


@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_384"])
def test_every_method_default_plans_on_siglip_towers(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    check_defaults_plan(model)


def features_only(model, indices=(1, 3)):
    from timm.models._features import FeatureGetterNet

    return FeatureGetterNet(model, out_indices=indices, output_fmt="NCHW")


def check_feature_grids(net, grid: tuple[int, int], channels: int, size: int = 32, r: int = 5, indices: int = 2) -> None:
    x = images(size=size)
    with torch.no_grad():
        want = net(x)
        with tokenreduce.applied(net, "tome", r=0):
            same = net(x)
        tokenreduce.apply(net, "tome", r=r)
        got = net(x)
    assert "patched submodule 'model'" in tokenreduce.describe(net)
    for a, b in zip(same, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [g.shape for g in got] == [(2, channels, *grid)] * indices
    assert not torch.allclose(got[-1], want[-1], atol=1e-4)
    for row in got[-1]:  # each image's grid repeats its merged tokens
        assert row.flatten(1).T.unique(dim=0).shape[0] < grid[0] * grid[1]


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg"])
def test_features_only_wrapper_gives_full_grids(model_name):
    net = features_only(build(model_name))
    assert len(net.model.blocks) == 4 and tokenreduce.adapters.locate(net)[0] == "model"
    check_feature_grids(net, (8, 8), 48)


def test_features_only_on_a_registered_model():
    net = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, features_only=True, img_size=56, depth=3, out_indices=(1, 2)
    )
    check_feature_grids(net.eval(), (4, 4), 192, size=56, r=3)
