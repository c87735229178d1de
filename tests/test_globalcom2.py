"""GlobalCom2 on tiny random LLaVA-NeXT prompts (and LLaVA-OneVision with a CLIP tower): the naive
oracle's tokens (budgets from the thumbnail, in-crop scores) for a batch of images of two sizes, budgets
summing to the image's total, keep-all identity, generate() against the unpatched model fed the reduced
prompt, batch = singles, remove()."""

from __future__ import annotations

import pytest
import torch
from test_text_methods import llm_prompt

import naive_globalcom2 as naive
import tokenreduce
from conftest import IMAGE_TOKEN, batch, reduce_batch_and_singles, tiny_vlm, vlm_generate, vlm_logits

pytest.importorskip("transformers")

SIZES = [(64, 64), (20, 64)]  # 2x2 crops of 4x4 patches; a wide image on 1x2 crops, unpadded to 3 rows


def onevision_with_clip(seed: int = 0):
    """The tiny LLaVA-OneVision with conftest's CLIP tower (its own builder has SigLIP, which has no class
    token for GlobalCom2 to read), the class token dropped as LLaVA-NeXT does."""
    import transformers as T

    from conftest import _TEXT, _VISION, randomize

    torch.manual_seed(seed)
    config = T.LlavaOnevisionConfig(
        vision_config=T.CLIPVisionConfig(**_VISION, projection_dim=32),
        text_config=T.Qwen2Config(**_TEXT),
        image_token_id=IMAGE_TOKEN,
        video_token_id=998,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return randomize(T.LlavaOnevisionForConditionalGeneration(config), seed).eval()


BUILD = {"llava_next": tiny_vlm, "llava_onevision_clip": lambda family: onevision_with_clip()}


def mixed_inputs(model) -> dict:
    """Two prompts of different lengths, one image each, of the sizes ``SIZES``."""
    g = torch.Generator().manual_seed(5)
    px = torch.randn(len(SIZES), 5, 3, 32, 32, generator=g)
    sizes = torch.tensor(SIZES)
    with torch.no_grad():
        spans = [f.shape[0] for f in model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output]
    ids, mask = batch([[1, 5, *[IMAGE_TOKEN] * spans[0], 7, 8], [2, *[IMAGE_TOKEN] * spans[1], 7]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes)


def oracle(model, kw: dict, r: float, temperature: float) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Per image: the oracle's kept span indices, crop budgets, and the unpatched packed span."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        spans = model.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"]).pooler_output
        for px, size, span in zip(kw["pixel_values"], kw["image_sizes"].tolist(), spans):
            count = image_size_to_num_patches(size, model.config.image_grid_pinpoints, 32)
            attn = tower(pixel_values=px[:count], output_attentions=True).attentions[0]  # layer -2 of 2 is read
            cls = attn[:, :, 0, 1:].mean(1).double().tolist()
            rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 32)
            kept, budget = naive.globalcom2_keep(cls, tuple(size), rows, cols, 4, r, temperature)
            out.append((kept, budget, span))
    tower.set_attn_implementation("sdpa")
    return out


# The default temperature 10 makes the tiny model's crops keep near-equal shares; 0.01 tells them apart.
@pytest.mark.parametrize(
    "family, r, temperature",
    [("llava_next", 0.25, 10.0), ("llava_next", 0.5, 0.01), ("llava_onevision_clip", 0.5, 0.01)],
)
def test_the_llm_reads_the_naive_oracles_tokens(family, r, temperature):
    base = BUILD[family](family)
    kw = mixed_inputs(base)
    want = oracle(base, kw, r, temperature)
    model = tokenreduce.apply(BUILD[family](family), "globalcom2", keep_ratio=r, temperature=temperature)
    embeds, _ = llm_prompt(model, kw)
    rec = tokenreduce.record(model)
    budgets = []
    for row, ((kept, budget, span), image) in enumerate(zip(want, rec.images)):
        assert image.placeholders == span.shape[0] and image.kept == len(kept)
        assert image.position.tolist() == kept
        end = embeds.shape[1] - (2 if row == 0 else 1)  # left padded: [pad, text, image, trailing text]
        torch.testing.assert_close(embeds[row, end - len(kept) : end], span[kept], rtol=1e-4, atol=1e-5)
        budgets.append(budget)
    assert [len(b) for b in budgets] == [4, 2]
    assert temperature > 1 or all(len(set(b)) > 1 for b in budgets)  # the thumbnail sets different counts


def test_crop_budgets_sum_to_the_images_total_and_stay_within_each_crop():
    from tokenreduce.methods.globalcom2 import GlobalCom2
    from tokenreduce.methods.visual import AnyResLayout

    method = GlobalCom2(keep_ratio=0.3)
    part = torch.tensor([0] * 16 + [1] * 6 + [2] * 2 + [3] * 16 + [4] * 16 + [-1] * 8)
    row, col = torch.zeros_like(part), torch.zeros_like(part)
    layout = AnyResLayout(part, row, col, (2, 2), 4, 5)
    g = torch.Generator().manual_seed(0)
    thumbnail = torch.rand(50, 16, generator=g) * torch.tensor([1.0, 30.0]).repeat_interleave(8)[None]
    budgets = method.crop_budgets(thumbnail, layout)
    assert budgets.sum(1).eq(round(0.3 * 40)).all() and (budgets <= torch.tensor([6, 2, 16, 16])).all()
    assert method.num_kept_anyres(layout) == round(0.3 * 16) + round(0.3 * 40) + 8
    for t, b in zip(thumbnail, budgets):
        weights = [n * min(1.0, 0.3 * (1 + p - 0.25)) for n, p in zip([6, 2, 16, 16], _region_softmax(t))]
        assert b.tolist() == naive.shares(weights, 12, [6, 2, 16, 16])
    full = GlobalCom2(keep_ratio=1.0).crop_budgets(thumbnail, layout)
    assert full.eq(torch.tensor([6, 2, 16, 16])).all()


def _region_softmax(t: torch.Tensor) -> list[float]:
    s = [0.0] * 4
    for i, a in enumerate(t.tolist()):
        y, x = divmod(i, 4)
        s[(y // 2) * 2 + x // 2] += a
    e = [2.718281828459045 ** ((v - max(s)) / 10) for v in s]
    return [v / sum(e) for v in e]


ANYRES_METHODS = ["globalcom2", "ptp"]  # both budget AnyRes crops from the thumbnail; ptp's own tests are in test_ptp.py


@pytest.mark.parametrize("method", ANYRES_METHODS)
def test_keep_all_equals_the_unpatched_model(method):
    model = tiny_vlm("llava_next")
    kw = mixed_inputs(model)
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, method, keep_ratio=1.0)
    assert torch.equal(vlm_logits(model, kw), want)
    assert torch.equal(vlm_generate(model, kw), want_gen)


@pytest.mark.parametrize("method", ANYRES_METHODS)
def test_generate_equals_the_unpatched_model_fed_the_reduced_prompt(method):
    base = tiny_vlm("llava_next")
    kw = mixed_inputs(base)
    model = tokenreduce.apply(tiny_vlm("llava_next"), method)
    got = vlm_generate(model, kw)
    embeds, mask = llm_prompt(model, kw)
    with torch.no_grad():
        want = base.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, do_sample=False)[:, -3:]
    assert torch.equal(got, want)


def test_batch_equals_singles_and_remove_restores():
    rec = reduce_batch_and_singles("llava_next", "globalcom2")
    assert all(im.placeholders == 88 and im.kept == 4 + 16 + 8 for im in rec.images)  # thumbnail, crops, newlines


def test_stacks_with_an_in_llm_method():
    rec = reduce_batch_and_singles("llava_next", ["globalcom2", ("fastv", {"layer": 2, "keep_ratio": 0.5})])
    assert all(im.placeholders == 88 and im.kept == 14 for im in rec.images)  # 28 before the LLM, half at layer 2


def test_refuses_models_and_budgets_it_cannot_serve():
    from conftest import tiny_llava

    for model in (tiny_llava(), tiny_vlm("llava_onevision")):  # no AnyRes; a tower without a class token
        with pytest.raises(TypeError, match="globalcom2.*AnyRes"):
            tokenreduce.apply(model, "globalcom2")
        assert not tokenreduce.is_patched(model)
    with pytest.raises(ValueError, match="keep_tokens"):
        tokenreduce.apply(tiny_vlm("llava_next"), "globalcom2", keep_tokens=8)
    with pytest.raises(ValueError, match="temperature"):
        tokenreduce.apply(tiny_vlm("llava_next"), "globalcom2", temperature=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        tokenreduce.apply(tiny_vlm("llava_next"), "globalcom2", keep_ratio=1.5)


def test_apportion_fills_capped_parts_and_shares_the_rest():
    from tokenreduce.core import apportion

    got = apportion(torch.tensor([[10.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), 6, torch.tensor([2, 5, 5]))
    assert got.tolist() == [[2, 2, 2], [1, 3, 2], [2, 2, 2]]  # capped, then shared; zero weights: by caps, ties low first
    assert got.tolist()[1] == naive.shares([2.0, 5.0, 5.0], 6, [2, 5, 5])
    with pytest.raises(ValueError, match="cannot apportion 13 tokens"):
        apportion(torch.ones(1, 3), 13, torch.tensor([2, 5, 5]))
