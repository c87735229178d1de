"""Every supported VLM family (tiny offline configs): pre-LLM reduction keeps each family's prompt
consistent (masks, 1-D or M-RoPE positions, Qwen3-VL deepstack inputs, Gemma3's 4-D masks)."""

from __future__ import annotations

import pytest
import torch

import reference
import tokenreduce
from conftest import VLM_FAMILIES, batch, reduce_batch_and_singles, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits

pytest.importorskip("transformers")

TEXTS = [[1, 5], [1, 5, 6, 9, 4], [2, 3, 4]]


def llm_input(model, kw) -> torch.Tensor:
    """The embeddings the LLM's first layer reads on a forward of ``kw``."""
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    vlm_logits(model, kw)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("method", ["random", "fastv"])  # before the LLM, inside it
def test_keep_all_equals_the_unpatched_model(family, method):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, TEXTS[:2])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, method, keep_ratio=1.0)
    torch.testing.assert_close(vlm_logits(model, kw), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(vlm_generate(model, kw), want_gen)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_reduced_batch_equals_singles_and_remove_restores(family):
    rec = reduce_batch_and_singles(family, "divprune", keep_ratio=0.5)
    assert all(im.kept == max(1, round(im.placeholders / 2)) for im in rec.images)
    assert all(a - b == im.placeholders - im.kept for a, b, im in zip(rec.input_lengths, rec.llm_lengths, rec.images))


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "internvl", "gemma3"])
def test_encoder_side_methods_say_where_they_cannot_run(family):
    model = tiny_vlm(family)
    methods = [("tome", dict(r=1))] + ([] if family.startswith("qwen") else [("visionzip", dict(keep_tokens=2))])
    for method, config in methods:
        with pytest.raises(TypeError, match=r"cannot run in .*Model: its (vision tower|projector)"):
            tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_keeps_grid_positions_and_refuses_reindexing(family):
    model = tiny_vlm(family)
    with pytest.raises(ValueError, match="positions='reindex' cannot apply to .*: its position ids encode the image grid"):
        tokenreduce.apply(model, "random", positions="reindex")
    tokenreduce.apply(model, "pool", stride=2)  # Qwen's grid comes from image_grid_thw: 2x2 merged tokens
    vlm_logits(model, vlm_inputs(model, family, TEXTS[:1]))
    rec = tokenreduce.record(model)
    assert rec.positions == "keep" and rec.images[0].grid == (2, 2) and rec.images[0].kept == 1


def test_deepstack_inputs_follow_the_kept_tokens():
    from tokenreduce.adapters.hf_vlm import _deepstack, _shorten
    from tokenreduce.core.sequence import SpanKeep, compact

    embeds = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2).clone()
    visual = torch.tensor([[False, False, True, True, True, False]])
    level = torch.tensor([[10.0, 10.0], [11.0, 11.0], [12.0, 12.0]])
    kwargs = dict(inputs_embeds=embeds, visual_pos_masks=visual, deepstack_visual_embeds=[level], position_ids=None)
    deepstack = _deepstack(kwargs, embeds)
    # the image keeps its second token, written to the front of its span (as a selection does)
    embeds[0, 2], deepstack[0][0, 2] = embeds[0, 3], deepstack[0][0, 3]
    compaction = compact(torch.ones(1, 6, dtype=torch.long), [SpanKeep(0, 2, 3, 1, torch.tensor([1]))], reindex=False)
    _shorten(compaction, kwargs, embeds, deepstack)
    assert kwargs["inputs_embeds"][0, :, 0].tolist() == [0.0, 1.0, 3.0, 5.0]
    assert kwargs["visual_pos_masks"].tolist() == [[False, False, True, False]]
    assert kwargs["deepstack_visual_embeds"][0].tolist() == [[11.0, 11.0]]
    assert kwargs["position_ids"].tolist() == [[0, 1, 3, 5]]


ANYRES = ["llava_next", "llava_onevision"]


def anyres_reference(family: str, kw: dict, dominant: int, contextual: int) -> list[torch.Tensor]:
    """Per row, the projected tokens VisionZip's reference gives the LLM for the row's image: VisionZip
    on each crop, then the base image's tokens, the crops' dominant patches put back in the image's
    row-major order, the crops' class tokens, their contextual tokens (no newline tokens)."""
    model = tiny_vlm(family)
    model.model.vision_tower.set_attn_implementation("eager")
    layer_index = 0 if family == "llava_next" else 1  # vision_feature_layer -2 of 2 layers / -1
    cls, side, cols = family == "llava_next", 4, 2  # 64x64 images: 2x2 crops of 4x4 patches, and the base
    out = []
    with torch.no_grad():
        crops = kw["pixel_values"].flatten(0, 1)
        vis = model.model.vision_tower(crops, output_hidden_states=True, output_attentions=True)
        layer = model.model.vision_tower.encoder.layers[layer_index]
        hidden_in = layer.layer_norm1(vis.hidden_states[layer_index])
        keys = layer.self_attn.k_proj(hidden_in).unflatten(-1, (2, -1)).transpose(1, 2)
        per_crop = []
        for h, p, k in zip(vis.hidden_states[layer_index + 1], vis.attentions[layer_index], keys):
            tokens, dom = reference.visionzip_tokens(h, p, k, dominant, contextual, cls, with_dominant=True)
            per_crop.append((model.model.multi_modal_projector(tokens), dom))
        for row in range(kw["pixel_values"].shape[0]):
            image = per_crop[row * 5 : row * 5 + 5]
            placed, classes, summaries = {}, [], []
            for c, (tokens, dom) in enumerate(image[1:]):
                gi, gj = divmod(c, cols)
                for j, d in enumerate(dom):
                    if cls and d == 0:
                        classes.append(tokens[j])
                        continue
                    r, q = divmod(d - cls, side)
                    placed[(gi * side + r) * cols * side + gj * side + q] = tokens[j]
                summaries += list(tokens[len(dom) :])
            out.append(torch.cat([image[0][0], torch.stack([placed[i] for i in sorted(placed)] + classes + summaries)]))
    return out


@pytest.mark.parametrize("family", ANYRES)
def test_visionzip_per_anyres_crop_gives_the_llm_the_references_tokens(family):
    dominant, contextual = 4, 2
    kw = vlm_inputs(tiny_vlm(family), family, TEXTS[:2])
    want = anyres_reference(family, kw, dominant, contextual)
    model = tokenreduce.apply(tiny_vlm(family), "visionzip", dominant=dominant, contextual=contextual)
    seen = [llm_input(model, kw)]
    rec = tokenreduce.record(model)
    assert [im.kept for im in rec.images] == [5 * (dominant + contextual)] * 2
    for row, expected in enumerate(want):
        start = seen[0].shape[1] - 2 - expected.shape[0]  # left padded: [pad, text, image, 7, 8]
        torch.testing.assert_close(seen[0][row, start : start + expected.shape[0]], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ANYRES)
@pytest.mark.parametrize("method, config", [("visionzip", dict(keep_ratio=0.5)), ("tome", dict(r=2))])
def test_anyres_crops_reduced_before_the_projector_batch_equals_singles(family, method, config):
    rec = reduce_batch_and_singles(family, method, **config)
    for image in rec.images:  # every packed placeholder but the newline tokens maps to a kept token
        covered = image.owner[image.owner >= 0]
        assert image.kept < image.placeholders and covered.max() < image.kept
        assert (image.owner >= 0).sum() == image.placeholders - 8  # 8 newline tokens


def test_anyres_budget_beyond_the_span_is_refused():
    model = tiny_vlm("llava_next")
    wide = dict(pixel_values=torch.randn(1, 5, 3, 32, 32), image_sizes=torch.tensor([[20, 64]]))  # 2 crops, unpadded
    with torch.no_grad():
        span = model.model.get_image_features(**wide).pooler_output[0].shape[0]
    ids = torch.tensor([[1, 5, *[999] * span, 7]])
    tokenreduce.apply(model, "visionzip", keep_tokens=16)
    with pytest.raises(ValueError, match=rf"keeps 16 tokens for each of an image's 3 crops \(48 in all\), more than the {span}"):
        vlm_logits(model, dict(input_ids=ids, **wide))


QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def qwen_reference(family: str, kw: dict, dominant: int, contextual: int) -> list[torch.Tensor]:
    """Per row, VisionZip's tokens for Qwen from the unpatched tower: a token is a merged 2x2 group
    of patches (row-major groups; Qwen2.5's window order undone), scored by the attention its patches
    receive in the last vision block, merged on its patches' concatenated states, then projected by
    the merger."""
    import sys

    model = tiny_vlm(family)
    visual = model.model.visual
    seen = {}
    visual.blocks[-1].attn.register_forward_pre_hook(lambda m, a, k: seen.update(attn=(a[0], k)), with_kwargs=True)
    visual.merger.register_forward_pre_hook(lambda m, a: seen.update(merger=a[0]))
    with torch.no_grad():
        model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
        attn, module = visual.blocks[-1].attn, sys.modules[type(visual).__module__]
        x_in, attn_kw = seen["attn"]
        q, k, _ = attn.qkv(x_in).reshape(x_in.shape[0], 3, attn.num_heads, -1).unbind(1)
        q, k = module.apply_rotary_pos_emb_vision(q, k, *attn_kw["position_embeddings"])
        states = seen["merger"]
        if family == "qwen2_5_vl":
            window, _ = module.get_vision_window_index(
                kw["image_grid_thw"], spatial_merge_size=2, window_size=visual.window_size, patch_size=visual.patch_size
            )
            back = torch.argsort(window)
            q, k, states = (t.view(-1, 4, *t.shape[1:])[back].flatten(0, 1) for t in (q, k, states))
        out, p = [], QWEN_PATCHES
        for image in range(kw["image_grid_thw"].shape[0]):
            rows = slice(p * image, p * image + p)
            qi, ki = q[rows].transpose(0, 1), k[rows].transpose(0, 1)  # [H, p, d]
            probs = ((qi @ ki.transpose(-1, -2)) * attn.scaling).softmax(-1)  # [H, p, p]
            token_probs = probs.view(probs.shape[0], p, p // 4, 4).sum(-1)  # attention received by each group
            token_keys = ki.view(ki.shape[0], p // 4, 4, -1).mean(2)
            units = states[rows].reshape(p // 4, -1)
            tokens = reference.visionzip_tokens(units, token_probs, token_keys, dominant, contextual, cls=False)
            out.append(type(visual.merger).forward(visual.merger, tokens.reshape(-1, states.shape[-1])))
    return out


QWEN_PATCHES = 64  # 8x8 patches, 16 tokens: Qwen2.5's windows (2x2 tokens) reorder the tower's sequence


def qwen_inputs(family: str, texts: list[list[int]]) -> dict:
    side = 16 if family == "qwen3_vl" else 14
    g = torch.Generator().manual_seed(5)
    image = [996] + [999] * (QWEN_PATCHES // 4) + [997]
    ids, mask = batch([t + image + [7, 8] for t in texts])
    return dict(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=(ids == 999).long(),
        pixel_values=torch.randn(len(texts) * QWEN_PATCHES, 3 * 2 * side * side, generator=g),
        image_grid_thw=torch.tensor([[1, 8, 8]] * len(texts)),
    )


@pytest.mark.parametrize("family", QWEN)
def test_visionzip_on_qwen_gives_the_llm_the_references_tokens(family):
    dominant, contextual = 5, 3
    kw = qwen_inputs(family, TEXTS[:2])
    want = qwen_reference(family, kw, dominant, contextual)
    model = tokenreduce.apply(tiny_vlm(family), "visionzip", dominant=dominant, contextual=contextual)
    seen = [llm_input(model, kw)]
    for row, expected in enumerate(want):
        start = seen[0].shape[1] - 3 - expected.shape[0]  # left padded: [pad, text, 996, image, 997, 7, 8]
        torch.testing.assert_close(seen[0][row, start : start + expected.shape[0]], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", QWEN)
def test_visionzip_on_qwen_batch_equals_singles(family):
    rec = reduce_batch_and_singles(family, "visionzip", dominant=2, contextual=1)
    assert all(im.kept == 3 and im.grid == (2, 2) for im in rec.images) and rec.positions == "keep"


def test_visionzip_on_qwen_leaves_videos_alone():
    model = tiny_vlm("qwen2_vl")
    ids = torch.tensor([[1, 5, 996, *[998] * 8, 997, 7, 8]])  # 2x4x4 patches: 2 frames of 2x2 merged tokens
    kw = dict(
        input_ids=ids,
        mm_token_type_ids=(ids == 998).long() * 2,
        pixel_values_videos=torch.randn(32, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1)),
        video_grid_thw=torch.tensor([[2, 4, 4]]),
    )
    want = vlm_logits(model, kw)
    tokenreduce.apply(model, "visionzip", dominant=2, contextual=1)
    assert torch.equal(vlm_logits(model, kw), want)
