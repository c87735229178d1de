"""open_clip's VisionTransformer (the image tower of open_clip CLIP and CoCa models): every method runs on
it; ToMe and EViT match a naive forward; dense grids, export, the whole CLIP model, full-size defaults."""

from __future__ import annotations

import pytest
import torch

import naive_families
import tokenreduce
from conftest import images, randomize
from family_checks import FamilyTests, check_defaults_plan, check_method, run
from tokenreduce.patch import original_class

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

TINY = dict(image_size=32, patch_size=4, width=48, layers=4, heads=3, mlp_ratio=2.0, output_dim=16)
VARIANTS = {
    "openclip": {},  # ResidualAttentionBlock (nn.MultiheadAttention), class-token pooling
    "openclip_avg": dict(pool_type="avg", ls_init_value=0.5, final_ln_after_pool=True),  # size-weighted mean
    "openclip_coca": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=3, output_dim=48),  # CoCa's pooler
    "openclip_custom": dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True),  # its own Attention
}
# CoCa-paper poolers (open_clip: "untested, WIP"; they run where output_dim equals the width)
POOLERS = {
    mode: dict(attentional_pool=mode, attn_pooler_queries=4, attn_pooler_heads=3, output_dim=48)
    for mode in ("parallel", "cascade")
}


def build(name: str, seed: int = 0, **overrides) -> VisionTransformer:
    return randomize(VisionTransformer(**{**TINY, **VARIANTS[name], **overrides}), seed).eval()


class TestOpenClip(FamilyTests):
    build = staticmethod(build)
    naive_forward = staticmethod(naive_families.openclip_forward)
    every_method = ("openclip", "openclip_coca")
    tome_matches = tuple((name, prop_attn) for name in sorted(VARIANTS) for prop_attn in (True, False))
    cls_pruning = (("openclip", "evit"), ("openclip", "topk"))
    six_blocks = dict(layers=6)
    hook_points = ("openclip", "openclip_custom")
    save_load = ("openclip", "openclip_coca")
    macs = ("openclip",)
    export = "openclip"
    compile = False  # compiled on EVA (test_family_eva)


@pytest.mark.parametrize("name", ["openclip_avg", "openclip_custom"])
def test_other_blocks_and_pools(name):
    check_method(build(name), "tome")


@pytest.mark.parametrize("mode", sorted(POOLERS))
def test_paper_poolers(mode):
    model = build("openclip", **POOLERS[mode])
    check_method(model, "tome")
    tokenreduce.apply(model, "tome", r=6)
    weighted = [p.attn for p in (model.attn_pool, model.attn_pool_contrastive) if type(p.attn) is not original_class(p.attn)]
    assert len(weighted) == (2 if mode == "parallel" else 1)  # 'cascade' pools the first pooler's outputs


def test_timm_trunk_inside_open_clip_is_found():
    from open_clip.timm_model import TimmModel

    tower = randomize(TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=224, pool="", proj="linear"), 0).eval()
    tokenreduce.apply(tower, "tome", r=3)
    assert "patched submodule 'trunk' of TimmModel" in tokenreduce.describe(tower)
    assert run(tower, images(size=224)).shape == (2, 16) and tokenreduce.record(tower).tokens_per_layer[-1] == 197 - 36


def test_output_tokens_are_the_reduced_patch_tokens():
    model, x = build("openclip", output_tokens=True), images()
    tokenreduce.apply(model, "tome", r=6)
    with torch.no_grad():
        pooled, tokens = model(x)
    rec = tokenreduce.record(model)
    assert pooled.shape == (2, 16) and tokens.shape == (2, rec.tokens_per_layer[-1] - 1, 48)
    full = rec.restore(torch.cat([torch.zeros(2, 1, 48), tokens], dim=1))  # spread back over the 8x8 grid
    assert full.shape == (2, 65, 48)


def test_patch_dropout_is_off_at_eval():
    model, x = build("openclip"), images()
    dropping = build("openclip", patch_dropout=0.5)
    with tokenreduce.applied(dropping, "tome", r=6), tokenreduce.applied(model, "tome", r=6):
        assert torch.equal(run(dropping, x), run(model, x))
        assert tokenreduce.record(dropping).input_tokens == 65
    dropping.train()
    tokenreduce.apply(dropping, "tome", r=6)
    with torch.no_grad():
        dropping(x)
    rec = tokenreduce.record(dropping)  # training: half the patches dropped before the blocks, then merged
    assert rec.input_tokens == 33 and rec.tokens_per_layer == (27, 21, 15, 9)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_forward_intermediates_gives_full_grids(method):
    model, x = build("openclip"), images()
    kw = dict(indices=[1, 3], intermediates_only=True)
    with torch.no_grad():
        want = model.forward_intermediates(x, **kw)["image_intermediates"]
        with tokenreduce.applied(model, method, **({"r": 0} if method == "tome" else {"keep_rate": 1.0})):
            same = model.forward_intermediates(x, **kw)["image_intermediates"]
        tokenreduce.apply(model, method, **({"r": 6} if method == "tome" else {"keep_rate": 0.5, "layers": [0, 2]}))
        grids = model.forward_intermediates(x, **kw)["image_intermediates"]
        tokens = model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)
    for a, b in zip(same, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [g.shape for g in grids] == [(2, 48, 8, 8)] * 2
    assert tokens["image_intermediates"][0].shape[1] == tokenreduce.record(model).tokens_per_layer[3] - 1
    assert all(row.flatten(1).T.unique(dim=0).shape[0] < 64 for row in grids[1])  # merged patches repeat their token


def test_whole_clip_model_patches_its_image_tower():
    vision = dict(image_size=32, patch_size=4, width=48, layers=4, head_width=16, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = randomize(open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text), 0).eval()
    x, text = images(), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = model.encode_image(x)
    tokenreduce.apply(model, "tome", r=6)
    assert "patched submodule 'visual' of CLIP" in tokenreduce.describe(model)
    with torch.no_grad():
        reduced = model.encode_image(x)
        model(x, text)
    assert tokenreduce.record(model).tokens_per_layer == (59, 53, 47, 41)
    assert reduced.shape == before.shape and not torch.allclose(reduced, before)


def test_unsupported_attention_is_refused():
    model = build("openclip_custom", qk_norm=False, scaled_cosine_attn=True)
    with pytest.raises(TypeError, match=r"block 0 attention Attention uses \['scaled cosine attention'\]"):
        tokenreduce.apply(model, "tome", r=2)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14-336", "coca_ViT-B-32"])
def test_every_method_default_plans_on_full_size_towers(name):
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta").visual
    check_defaults_plan(model)
