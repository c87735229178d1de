"""CATP on multi-image (in-context) prompts: both scores against naive loops, the paired text steering
stage 1, batches equal to their rows, keep-all identity, generate() of the in-LLM part against the
unpatched model with the pruned tokens masked, remove(), config errors."""

from __future__ import annotations

import pytest
import torch

import naive_catp
import tokenreduce
from conftest import IMAGE_TOKEN, batch, pixels, reduce_batch_and_singles, tiny_llava, vlm_generate, vlm_logits
from tokenreduce.methods.catp import CATP, CATPAttention, CATPSelect

pytest.importorskip("transformers")

N = 16  # visual tokens per image of the tiny LLaVA
# In-context prompts: an instruction, then per image its paired text (a demo's caption; the query's
# question). Row 2's last image ends the prompt: it has no paired text.
PROMPTS = [
    ([1, 5], [[20, 21, 22], [23, 24], [30, 31, 7, 8]]),
    ([1, 5, 6, 9, 4], [[25, 26], [32, 7, 8]]),
    ([2], [[27, 28, 29], [33, 34], []]),
]


def icl(prefix: list[int], texts: list[list[int]]) -> list[int]:
    ids = list(prefix)
    for text in texts:
        ids += [IMAGE_TOKEN] * N + list(text)
    return ids


def inputs(prompts=PROMPTS, side: str = "left", seed: int = 3) -> dict:
    """The prompts padded on ``side``; images drawn in prompt order from ``seed``, so a row's images
    are its own wherever it sits (``pixels`` of all images, sliced)."""
    ids, mask = batch([icl(p, t) for p, t in prompts], side)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(sum(len(t) for _, t in prompts), seed))


def starts(kw: dict) -> list[tuple[int, int]]:
    """``(row, start)`` of every image, rows in order."""
    out = []
    for row, ids in enumerate(kw["input_ids"].tolist()):
        out += [(row, p) for p, t in enumerate(ids) if t == IMAGE_TOKEN and (p == 0 or ids[p - 1] != IMAGE_TOKEN)]
    return out


def naive_paired(kw: dict) -> list[list[int]]:
    out = []
    for ids, real in zip(kw["input_ids"].tolist(), kw["attention_mask"].bool().tolist()):
        out += naive_catp.paired_text(ids, real, IMAGE_TOKEN)
    return out


def selected(model, kw: dict) -> list[list[int]]:
    vlm_logits(model, kw)
    return [image.position.tolist() for image in tokenreduce.record(model).images]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_stage_one_keeps_the_naive_loops_tokens(alpha):
    model, kw = tiny_llava(), inputs()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output
        embeds = model.get_input_embeddings()(kw["input_ids"])
    want = [
        naive_catp.select(f.tolist(), [embeds[row, p].tolist() for p in paired], 6, alpha)
        for f, (row, _), paired in zip(feats, starts(kw), naive_paired(kw))
    ]
    assert selected(tokenreduce.apply(model, CATPSelect(keep_tokens=6, alpha=alpha)), kw) == want


def test_the_paired_text_steers_its_own_image_only():
    model = tokenreduce.apply(tiny_llava(), CATPSelect(keep_tokens=6, alpha=0.9))
    first = selected(model, inputs([([1, 5], [[20, 21, 22], [23, 24]])]))
    other = selected(model, inputs([([1, 5], [[40, 41, 42, 43], [23, 24]])]))
    assert first[0] != other[0] and first[1] == other[1]
    assert selected(model, inputs([([1, 6], [[20, 21, 22], [23, 24]])])) == first  # text before an image is no one's


def naive_masks(kw: dict, layers: int, hidden: dict[int, list[list[int]]], eager: bool) -> list:
    """Pre-hooks giving every LLM layer of an unpatched model its own mask: causal, padding hidden (the
    prompt's mask grown by generated tokens) and, from each layer of ``hidden`` on, those absolute
    columns of each row hidden too. With kept positions, this is what pruning them means."""
    b, real_prompt = kw["input_ids"].shape[0], kw["attention_mask"].bool()

    def make(index: int):
        later = [layer for layer in hidden if layer <= index]
        columns = hidden[max(later)] if later else [[] for _ in range(b)]

        def hook(module, args, kwargs):
            q = (args[0] if args else kwargs["hidden_states"]).shape[1]
            cache = kwargs.get("cache")
            past = 0 if cache is None else cache.get_seq_length(index)
            length = past + q
            extra = torch.ones(b, max(0, length - real_prompt.shape[1]), dtype=torch.bool)
            real = torch.cat([real_prompt, extra], dim=1)[:, :length]
            mask = torch.ones(q, length, dtype=torch.bool).tril(diagonal=past).repeat(b, 1, 1, 1) & real[:, None, None, :]
            for row, cols in enumerate(columns):
                mask[row, :, :, cols] = False
            mask[:, :, torch.arange(q), past + torch.arange(q)] = True  # a padding query sees itself
            additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            kwargs["attention_mask"] = additive if eager else mask
            return args, kwargs

        return hook

    return [make(i) for i in range(layers)]


def dropped_columns(kw: dict, rec) -> dict[int, list[list[int]]]:
    """Per pruning layer, each row's absolute columns of the image tokens dropped so far (the LLM
    read every image token: no pre-LLM stage ran)."""
    out = {}
    for step in rec.steps:
        cols = [[] for _ in range(kw["input_ids"].shape[0])]
        for (row, start), kept in zip(starts(kw), step.kept):
            cols[row] += [start + i for i in range(N) if i not in kept.tolist()]
        out[step.layer] = cols
    return out


def hooked(base, kw: dict, hidden: dict, eager: bool) -> list:
    layers = base.model.language_model.layers
    hooks = naive_masks(kw, len(layers), hidden, eager)
    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer, hook in zip(layers, hooks)]


def test_stage_two_keeps_the_naive_loops_tokens_at_every_layer():
    kw = inputs()
    model = tokenreduce.apply(tiny_llava(), CATPAttention(layers=(1, 3), ratios=(0.5, 0.25)))
    vlm_logits(model, kw)
    rec = tokenreduce.record(model)
    base = tiny_llava()
    base.set_attn_implementation("eager")
    raters = naive_paired(kw)
    columns = starts(kw)
    candidates = [list(range(N))] * len(columns)
    for j, (step, keep) in enumerate(zip(rec.steps, (8, 4))):
        hooks = hooked(base, kw, dropped_columns(kw, type(rec)(**{**vars(rec), "steps": rec.steps[:j]})), eager=True)
        with torch.no_grad():
            probs = base(**kw, output_attentions=True).attentions[step.layer - 1].mean(1)  # the layer before
        for hook in hooks:
            hook.remove()
        for i, (row, start) in enumerate(columns):
            who = raters[i] or [int(kw["attention_mask"][row].nonzero()[-1])]  # no paired text: the last token
            want = naive_catp.attention_rank(probs[row].tolist(), who, [start + c for c in range(N)], candidates[i], keep)
            assert step.kept[i].tolist() == want, (j, i)
        candidates = [k.tolist() for k in step.kept]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked(attention):
    kw = inputs(PROMPTS[:2])  # prompts ending in text: a dropped last image token would change what predicts
    model, base = tiny_llava(), tiny_llava()
    model.set_attn_implementation(attention)
    base.set_attn_implementation(attention)
    tokenreduce.apply(model, "catp", keep_ratio=1.0, layers=(1, 2), ratios=(0.5, 0.25))  # all reach the LLM
    got, got_logits = vlm_generate(model, kw, 4), vlm_logits(model, kw)[:, -1]
    hooks = hooked(base, kw, dropped_columns(kw, tokenreduce.record(model)), attention == "eager")
    want, want_logits = vlm_generate(base, kw, 4), vlm_logits(base, kw)[:, -1]
    for hook in hooks:
        hook.remove()
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_batch_of_in_context_prompts_equals_its_rows_and_remove_restores(side):
    kw = inputs(side=side)
    model = tiny_llava()
    before = vlm_logits(model, kw)
    tokenreduce.apply(model, "catp", layers=(1, 2))
    got = vlm_generate(model, kw) if side == "left" else None  # generate appends after the last column
    logits = vlm_logits(model, {**kw, "position_ids": (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)})
    rec = tokenreduce.record(model)
    assert all(im.kept == 4 for im in rec.images)  # 16 -> 8 before the LLM -> 5 -> 4
    first = 0
    for row, prompt in enumerate(PROMPTS):
        count = len(prompt[1])
        single = dict(input_ids=torch.tensor([icl(*prompt)]), pixel_values=kw["pixel_values"][first : first + count])
        first += count
        last = logits[row, -1] if side == "left" else logits[row, rec.layer_lengths[-1][row] - 1]
        torch.testing.assert_close(vlm_logits(model, single)[0, -1], last, rtol=1e-4, atol=1e-4)
        if got is not None:
            assert torch.equal(vlm_generate(model, single), got[row : row + 1]), row
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), before)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_batch_equals_singles_on_other_families(family):
    rec = reduce_batch_and_singles(family, "catp", layers=(1, 2))
    n = rec.images[0].placeholders
    assert all(im.kept == max(1, round(round(n / 2) * 4 / 9)) for im in rec.images)


def test_keeping_everything_equals_the_unpatched_model():
    kw = inputs()
    model = tiny_llava()
    before = vlm_logits(model, kw)
    tokenreduce.apply(model, "catp", keep_ratio=1.0, layers=(1, 2), ratios=(1.0, 1.0))
    assert torch.equal(vlm_logits(model, kw), before)


def test_default_budget_removes_the_papers_share():
    catp = CATP()
    assert catp.before.num_kept(576, (24, 24)) == 288
    assert [catp.inside.kept(288, s) for s in (0, 1)] == [192, 128]  # 128 / 576: 77.8% removed
    assert catp.inside.prune_layers(32) == (2, 4) and catp.inside.prune_layers(4) == (1, 2)
    model = tokenreduce.apply(tiny_llava(), "catp")
    assert "into the LLM: 16 -> 8" in tokenreduce.describe(model)
    assert "pruned before LLM layers 1, 2 of 4: 8 -> 5 -> 4" in tokenreduce.describe(model)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]"),
        (dict(keep_ratio=0.0), r"keep_ratio must be a number in \(0, 1\]"),
        (dict(ratios=(0.25, 0.5)), "ratios must be a non-empty, non-increasing sequence"),
        (dict(layers=(2, 1)), "layers must be 2 increasing layer indices"),
        (dict(layers=(1, 4)), r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(ratios=(0.5, 0.4, 0.3)), "the default layers hold 2 stages"),
        (dict(positions="shift"), "positions must be one of"),
    ],
)
def test_bad_config_raises_with_range(config, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, "catp", **config)
    assert not tokenreduce.is_patched(model)
