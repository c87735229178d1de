"""Reduction in a Hugging Face VLM (tiny random LLaVA-1.5 shapes): pre-LLM methods and encoder methods
in its vision tower, with padding, batches, several images per prompt and generate()."""

from __future__ import annotations

import pytest
import torch

import reference
import tokenreduce
from conftest import IMAGE_TOKEN, batch, build, pixels, prompt, tiny_llava

pytest.importorskip("transformers")

PRE_LLM = {
    "random": dict(keep_tokens=5, seed=2),
    "divprune": dict(keep_tokens=5),
    "pool": dict(stride=2),
    "visionzip": dict(dominant=4, contextual=2),
}
ENCODER = {"tome": dict(r=3), "evit": dict(keep_rate=0.5, layers=(0,)), "topk": dict(keep_rate=0.5, layers=(0,))}
REDUCING = {**PRE_LLM, **ENCODER}
KEEP_ALL = {
    "random": dict(keep_ratio=1.0),
    "divprune": dict(keep_ratio=1.0),
    "pool": dict(stride=1),
    "tome": dict(r=0),
    "evit": dict(keep_rate=1.0),
    "none": {},
}
GEN = dict(max_new_tokens=4, do_sample=False)


def inputs(side: str = "left"):
    """Two prompts of different lengths, padded, one image each."""
    ids, mask = batch([prompt([1, 5]), prompt([1, 5, 6, 9, 4])], side)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))


def logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


def generate(model, **kw):
    with torch.no_grad():
        return model.generate(**kw, **GEN)[:, -GEN["max_new_tokens"] :]


def check_remove_is_bit_identical(method: str, config: dict, kw: dict) -> None:
    """On a tiny LLaVA fed ``kw``: ``method`` shortens the prompt, and remove() gives back the unpatched
    logits and generate() bit for bit."""
    model = tiny_llava()
    before, gen_before = logits(model, **kw), generate(model, **kw)
    tokenreduce.apply(model, method, **config)
    assert logits(model, **kw).shape[1] < before.shape[1]
    tokenreduce.remove(model)
    assert torch.equal(logits(model, **kw), before) and torch.equal(generate(model, **kw), gen_before)


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_remove_is_bit_identical(method):
    check_remove_is_bit_identical(method, REDUCING[method], inputs())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_all_equals_the_unpatched_model(method, side):
    model, kw = tiny_llava(), inputs(side)
    want = logits(model, **kw)
    want_gen = generate(model, **kw) if side == "left" else None
    tokenreduce.apply(model, method, **KEEP_ALL[method])
    torch.testing.assert_close(logits(model, **kw), want, rtol=1e-5, atol=1e-5)
    if want_gen is not None:
        assert torch.equal(generate(model, **kw), want_gen)


def pruned_prompt(model, kw, record):
    """The prompt a pruned model's LLM reads, built by hand from the unpatched model: the full
    embeddings with every dropped image token taken out, re-padded on the left."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(kw["input_ids"])
        feats = torch.cat(list(model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output))
        embeds = embeds.masked_scatter((kw["input_ids"] == IMAGE_TOKEN)[..., None], feats)
    rows, images = [], iter(record.images)
    for row in range(embeds.shape[0]):
        keep, positions = [], (kw["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten().tolist()
        spans = {}
        while positions:
            image = next(images)
            start = positions[0]
            spans[start] = [start + int(p) for p in image.position]
            positions = positions[image.placeholders :]
        skip = set()
        for start, kept in spans.items():
            skip |= set(range(start, start + 16)) - set(kept)
        keep = [i for i in range(embeds.shape[1]) if kw["attention_mask"][row, i] and i not in skip]
        rows.append(embeds[row, keep])
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), length, embeds.shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, length - r.shape[0] :], mask[i, length - r.shape[0] :] = r, 1
    return out, mask


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_generate_equals_the_unpatched_model_fed_the_pruned_prompt(method):
    base, kw = tiny_llava(), inputs()
    model = tokenreduce.apply(tiny_llava(), method, **PRE_LLM[method])
    got = generate(model, **kw)
    embeds, mask = pruned_prompt(base, kw, tokenreduce.record(model))
    # Reindexed positions are what generate counts from the pruned prompt's own mask.
    want = generate(base, inputs_embeds=embeds, attention_mask=mask)
    assert torch.equal(got, want)


def test_keep_positions_generate_equals_the_unpatched_model_with_those_positions():
    base, kw = tiny_llava(), inputs()
    model = tokenreduce.apply(tiny_llava(), "random", positions="keep", **PRE_LLM["random"])
    got = generate(model, **kw)
    record = tokenreduce.record(model)
    assert record.positions == "keep"
    embeds, mask = pruned_prompt(base, kw, record)
    full = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # the positions generate gives the full prompt
    keep_rows = []
    for row in range(2):
        drop = set()
        start = (kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0].item()
        drop = set(range(start, start + 16)) - {start + int(p) for p in record.images[row].position}
        keep_rows.append([full[row, i].item() for i in range(full.shape[1]) if kw["attention_mask"][row, i] and i not in drop])
    positions = torch.zeros_like(mask)
    for row, p in enumerate(keep_rows):
        positions[row, -len(p) :] = torch.tensor(p)
    with torch.no_grad():
        prefill = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, step, out = prefill.cache, prefill.logits[:, -1].argmax(-1), []
        grown, next_pos = mask, full[:, -1:] + 1
        for _ in range(GEN["max_new_tokens"]):
            out.append(step)
            grown = torch.cat([grown, torch.ones_like(grown[:, :1])], dim=1)
            o = base(input_ids=step[:, None], attention_mask=grown, position_ids=next_pos, cache=cache, use_cache=True)
            cache, step, next_pos = o.cache, o.logits[:, -1].argmax(-1), next_pos + 1
    assert torch.equal(got, torch.stack(out, dim=1))


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_batch_equals_singles(method):
    prompts = [prompt([1, 5]), prompt([2, 3, 4, 6, 8, 9]), prompt([7], images=2), prompt([4, 4, 4])]
    images_per_prompt = [1, 1, 2, 1]
    px = pixels(5)
    model = tokenreduce.apply(tiny_llava(), method, **REDUCING[method])
    ids, mask = batch(prompts)
    batched = generate(model, input_ids=ids, attention_mask=mask, pixel_values=px)
    first_logits = logits(model, input_ids=ids, attention_mask=mask, pixel_values=px)[:, -1]
    start = 0
    for i, p in enumerate(prompts):
        one = px[start : start + images_per_prompt[i]]
        start += images_per_prompt[i]
        kw = dict(input_ids=torch.tensor([p]), pixel_values=one)
        assert torch.equal(generate(model, **kw), batched[i : i + 1]), f"prompt {i}"
        torch.testing.assert_close(logits(model, **kw)[:, -1], first_logits[i : i + 1], rtol=1e-4, atol=1e-4)


def test_several_images_per_prompt_are_reduced_each():
    model = tokenreduce.apply(tiny_llava(), "divprune", keep_tokens=3)
    ids, mask = batch([prompt([1], images=3), prompt([1, 2], images=1)])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(4))
    rec = tokenreduce.record(model)
    assert [im.kept for im in rec.images] == [3, 3, 3, 3]
    assert rec.input_lengths == (1 + 3 * 16 + 2 + 2, 2 + 16 + 2) and rec.llm_lengths == (1 + 9 + 2 + 2, 2 + 3 + 2)
    assert out.logits.shape[1] == max(rec.llm_lengths)


def test_divprune_picks_the_naive_references_tokens():
    model, kw = tiny_llava(), inputs()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output
    tokenreduce.apply(model, "divprune", keep_tokens=6)
    logits(model, **kw)
    for image, f in zip(tokenreduce.record(model).images, feats):
        assert image.position.tolist() == reference.divprune_select(f, 6)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_visionzip_gives_the_llm_the_naive_references_tokens(tower):
    base, kw = tiny_llava(tower=tower), inputs()
    dominant, contextual = 5, 3
    eager = tiny_llava(tower=tower)
    eager.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        vis = eager.model.vision_tower(kw["pixel_values"], output_hidden_states=True, output_attentions=True)
        layer = eager.model.vision_tower.encoder.layers[0]
        keys = layer.self_attn.k_proj(layer.layer_norm1(vis.hidden_states[0])).unflatten(-1, (2, -1)).transpose(1, 2)
        want = [
            base.model.multi_modal_projector(reference.visionzip_tokens(h, p, k, dominant, contextual, cls=tower == "clip"))
            for h, p, k in zip(vis.hidden_states[1], vis.attentions[0], keys)
        ]
    model = tokenreduce.apply(base, "visionzip", dominant=dominant, contextual=contextual)
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    logits(model, **kw)
    hook.remove()
    embeds = seen[0]
    for row, expected in enumerate(want):
        start = embeds.shape[1] - 2 - (dominant + contextual)  # left padded: [pad, text, image, 7, 8]
        torch.testing.assert_close(embeds[row, start : start + dominant + contextual], expected, rtol=1e-4, atol=1e-5)


def test_sdpa_and_eager_llms_select_and_answer_alike():
    kw = inputs()
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_llava()
        model.set_attn_implementation(attn)
        tokenreduce.apply(model, "visionzip", dominant=4, contextual=2)
        outs.append((logits(model, **kw), tokenreduce.record(model)))
        assert f"({attn})" in tokenreduce.describe(model)
    for row, length in enumerate(outs[0][1].llm_lengths):  # left padded: the real tokens are the last ones
        torch.testing.assert_close(outs[0][0][row, -length:], outs[1][0][row, -length:], rtol=1e-4, atol=1e-4)
    assert [im.position.tolist() for im in outs[0][1].images] == [im.position.tolist() for im in outs[1][1].images]


def test_record_says_what_each_image_kept():
    model = tokenreduce.apply(tiny_llava(), "pool", stride=2)
    logits(model, **inputs())
    rec = tokenreduce.record(model)
    image = rec.images[0]
    assert (image.placeholders, image.kept, image.grid) == (16, 4, (4, 4))
    assert image.owner.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert image.position.tolist() == [0, 2, 8, 10]
    assert rec.positions == "reindex" and rec.encoder is None
    tokenreduce.apply(model, "tome", r=3)
    logits(model, **inputs())
    rec = tokenreduce.record(model)
    assert rec.encoder.tokens_per_layer == (14, 11) and [im.kept for im in rec.images] == [13, 13]
    assert sorted(set(rec.images[0].owner.tolist())) == list(range(13))


def test_describe_names_the_stage_and_budget():
    model = tokenreduce.apply(tiny_llava(), "divprune", keep_ratio=0.25)
    text = tokenreduce.describe(model)
    assert "patched submodule 'model' of LlavaForConditionalGeneration" in text
    assert "visual tokens per image into the LLM: 16 -> 4" in text and "LLM LlamaModel (sdpa)" in text


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("divprune", dict(keep_ratio=0.0), ValueError, r"keep_ratio must be a number in \(0, 1\], got 0.0"),
        ("divprune", dict(keep_ratio=1.5), ValueError, r"keep_ratio must be a number in \(0, 1\], got 1.5"),
        ("random", dict(keep_tokens=0), ValueError, r"keep_tokens must be an integer >= 1, got 0"),
        ("random", dict(keep_tokens=17), ValueError, r"keep_tokens must be in \[1, 16\] for images of 16 tokens, got 17"),
        ("divprune", dict(keep_ratio=0.5, keep_tokens=3), ValueError, r"pass keep_ratio or keep_tokens, not both"),
        ("visionzip", dict(dominant=4, keep_ratio=0.5), ValueError, r"pass dominant/contextual or keep_ratio/keep_tokens"),
        ("visionzip", dict(dominant=12, contextual=8), ValueError, r"dominant \+ contextual must be at most the 16 tokens"),
        ("pool", dict(stride=2, keep_tokens=4), ValueError, r"pass stride or keep_ratio/keep_tokens, not both"),
        ("divprune", dict(positions="original"), ValueError, r"positions must be one of \('auto', 'keep', 'reindex'\)"),
        ("random", dict(stage="llm"), ValueError, r"stage must be one of \['encoder', 'pre_llm'\] for method 'random'"),
    ],
)
def test_bad_vlm_config_raises_with_range(method, config, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


def test_a_method_for_a_stage_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match=r"method 'divprune' acts at stage pre_llm; this model has stages encoder"):
        tokenreduce.apply(build("vit"), "divprune")


def test_images_without_image_tokens_and_embeds_only_are_refused():
    model = tokenreduce.apply(tiny_llava(), "divprune")
    with pytest.raises(ValueError, match="images were given but the prompt \\(input_ids\\) has no image tokens"):
        logits(model, input_ids=torch.tensor([[1, 2, 3]]), pixel_values=pixels(1))
    with pytest.raises(ValueError, match="needs input_ids"):
        logits(model, inputs_embeds=torch.randn(1, 20, 64), pixel_values=pixels(1))


def test_random_picks_its_stage_by_model_and_config():
    vlm = tokenreduce.apply(tiny_llava(), "random", keep_ratio=0.5)
    assert "random(keep_ratio=0.5" in tokenreduce.describe(vlm) and "16 -> 8" in tokenreduce.describe(vlm)
    tokenreduce.apply(vlm, "random", stage="encoder", keep_rate=0.5, layers=(0,))
    logits(vlm, **inputs())
    assert tokenreduce.record(vlm).encoder is not None
    vit = tokenreduce.apply(build("vit"), "random", keep_rate=0.5)
    assert "random(keep_rate=0.5" in tokenreduce.describe(vit)


def test_text_only_prompts_pass_through():
    model = tiny_llava()
    ids = torch.tensor([[1, 2, 3, 4]])
    want = logits(model, input_ids=ids)
    tokenreduce.apply(model, "divprune")
    assert torch.equal(logits(model, input_ids=ids), want)


class ForceFirst:
    """A logits processor that makes the first generated token ``token``."""

    def __init__(self, token: int, prompt_length: int):
        self.token, self.prompt_length = token, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, -torch.inf)
            scores[:, self.token] = 0
        return scores


@pytest.mark.parametrize("method,config", [("divprune", dict(keep_tokens=5)), ("fastv", dict(layer=1, keep_ratio=0.5))])
def test_a_generated_image_token_is_a_plain_token(method, config):
    """A decode step that reads a generated image-placeholder id has no image to route (it used to
    raise); with every token kept, generate equals the unpatched model's."""
    from transformers import LogitsProcessorList

    model, kw = tiny_llava(), inputs()
    force = LogitsProcessorList([ForceFirst(IMAGE_TOKEN, kw["input_ids"].shape[1])])
    want = generate(model, **kw, logits_processor=force)
    tokenreduce.apply(model, method, **config)
    assert (generate(model, **kw, logits_processor=force)[:, 0] == IMAGE_TOKEN).all()
    tokenreduce.apply(model, method, **{**config, **({"keep_ratio": 1.0} if method == "fastv" else {"keep_tokens": 16})})
    assert torch.equal(generate(model, **kw, logits_processor=force), want)


def test_patched_vlm_deep_copies_and_saves(tmp_path):
    import copy

    model, kw = tokenreduce.apply(tiny_llava(), "visionzip", dominant=4, contextual=2), inputs()
    # saved before running: transformers itself leaves unpicklable output hooks on a model that ran
    torch.save(model, tmp_path / "vlm.pt")
    want = generate(model, **kw)
    assert torch.equal(generate(copy.deepcopy(model), **kw), want)
    assert torch.equal(generate(torch.load(tmp_path / "vlm.pt", weights_only=False), **kw), want)
