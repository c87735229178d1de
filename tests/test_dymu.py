"""DyMU in a VLM (tiny random LLaVA): dynamic merging in the vision tower gives each image its own
token count, and virtual token unmerging runs the LLM's attention over the full prompt."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import (
    _TEXT,
    IMAGE_TOKEN,
    batch,
    build,
    pixels,
    prompt,
    randomize,
    reduce_batch_and_singles,
    tiny_llava,
    tiny_vlm,
    vlm_inputs,
)
from naive_dymu import vtu_logits

pytest.importorskip("transformers")

MERGING = dict(thresholds=[0.5, None])  # the LLaVA reads vision layer 0: 10 to 13 of 16 tokens per test image
KEEP_ALL = dict(thresholds=[1.0, None])  # similarity must be strictly above the threshold: nothing merges


def logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


def generate(model, tokens: int = 4, **kw):
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=tokens, do_sample=False)[:, -tokens:]


def merged_prompt(model, ids: torch.Tensor, px: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The merged prompt a patched model's LLM reads for the one unpadded row ``ids [1, L]`` (from its
    record of the last prompt), and the merged token at each of the ``L`` places, built by hand."""
    images = tokenreduce.record(model).images
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(pixel_values=px).pooler_output))
        embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)[0]
    rows, place, p, image = [], [], 0, 0
    while p < ids.shape[1]:
        if ids[0, p] != IMAGE_TOKEN:
            place.append(len(rows))
            rows.append(embeds[p])
            p += 1
            continue
        record = images[image]
        place += [len(rows) + int(o) for o in record.owner]
        rows += list(embeds[p : p + record.kept])
        p, image = p + record.placeholders, image + 1
    return torch.stack(rows), place


@pytest.mark.parametrize("side", ["left", "right"])
def test_keep_all_unmerges_to_the_unpatched_model_bit_for_bit(side):
    """Nothing merges: every merged token stands for one patch, and VTU over singletons is the model."""
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5]), prompt([1, 5, 6, 9, 4], images=2)], side)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))
    want, want_gen = logits(model, **kw), generate(model, **kw) if side == "left" else None
    tokenreduce.apply(model, "dymu", **KEEP_ALL)
    assert torch.equal(logits(model, **kw), want)
    assert [im.kept for im in tokenreduce.record(model).images] == [16, 16, 16]
    if want_gen is not None:
        assert torch.equal(generate(model, **kw), want_gen)


def llava(kind: str):
    """The tiny LLaVA (CLIP tower, class token dropped; Llama LLM), with a SigLIP tower (no class token),
    or with a Qwen2 LLM (biased projections, another attention class)."""
    if kind != "qwen2":
        return tiny_llava(tower=kind)
    import transformers

    config = tiny_llava().config
    config.text_config = transformers.Qwen2Config(**_TEXT)
    return randomize(transformers.LlavaForConditionalGeneration(config)).eval()


@pytest.mark.parametrize("kind", ["clip", "siglip", "qwen2"])
def test_unmerging_equals_the_naive_loops(kind):
    model = tokenreduce.apply(llava(kind), "dymu", **MERGING)
    ids, px = torch.tensor([prompt([1, 5, 6], images=2)]), pixels(2)
    got = logits(model, input_ids=ids, pixel_values=px)[0]
    embeds, place = merged_prompt(model, ids, px)
    assert got.shape[0] == embeds.shape[0] < ids.shape[1]
    want = vtu_logits(model, embeds, place, list(range(ids.shape[1])))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same merged prompt read with merged positions (no unmerging) gives other logits: the test can fail
    tokenreduce.apply(model, "dymu", unmerge=False, **MERGING)
    assert not torch.allclose(logits(model, input_ids=ids, pixel_values=px)[0], want, atol=1e-3)


def test_sdpa_and_eager_llms_unmerge_alike():
    sdpa, eager = tiny_llava(), tiny_llava()
    eager.set_attn_implementation({"text_config": "eager"})
    ids, mask = batch([prompt([1, 5]), prompt([1, 5, 6, 9, 4], images=2)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))
    got = [logits(tokenreduce.apply(m, "dymu", **MERGING), **kw)[:, -1] for m in (sdpa, eager)]
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)
    assert "virtual token unmerging in all 4 LLM attention layers" in tokenreduce.describe(eager)


def test_batch_of_images_with_different_counts_equals_singles():
    rec = reduce_batch_and_singles("llava", "dymu", **MERGING)
    kept = [im.kept for im in rec.images]
    assert len(set(kept)) > 1 and max(kept) < 16
    assert len(set(rec.llm_lengths)) > 1


def test_generate_attends_to_every_patch_of_the_prompt():
    """The prefill's cache holds a key and value per patch (the full prompt's length), and decode steps
    continue it: generate equals greedy re-reading of prompt + generated tokens without a cache."""
    model = tokenreduce.apply(tiny_llava(), "dymu", **MERGING)
    ids, mask = batch([prompt([1, 5]), prompt([1, 5, 6, 9, 4])])
    px = pixels(2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
    assert out.cache.get_seq_length() == ids.shape[1] and max(tokenreduce.record(model).llm_lengths) < ids.shape[1]
    new = generate(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    ids_all = torch.cat([ids, new[:, :-1]], dim=1)
    mask_all = torch.cat([mask, torch.ones_like(new[:, :-1])], dim=1)
    positions = (mask_all.cumsum(-1) - 1).clamp(min=0)  # as generate counts them
    reread = logits(model, input_ids=ids_all, attention_mask=mask_all, pixel_values=px, position_ids=positions, use_cache=False)
    assert torch.equal(reread[:, -new.shape[1] :].argmax(-1), new)


def test_without_unmerging_generate_equals_the_unpatched_model_fed_the_merged_prompt():
    base, px = tiny_llava(), pixels(1)
    model = tokenreduce.apply(tiny_llava(), "dymu", unmerge=False, **MERGING)
    ids = torch.tensor([prompt([1, 5, 6])])
    got = generate(model, input_ids=ids, pixel_values=px)
    embeds, _ = merged_prompt(model, ids, px)
    assert embeds.shape[0] < ids.shape[1]
    want = generate(base, inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long))
    assert torch.equal(got, want)


def test_remove_restores_the_model_bit_for_bit():
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5]), prompt([2, 3, 4, 6])])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    before, gen_before = logits(model, **kw), generate(model, **kw)
    tokenreduce.apply(model, "dymu", **MERGING)
    tokenreduce.apply(model, "dymu", **MERGING)  # twice: replaces the first
    assert logits(model, **kw).shape[1] < before.shape[1]
    tokenreduce.remove(model)
    assert torch.equal(logits(model, **kw), before) and torch.equal(generate(model, **kw), gen_before)
    assert not any("Unmerging" in type(m).__name__ for m in model.modules())


def test_calibrated_thresholds_file_drives_the_merging(tmp_path):
    from tokenreduce.methods.dtome import calibrate, write_thresholds

    model = tiny_llava()
    calibration = calibrate(model.model.vision_tower, [pixels(8, seed=5)], r=4)
    path = tmp_path / "dymu.json"
    write_thresholds(path, calibration)
    tokenreduce.apply(model, "dymu", thresholds=str(path))
    logits(model, input_ids=torch.tensor([prompt([1], images=2)]), pixel_values=pixels(2, seed=5))
    kept = [im.kept for im in tokenreduce.record(model).images]
    assert all(8 <= k < 16 for k in kept)


@pytest.mark.parametrize(
    "family, config, error, match",
    [
        ("llava", dict(unmerge="yes", **MERGING), TypeError, "unmerge must be True or False"),
        ("llava", dict(thresholds=[2.0, None]), ValueError, r"thresholds\[0\]"),
        ("llava_next", MERGING, TypeError, "AnyRes packing"),
        ("vit", MERGING, ValueError, "acts at stage llm; this model has stages encoder"),
    ],
)
def test_bad_configs_raise(family, config, error, match):
    model = build(family) if family == "vit" else tiny_vlm(family)
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, "dymu", **config)
        logits(model, **vlm_inputs(model, family, [[1]]))
