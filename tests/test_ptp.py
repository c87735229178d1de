"""PTP on tiny random LLaVA-NeXT prompts (and LLaVA-OneVision with a CLIP tower): the naive oracle's
tokens for a batch of images of two sizes, the prompt's text steering the choice, crop budgets following
region saliency, keep-all identity, generate() against the unpatched model fed the reduced prompt,
batch = singles, remove(), refusals."""

from __future__ import annotations

import pytest
import torch
from test_globalcom2 import BUILD, mixed_inputs
from test_text_methods import llm_prompt

import naive_ptp as naive
import tokenreduce
from conftest import IMAGE_TOKEN, reduce_batch_and_singles, tiny_llava, tiny_vlm, vlm_generate, vlm_logits

pytest.importorskip("transformers")


def oracle(model, kw: dict, r: float, text_weight: float) -> list[list[int]]:
    """Per image, the oracle's kept span indices."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        spans = model.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"]).pooler_output
        embeds = model.get_input_embeddings()(kw["input_ids"])
        for row, (px, size, span) in enumerate(zip(kw["pixel_values"], kw["image_sizes"].tolist(), spans)):
            count = image_size_to_num_patches(size, model.config.image_grid_pinpoints, 32)
            attn = tower(pixel_values=px[:count], output_attentions=True).attentions[0]  # layer -2 of 2 is read
            cls = attn[:, :, 0, 1:].mean(1).double().tolist()
            rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 32)
            is_text = kw["attention_mask"][row].bool() & (kw["input_ids"][row] != IMAGE_TOKEN)
            text = embeds[row, is_text].double().tolist()
            kept, _ = naive.ptp_keep(cls, tuple(size), rows, cols, 4, r, text_weight, span.double().tolist(), text)
            out.append(kept)
    tower.set_attn_implementation("sdpa")
    return out


@pytest.mark.parametrize(
    "family, r, text_weight",
    [("llava_next", 0.25, 0.5), ("llava_next", 0.5, 1.0), ("llava_next", 0.5, 0.0), ("llava_onevision_clip", 0.5, 0.5)],
)
def test_the_llm_reads_the_naive_oracles_tokens(family, r, text_weight):
    base = BUILD[family](family)
    kw = mixed_inputs(base)
    want = oracle(base, kw, r, text_weight)
    model = tokenreduce.apply(BUILD[family](family), "ptp", keep_ratio=r, text_weight=text_weight)
    embeds, _ = llm_prompt(model, kw)
    rec = tokenreduce.record(model)
    with torch.no_grad():
        spans = base.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"]).pooler_output
    for row, (kept, image, span) in enumerate(zip(want, rec.images, spans)):
        assert image.placeholders == span.shape[0] and image.position.tolist() == kept
        end = embeds.shape[1] - (2 if row == 0 else 1)  # left padded: [pad, text, image, trailing text]
        torch.testing.assert_close(embeds[row, end - len(kept) : end], span[kept], rtol=1e-4, atol=1e-5)


def test_the_prompt_text_steers_the_choice():
    kw = mixed_inputs(tiny_vlm("llava_next"))
    other = dict(kw, input_ids=kw["input_ids"].clone())
    other["input_ids"][0, :2] = torch.tensor([40, 41])  # the first (longest, unpadded) prompt's text before its image
    chosen = {}
    for weight in (0.0, 1.0):
        model = tokenreduce.apply(tiny_vlm("llava_next"), "ptp", text_weight=weight)
        for name, inputs in (("kw", kw), ("other", other)):
            vlm_logits(model, inputs)
            chosen[weight, name] = tokenreduce.record(model).images[0].position.tolist()
    assert chosen[0.0, "kw"] == chosen[0.0, "other"]  # saliency alone: the text does not matter
    assert chosen[1.0, "kw"] != chosen[1.0, "other"]


def test_salient_regions_keep_more_tokens():
    from tokenreduce.methods.ptp import PTP
    from tokenreduce.methods.visual import AnyResLayout

    method = PTP(keep_ratio=0.3)
    part = torch.tensor([0] * 16 + [1] * 16 + [2] * 16 + [3] * 16 + [4] * 16 + [-1] * 8)
    layout = AnyResLayout(part, torch.zeros_like(part), torch.zeros_like(part), (2, 2), 4, 5)
    thumbnail = torch.full((1, 16), 0.01)
    thumbnail[0, 10] = 0.8  # a salient patch in the region of crop 4 (bottom right)
    budgets = method.crop_budgets(thumbnail, layout)[0].tolist()
    assert sum(budgets) == round(0.3 * 64) and budgets[3] == max(budgets) and budgets[3] > budgets[0]
    assert budgets == naive.shares([16 * s for s in (0.04, 0.04, 0.04, 0.83)], 19, [16] * 4)
    assert method.num_kept_anyres(layout) == round(0.3 * 16) + round(0.3 * 64) + 8


def test_record_gives_each_images_kept_count():
    """Keep-all identity and generate() against the reduced prompt: tests/test_globalcom2.py, for both."""
    model = tokenreduce.apply(tiny_vlm("llava_next"), "ptp")
    vlm_generate(model, mixed_inputs(model))
    assert [im.kept for im in tokenreduce.record(model).images] == [4 + 16 + 8, 4 + 4 + 2]  # a wide image: 2 rows of crop tokens


def test_batch_equals_singles_and_remove_restores():
    rec = reduce_batch_and_singles("llava_next", "ptp")
    assert all(im.placeholders == 88 and im.kept == 4 + 16 + 8 for im in rec.images)  # thumbnail, crops, newlines


def test_refuses_models_and_config_it_cannot_serve():
    for model in (tiny_llava(), tiny_vlm("llava_onevision")):  # no AnyRes; a tower without a class token
        with pytest.raises(TypeError, match="'ptp'.*AnyRes"):
            tokenreduce.apply(model, "ptp")
        assert not tokenreduce.is_patched(model)
    with pytest.raises(ValueError, match="ptp's budget is keep_ratio"):
        tokenreduce.make_method("ptp", keep_tokens=8)
    with pytest.raises(ValueError, match=r"text_weight must be a number in \[0, 1\], got 1.5"):
        tokenreduce.make_method("ptp", text_weight=1.5)
