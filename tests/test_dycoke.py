"""DyCoke: temporal token merging before the LLM and decode-time selection of the cached video tokens."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import VIDEO_TOKEN, tiny_llava, tiny_vlm, vlm_generate, vlm_logits, vlm_video, vlm_video_inputs, vlm_video_tokens
from naive_dycoke import DecodeSelector, ttm_kept
from tokenreduce.methods.dycoke import TemporalTokenMerging

FAMILIES = ["qwen2_vl", "llava_onevision"]
TEXTS = [[1, 5], [2, 3, 4, 6]]
THRESHOLD = 0.5  # below the default 0.9: the tiny models' attention is stable on some decode steps, not all


def llm_input(model, kw: dict) -> torch.Tensor:
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    vlm_logits(model, kw)
    hook.remove()
    return seen[0][0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("frames", [5, 8])
def test_temporal_merging_keeps_the_naive_tokens(family, frames):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS[:1], frames=frames)
    with torch.no_grad():
        features = model.model.get_video_features(**vlm_video(family, 1, frames)).pooler_output[0]
    newline = 0 if family.startswith("qwen") else 1
    want = ttm_kept(features[: features.shape[0] - newline].tolist(), frames, 0.5) + ([features.shape[0] - 1] if newline else [])
    method = TemporalTokenMerging(merge_ratio=0.5)
    tokenreduce.apply(model, method)
    embeds = llm_input(model, kw)
    start = int((kw["input_ids"][0] == VIDEO_TOKEN).nonzero()[0])
    assert torch.equal(embeds[start : start + len(want)], features[want])
    rec = tokenreduce.record(model).videos[0]
    assert (
        rec.position.tolist() == want and rec.kept == len(want) == method.num_kept_video(model_layout(family, frames)) + newline
    )


def model_layout(family: str, frames: int):
    from tokenreduce.methods.visual import VideoLayout

    return VideoLayout(frames, (4, 4) if family.startswith("qwen") else (2, 2))


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_5_vl"])
def test_keep_all_is_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS, frames=8)
    logits, tokens = vlm_logits(model, kw), vlm_generate(model, kw, 5)
    tokenreduce.apply(model, "dycoke", merge_ratio=0.0, prune_ratio=0.0)
    assert torch.equal(vlm_logits(model, kw), logits)
    assert torch.equal(vlm_generate(model, kw, 5), tokens)
    assert len(tokenreduce.record(model).decode_steps) == 4
    tokenreduce.apply(model, "dycoke")
    assert not torch.equal(vlm_generate(model, kw, 5), tokens)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), logits)


def slow_generate(family: str, kw: dict, layer: int, prune_ratio: float, threshold: float, steps: int):
    """The unpatched model with eager attention generating ``steps`` tokens greedily, its layers from
    ``layer`` on masked, on each decode step, to the video tokens the naive selector picks from layer
    ``layer - 1``'s attention weights (plus every other entry). One prompt, one video."""
    model = tiny_vlm(family)
    model.set_attn_implementation({"text_config": "eager"})
    layers = model.model.language_model.layers
    span = (kw["input_ids"][0] == VIDEO_TOKEN).nonzero().flatten()
    selector, chosen, masks = DecodeSelector(prune_ratio, threshold), [], []

    def score(module, args, kwargs, out):
        weights = out[1]  # [1, H, q, kv]
        if weights.shape[2] != 1:
            return
        attention = weights[0, :, -1].mean(0)
        kept = selector.step(attention[span].tolist())
        chosen.append(kept)
        mask = torch.zeros(1, 1, 1, weights.shape[-1])
        mask[..., span] = float("-inf")
        mask[..., span[kept]] = 0.0
        masks.append(mask)

    def restrict(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            return args, {**kwargs, "attention_mask": masks[-1]}
        return args, kwargs

    hooks = [layers[layer - 1].self_attn.register_forward_hook(score, with_kwargs=True)]
    hooks += [layers[i].register_forward_pre_hook(restrict, with_kwargs=True) for i in range(layer, len(layers))]
    out = generate_logits(model, kw, steps)
    for hook in hooks:
        hook.remove()
    return out, chosen, selector.reselected


def generate_logits(model, kw: dict, steps: int) -> torch.Tensor:
    """The logits of each of ``steps`` greedy steps: ``[steps, B, vocab]``."""
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits)


@pytest.mark.parametrize("family,layer", [("qwen2_vl", 2), ("llava_onevision", 3)])
def test_decode_selection_equals_masking_the_naive_choice_in_an_eager_model(family, layer):
    kw = vlm_video_inputs(family, TEXTS[:1], frames=8)
    want, chosen, reselected = slow_generate(family, kw, layer, 0.5, THRESHOLD, 8)
    model = tokenreduce.apply(tiny_vlm(family), "dycoke", merge_ratio=0.0, layer=layer, prune_ratio=0.5, threshold=THRESHOLD)
    torch.testing.assert_close(generate_logits(model, kw, 8), want, rtol=1e-4, atol=1e-4)
    steps = tokenreduce.record(model).decode_steps
    assert [s[0].tolist() for s in steps] == chosen
    assert 1 < reselected < len(chosen), reselected  # both paths: chosen again, and kept while attention is stable
    assert len(chosen[0]) == int(vlm_video_tokens(family, 8) * 0.5)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_5_vl"])
def test_a_batch_equals_each_prompt_alone(family):
    model = tokenreduce.apply(tiny_vlm(family), "dycoke", prune_ratio=0.5)
    kw = vlm_video_inputs(family, TEXTS, frames=8)
    batched = vlm_generate(model, kw, 6)
    rec = tokenreduce.record(model)
    steps = [[s[row].tolist() for s in rec.decode_steps] for row in range(2)]
    kept = 128 - 5 * 12 if family.startswith("qwen") else 32 - 5 * 3 + 1  # 5 of 8 frames keep int(0.3 T)
    assert [v.kept for v in rec.videos] == [kept, kept]
    for row in range(2):
        single = vlm_video_inputs(family, TEXTS[row : row + 1], frames=8, seed=7 + row)
        assert torch.equal(vlm_generate(model, single, 6), batched[row : row + 1]), f"row {row}"
        assert [s[0].tolist() for s in tokenreduce.record(model).decode_steps] == steps[row]


def test_config_is_checked_and_families_without_videos_are_refused():
    with pytest.raises(ValueError, match=r"merge_ratio must be a number in \[0, 1\)"):
        tokenreduce.apply(tiny_vlm("qwen2_vl"), "dycoke", merge_ratio=1.0)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        tokenreduce.apply(tiny_vlm("qwen2_vl"), "dycoke", layer=4)
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        tokenreduce.apply(tiny_llava(), "dycoke")


def test_eager_attention_reads_the_same_selection():
    kw = vlm_video_inputs("llava_onevision", TEXTS, frames=8)
    sdpa = tokenreduce.apply(tiny_vlm("llava_onevision"), "dycoke", prune_ratio=0.5, threshold=THRESHOLD)
    want = generate_logits(sdpa, kw, 6)
    steps = [[k.tolist() for k in s] for s in tokenreduce.record(sdpa).decode_steps]
    eager = tiny_vlm("llava_onevision")
    eager.set_attn_implementation({"text_config": "eager"})
    tokenreduce.apply(eager, "dycoke", prune_ratio=0.5, threshold=THRESHOLD)
    torch.testing.assert_close(generate_logits(eager, kw, 6), want, rtol=1e-4, atol=1e-4)
    assert [[k.tolist() for k in s] for s in tokenreduce.record(eager).decode_steps] == steps
