"""Pre-LLM methods that read the prompt's text (tiny random LLaVA-1.5 shapes, one Qwen2-VL check): the
text each image sees, padding, several images per prompt, generate(), keep-all, remove(), and naive
oracles of the methods' choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_vlm import GEN, check_remove_is_bit_identical, generate, logits

import naive_text_methods as naive
import tokenreduce
from conftest import IMAGE_TOKEN, batch, pixels, prompt, reduce_batch_and_singles, tiny_llava
from tokenreduce.core import Selection, keep
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import method_classes
from tokenreduce.stages import Stage

pytest.importorskip("transformers")

REDUCING = {"simignore": dict(keep_tokens=5), "recoverable": dict(keep_tokens=5)}
KEEP_ALL = {"simignore": dict(keep_ratio=1.0), "recoverable": dict(keep_ratio=1.0)}
PROMPTS = [prompt([1, 5]), prompt([2, 3, 4, 6, 8, 9]), prompt([7], images=2), prompt([4, 4, 4])]
IMAGES = [1, 1, 2, 1]


def padded(side: str = "left") -> dict:
    ids, mask = batch(PROMPTS, side)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(sum(IMAGES)))


def naive_inputs(model, kw) -> list[tuple[list[list[float]], list[list[float]]]]:
    """Per image, in prompt order: (its projected features, its own prompt's text embeddings), as lists."""
    with torch.no_grad():
        feats = list(model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output)
        table = model.get_input_embeddings().weight
    out = []
    for ids, mask in zip(kw["input_ids"].tolist(), kw["attention_mask"].tolist()):
        text = [table[t].double().tolist() for t, m in zip(ids, mask) if m and t != IMAGE_TOKEN]
        for _ in range(sum(1 for t, m in zip(ids, mask) if m and t == IMAGE_TOKEN) // 16):
            out.append((feats.pop(0).double().tolist(), text))
    return out


@dataclass
class TextProbe(VisualMethod):
    """Keeps each image's first tokens and records the contexts it was given."""

    name = "text_probe"
    paper = "none"
    needs_text = True
    seen: ClassVar[list[VisualContext]] = []

    def select(self, ctx: VisualContext) -> Selection:
        TextProbe.seen.append(ctx)
        return keep(torch.arange(ctx.keep).expand(ctx.features.shape[0], -1), ctx.features.shape[1])


def test_each_image_gets_its_own_prompts_text_without_placeholders_or_padding():
    model, kw = tiny_llava(), padded()
    TextProbe.seen.clear()
    tokenreduce.apply(model, TextProbe(keep_tokens=3))
    logits(model, **kw)
    (ctx,) = TextProbe.seen  # the five images have one size: one call
    table = model.get_input_embeddings().weight.detach()
    rows = [p for p, n in zip(PROMPTS, IMAGES) for _ in range(n)]
    assert ctx.text.shape[:2] == ctx.text_mask.shape == (5, max(sum(t != IMAGE_TOKEN for t in p) for p in PROMPTS))
    for text, mask, p in zip(ctx.text, ctx.text_mask, rows):
        ids = [t for t in p if t != IMAGE_TOKEN]
        assert mask.tolist() == [True] * len(ids) + [False] * (mask.shape[0] - len(ids))
        assert torch.equal(text[: len(ids)], table[ids]) and not text[len(ids) :].any()


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_a_prompt_of_image_tokens_alone_keeps_the_same_tokens_in_a_batch(method):
    model = tokenreduce.apply(tiny_llava(), method, **REDUCING[method])
    alone = prompt([], text_after=())
    logits(model, input_ids=torch.tensor([alone]), pixel_values=pixels(1))
    want = tokenreduce.record(model).images[0].position.tolist()
    ids, mask = batch([alone, prompt([1, 5])])
    logits(model, input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pixels(1), pixels(1, seed=4)]))
    assert tokenreduce.record(model).images[0].position.tolist() == want


def test_text_methods_are_registered_pre_llm_and_ask_for_text():
    for name in REDUCING:
        (cls,) = [c for c in method_classes(name).values()]
        assert cls.stage == Stage.PRE_LLM and issubclass(cls, VisualMethod) and cls.needs_text


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_a_call_without_text_is_refused(method):
    (cls,) = method_classes(method).values()
    ctx = VisualContext(torch.randn(2, 16, 64), 4, 0, (4, 4))
    with pytest.raises(ValueError, match=rf"method '{method}' reads the prompt's text, and this call has none"):
        cls(**REDUCING[method]).select(ctx)


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_different_text_keeps_different_tokens_of_the_same_image(method):
    model = tokenreduce.apply(tiny_llava(), method, **REDUCING[method])
    kept = []
    for before, after in (([1, 5], (7, 8)), ([30, 41], (52, 63))):  # no text token in common
        logits(model, input_ids=torch.tensor([prompt(before, text_after=after)]), pixel_values=pixels(1))
        kept.append(tokenreduce.record(model).images[0].position.tolist())
    assert kept[0] != kept[1]


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_remove_is_bit_identical(method):
    check_remove_is_bit_identical(method, REDUCING[method], padded())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_all_equals_the_unpatched_model(method, side):
    model, kw = tiny_llava(), padded(side)
    want = logits(model, **kw)
    want_gen = generate(model, **kw) if side == "left" else None
    tokenreduce.apply(model, method, **KEEP_ALL[method])
    assert torch.equal(logits(model, **kw), want)
    if want_gen is not None:
        assert torch.equal(generate(model, **kw), want_gen)


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_padded_batch_with_several_images_equals_singles(method):
    model = tokenreduce.apply(tiny_llava(), method, **REDUCING[method])
    kw = padded()
    batched, last = generate(model, **kw), logits(model, **kw)[:, -1]
    kept = [im.position.tolist() for im in tokenreduce.record(model).images]
    start, single_kept = 0, []
    for i, p in enumerate(PROMPTS):
        one = dict(input_ids=torch.tensor([p]), pixel_values=kw["pixel_values"][start : start + IMAGES[i]])
        start += IMAGES[i]
        assert torch.equal(generate(model, **one), batched[i : i + 1]), f"prompt {i}"
        torch.testing.assert_close(logits(model, **one)[:, -1], last[i : i + 1], rtol=1e-4, atol=1e-4)
        single_kept += [im.position.tolist() for im in tokenreduce.record(model).images]
    assert kept == single_kept


def test_simignore_keeps_the_naive_walks_tokens():
    model, kw = tiny_llava(), padded("right")
    want = [naive.simignore_keep(f, t, 6) for f, t in naive_inputs(model, kw)]
    tokenreduce.apply(model, "simignore", keep_tokens=6)
    logits(model, **kw)
    assert [im.position.tolist() for im in tokenreduce.record(model).images] == want


def test_simignore_default_is_the_references_k2():
    (cls,) = method_classes("simignore").values()
    assert cls().num_kept(576, (24, 24)) == 452 and cls().positions == "keep"


def test_simignore_generate_equals_the_reference_mask():
    """The reference keeps every image token in the prompt and sets the ignored ones' attention mask to
    0, positions unchanged: the unpatched model run that way, greedily, gives the same tokens."""
    base, kw = tiny_llava(), padded()
    model = tokenreduce.apply(tiny_llava(), "simignore", keep_tokens=5)
    got, got_logits = generate(model, **kw), logits(model, **kw)[:, -1]
    record = tokenreduce.record(model)
    assert record.positions == "keep"
    mask, images = kw["attention_mask"].clone(), iter(record.images)
    for row in range(mask.shape[0]):
        where = (kw["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten().tolist()
        for start in where[::16]:
            kept = {start + p for p in next(images).position.tolist()}
            for i in range(start, start + 16):
                mask[row, i] = int(i in kept)
    positions = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = base(**{**kw, "attention_mask": mask}, position_ids=positions, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], got_logits, rtol=1e-4, atol=1e-4)
        cache, step, steps, next_pos = out.cache, out.logits[:, -1].argmax(-1), [], positions[:, -1:] + 1
        for _ in range(GEN["max_new_tokens"]):
            steps.append(step)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            o = base(input_ids=step[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True)
            cache, step, next_pos = o.cache, o.logits[:, -1].argmax(-1), next_pos + 1
    assert torch.equal(got, torch.stack(steps, dim=1))


def llm_prompt(model, kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings the patched model's LLM reads for the prompt ``kw`` (at its first layer), and
    their 2-D mask, padded on the side ``kw``'s mask is."""
    seen = []
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        logits(model, **kw)
    finally:
        handle.remove()
    embeds, lengths = seen[0], tokenreduce.record(model).llm_lengths
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long)
    left = bool(kw["attention_mask"][:, 0].eq(0).any())
    for row, n in enumerate(lengths):
        mask[row, slice(embeds.shape[1] - n, None) if left else slice(0, n)] = 1
    return embeds, mask


def cls_rows(model, px) -> list[list[float]]:
    """Per image, the class token's attention (mean over heads) to each patch at the layer the VLM reads,
    from the tower's own eager attention weights."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = tower(pixel_values=px, output_attentions=True).attentions
    layer = len(attentions) + model.config.vision_feature_layer
    return attentions[layer][:, :, 0, 1:].mean(1).double().tolist()


def test_recoverable_keeps_and_merges_as_the_naive_rule():
    base, model = tiny_llava(), tokenreduce.apply(tiny_llava(), "recoverable", keep_tokens=6, recover=0.5)
    ids, mask = batch([prompt([1, 5]), prompt([2, 3, 4, 6, 8, 9])], "right")
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    cls = cls_rows(base, kw["pixel_values"])
    embeds, _ = llm_prompt(model, kw)
    for row, ((feats, text), before) in enumerate(zip(naive_inputs(base, kw), (2, 6))):
        groups = naive.recoverable_keep(cls[row], feats, text, 6, 0.5)
        assert tokenreduce.record(model).images[row].position.tolist() == list(groups)
        want = torch.tensor([naive.mean([feats[i] for i in g]) for g in groups.values()], dtype=torch.float32)
        torch.testing.assert_close(embeds[row, before : before + 6], want, rtol=1e-5, atol=1e-5)
    assert any(len(g) > 1 for g in groups.values())


def test_recoverable_generate_equals_the_unpatched_model_fed_the_reduced_prompt():
    base, kw = tiny_llava(), padded()
    model = tokenreduce.apply(tiny_llava(), "recoverable", keep_tokens=5)
    got = generate(model, **kw)
    embeds, mask = llm_prompt(model, kw)
    # Reindexed positions are what generate counts from the reduced prompt's own mask.
    assert torch.equal(got, generate(base, inputs_embeds=embeds, attention_mask=mask))


def test_recoverable_needs_a_class_token_and_one_span_per_image():
    from conftest import tiny_vlm

    for model in (tiny_llava(tower="siglip"), tiny_vlm("qwen2_vl"), tiny_vlm("llava_next")):
        with pytest.raises(TypeError, match="'recoverable'"):
            tokenreduce.apply(model, "recoverable")


def test_simignore_on_qwen2_vl_batch_equals_singles():
    rec = reduce_batch_and_singles("qwen2_vl", "simignore", keep_tokens=2)
    assert all(im.kept == 2 for im in rec.images) and rec.positions == "keep"


def test_text_methods_refuse_bad_configs():
    with pytest.raises(ValueError, match=r"recover must be a number in \[0, 1\], got 1.5"):
        tokenreduce.apply(tiny_llava(), "recoverable", recover=1.5)
    with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\], got 0.0"):
        tokenreduce.apply(tiny_llava(), "simignore", keep_ratio=0.0)
    with pytest.raises(ValueError, match=r"keep_tokens must be in \[1, 16\]"):
        tokenreduce.apply(tiny_llava(), "simignore", keep_tokens=17)
