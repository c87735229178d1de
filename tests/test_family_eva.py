"""timm's Eva (EVA-02, the rotary ViTs, Perception Encoder, DINOv3): every method runs on it; ToMe and EViT
match a naive forward whose rotary embeddings follow the tokens; dense grids, compile/export, full-size
defaults."""

from __future__ import annotations

import pytest
import torch

import naive_families
import tokenreduce
from conftest import images, randomize
from family_checks import FamilyTests, check_defaults_plan, check_method, run
from tokenreduce.core import take_per_token

timm = pytest.importorskip("timm")
from timm.models.eva import Eva  # noqa: E402

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
ROPE = dict(use_rot_pos_emb=True)
VARIANTS = {
    # EVA-02: fused qkv with separate q/v biases, SwiGLU with its norm, interleaved rotary table, mean pooling
    "eva02": dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, ref_feat_shape=(8, 8), **ROPE),
    # rope-vit "mixed": AttentionRope, a learned table per block and head, 2 registers, layer scale
    "eva_mixed": dict(
        attn_type="rope",
        rope_type="mixed",
        qkv_fused=False,
        init_values=0.5,
        num_reg_tokens=2,
        global_pool="token",
        use_abs_pos_emb=False,
        rope_grid_indexing="xy",
        rope_temperature=10.0,
        **ROPE,
    ),  # fmt: skip
    # Perception Encoder (core): AttentionRope, pre-transformer norm, attention-pool head
    "eva_pe": dict(
        global_pool="map",
        attn_type="rope",
        use_pre_transformer_norm=True,
        ref_feat_shape=(8, 8),
        rope_grid_offset=1.0,
        rope_grid_indexing="xy",
        attn_pool_num_heads=3,
        **ROPE,
    ),  # fmt: skip
    # DINOv3: half rotation, 4 registers, layer scale, no absolute position embedding
    "eva_dinov3": dict(
        rope_type="dinov3",
        rope_rotate_half=True,
        rope_temperature=100,
        num_reg_tokens=4,
        use_abs_pos_emb=False,
        init_values=0.5,
        use_fc_norm=False,
        **ROPE,
    ),  # fmt: skip
    # grouped keys/values (one kv head), qk-norm, no class token
    "eva_gqa": dict(attn_type="rope", qkv_fused=False, num_kv_heads=1, qk_norm=True, class_token=False, **ROPE),
    # EVA-02-E's post-norm block
    "eva_postnorm": dict(use_post_norm=True, global_pool="token", **ROPE),
}


def build(name: str, seed: int = 0, **overrides) -> Eva:
    return randomize(Eva(**{**TINY, **VARIANTS[name], **overrides}), seed).eval()


class TestEva(FamilyTests):
    build = staticmethod(build)
    naive_forward = staticmethod(naive_families.eva_forward)
    every_method = ("eva02", "eva_mixed", "eva_pe")
    tome_matches = (("eva02", False), *((name, True) for name in ("eva02", "eva_mixed", "eva_pe", "eva_dinov3", "eva_gqa")))
    cls_pruning = (("eva02", "evit"), ("eva02", "topk"), ("eva_mixed", "evit"), ("eva_mixed", "topk"))
    six_blocks = dict(depth=6)
    hook_points = ("eva02", "eva_mixed")
    save_load = ("eva02", "eva_pe")
    macs = ("eva02",)
    export = "eva_pe"  # rotary tables following the tokens, and the attention-pool head


@pytest.mark.parametrize("name", ["eva_dinov3", "eva_gqa", "eva_postnorm"])
def test_other_variants(name):
    check_method(build(name), "tome", has_cls_token=build(name).cls_token is not None)


def test_rotary_rows_follow_the_tokens():
    table = torch.arange(2 * 6 * 4.0).view(2, 6, 4)  # [H, N0 - P, D], one prefix token
    position = torch.tensor([[0, 3, 1, 6], [0, 2, 2, 5]])  # the original token each current token holds
    rows = take_per_token(table, position, 1)
    assert rows.shape == (2, 2, 3, 4)
    assert torch.equal(rows[1, 0], table[0, [1, 1, 4]]) and torch.equal(rows[0, 1], table[1, [2, 0, 5]])
    assert take_per_token(table[0], position, 1).shape == (2, 1, 3, 4)  # broadcasts over the heads
    batched = torch.randn(2, 1, 6, 4)  # after timm's patch dropout: one table per image
    assert torch.equal(take_per_token(batched, position, 1)[1, 0], batched[1, 0, [1, 1, 4]])


def test_dynamic_img_size_rotates_by_each_inputs_grid():
    model, counts = tokenreduce.apply(build("eva02", dynamic_img_size=True), "tome", r=4), {}
    for size in (32, 48):  # an 8x8 and a 12x12 grid, each with its own rotary table
        assert torch.isfinite(run(model, images(size=size))).all()
        counts[size] = tokenreduce.record(model).tokens_per_layer
    assert counts == {32: (61, 57, 53, 49), 48: (141, 137, 133, 129)}


def test_training_patch_dropout_takes_rows_of_each_images_table():
    model = build("eva02", patch_drop_rate=0.5).train()
    x = images()
    torch.manual_seed(0)
    with torch.no_grad():
        want = model(x)
    with tokenreduce.applied(model, "tome", r=0):
        torch.manual_seed(0)
        torch.testing.assert_close(run(model, x), want, rtol=1e-5, atol=1e-5)
    tokenreduce.apply(model, "tome", r=4)
    torch.manual_seed(0)
    out = run(model, x)
    assert torch.isfinite(out).all() and tokenreduce.record(model).tokens_per_layer == (29, 25, 21, 17)


@pytest.mark.parametrize("name", ["eva02", "eva_mixed"])
def test_forward_intermediates_gives_full_grids(name):
    model, x = build(name), images()
    kw = dict(indices=[1, 3], intermediates_only=True, return_prefix_tokens=True)
    with torch.no_grad():
        want = model.forward_intermediates(x, **kw)
        with tokenreduce.applied(model, "tome", r=0):
            same = model.forward_intermediates(x, **kw)
        tokenreduce.apply(model, "tome", r=6)
        got = model.forward_intermediates(x, **kw)
    for (a, pa), (b, pb) in zip(same, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    prefix = model.num_prefix_tokens
    assert [(g.shape, p.shape) for g, p in got] == [((2, 48, 8, 8), (2, prefix, 48))] * 2
    assert got[1][0].flatten(2).transpose(1, 2).unique(dim=1).shape[1] < 64  # merged patches repeat their token


def test_unknown_attention_is_refused():
    model = build("eva02")
    model.blocks[2].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="block 2 attention Identity lacks"):
        tokenreduce.apply(model, "tome", r=2)
    assert not tokenreduce.is_patched(model)


CANONICAL = [
    ("eva02_base_patch14_224", {}),
    ("eva02_large_patch14_clip_224", {}),
    ("vit_pe_core_large_patch14_336", {}),  # attention-pool head
    ("vit_base_patch16_rope_mixed_224", {}),
    ("vit_base_patch16_dinov3", dict(dynamic_img_size=False)),  # 4 registers, half rotation
]


@pytest.mark.parametrize("name,kwargs", CANONICAL)
def test_every_method_default_plans_on_full_size_models(name, kwargs):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    check_defaults_plan(model)
