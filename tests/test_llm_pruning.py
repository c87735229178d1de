"""Pruning inside the LLM during the prefill (fastv, pdrop): per-layer KV lengths, padding, batches,
generate(), every VLM family; oracles from the unpatched model with the pruned tokens masked."""

from __future__ import annotations

import math

import pytest
import torch

import tokenreduce
from conftest import (
    IMAGE_TOKEN,
    VLM_FAMILIES,
    batch,
    pixels,
    prompt,
    reduce_batch_and_singles,
    tiny_llava,
    tiny_vlm,
    vlm_generate,
    vlm_inputs,
    vlm_logits,
)

pytest.importorskip("transformers")

TOKENS = 4  # generated per prompt
METHODS = {
    "fastv": dict(layer=2, keep_ratio=0.25),
    "pdrop": dict(layers=(1, 2, 3), ratios=(0.5, 0.25, 0.125)),
    "dart": dict(layer=2, keep_ratio=0.5, image_pivots=1, text_pivots=1),
}


def generate(model, kw):
    return vlm_generate(model, kw, TOKENS)


def llava_inputs(side: str = "left") -> dict:
    ids, mask = batch([prompt([1, 5]), prompt([1, 5, 6, 9, 4])], side)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_equals_singles_and_remove_restores(family, method):
    rec = reduce_batch_and_singles(family, method, **METHODS[method])
    n = rec.images[0].placeholders
    if method == "dart":  # a pivot, then per pivot floor(n * 0.5 / 2) picks: at most n
        final = min(n, 1 + 2 * (n // 2 // 2))
        kept_per_layer = [n, n, final, final]
    else:
        ratios = [1, 1, 0.25, 0.25] if method == "fastv" else [1, 0.5, 0.25, 0.125]
        kept_per_layer = [max(1, round(n * r)) for r in ratios]
    assert all(im.kept == kept_per_layer[-1] for im in rec.images)
    text = rec.input_lengths[-1] - n
    assert [lengths[-1] for lengths in rec.layer_lengths] == [text + k for k in kept_per_layer]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_right_padding_gives_each_rows_logits(method):
    model = tokenreduce.apply(tiny_llava(), method, **METHODS[method])
    kw = llava_inputs("right")
    both = vlm_logits(model, kw)
    lengths = tokenreduce.record(model).layer_lengths[-1]  # rows keep their real tokens first
    for row in range(2):
        real = int(kw["attention_mask"][row].sum())
        single = dict(input_ids=kw["input_ids"][row : row + 1, :real], pixel_values=kw["pixel_values"][row : row + 1])
        torch.testing.assert_close(both[row, lengths[row] - 1], vlm_logits(model, single)[0, -1], rtol=1e-4, atol=1e-4)


def hide_pruned(base, kw: dict, rec, eager: bool) -> list:
    """Hooks giving every LLM layer of the unpatched ``base`` its own mask: causal, padding hidden
    (the prompt's mask grown by the generated tokens), and from each pruning layer of ``rec`` on the
    image tokens it dropped hidden too. With kept positions, this is what pruning them means."""
    b = kw["input_ids"].shape[0]
    starts = [int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0]) for row in range(b)]
    n = rec.images[0].placeholders
    real_prompt = kw["attention_mask"].bool()

    def dropped(layer: int) -> list[list[int]]:
        steps = [s for s in rec.steps if s.layer <= layer]
        if not steps:
            return [[] for _ in range(b)]
        return [sorted(set(range(n)) - set(k.tolist())) for k in steps[-1].kept]

    def make(index: int):
        columns = dropped(index)

        def hook(module, args, kwargs):
            q = (args[0] if args else kwargs["hidden_states"]).shape[1]
            cache = kwargs.get("cache")
            past = 0 if cache is None else cache.get_seq_length(index)
            length = past + q
            extra = torch.ones(b, max(0, length - real_prompt.shape[1]), dtype=torch.bool)
            real = torch.cat([real_prompt, extra], dim=1)[:, :length]
            mask = torch.ones(q, length, dtype=torch.bool).tril(diagonal=past).repeat(b, 1, 1, 1)
            mask &= real[:, None, None, :]
            for row, cols in enumerate(columns):
                mask[row, :, :, [starts[row] + c for c in cols]] = False
            mask[:, :, torch.arange(q), past + torch.arange(q)] = True  # a padding query sees itself
            kwargs["attention_mask"] = (
                torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) if eager else mask
            )
            return args, kwargs

        return hook

    return [
        layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(base.model.language_model.layers)
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_pruned_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked(method, attention):
    kw = llava_inputs()
    model, base = tiny_llava(), tiny_llava()
    model.set_attn_implementation(attention)
    base.set_attn_implementation(attention)
    tokenreduce.apply(model, method, **METHODS[method], **({"positions": "keep"} if method == "pdrop" else {}))
    rec, _ = assert_equals_unpatched_with_pruned_hidden(model, base, kw, attention == "eager")
    assert len(rec.steps) == (3 if method == "pdrop" else 1)


def assert_equals_unpatched_with_pruned_hidden(model, base, kw: dict, eager: bool):
    """``generate()`` and the last-token logits of the patched ``model`` equal those of the unpatched
    ``base`` whose layers hide, from each pruning layer on, the image tokens ``model`` dropped there
    (:func:`hide_pruned`). Returns the record of the patched prompt and its last-token logits."""
    got, got_logits = generate(model, kw), vlm_logits(model, kw)[:, -1]
    rec = tokenreduce.record(model)
    hooks = hide_pruned(base, kw, rec, eager)
    try:
        want, want_logits = generate(base, kw), vlm_logits(base, kw)[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got, want)
    return rec, got_logits


def unpatched_before_stage(base, kw: dict, rec, stage: int, eager: bool, **outputs):
    """The unpatched ``base``'s outputs (``output_attentions=True`` etc.) with the image tokens that the
    stages of ``rec`` before ``stage`` dropped hidden: what the layer of ``stage`` saw."""
    earlier = type(rec)(**{**vars(rec), "steps": rec.steps[:stage]})
    hooks = hide_pruned(base, kw, earlier, eager=eager)
    try:
        with torch.no_grad():
            return base(**kw, **outputs)
    finally:
        for hook in hooks:
            hook.remove()


def check_stages(model, kw: dict, check, eager: bool = True, **outputs) -> None:
    """Run the patched ``model`` on ``kw``, then for every in-LLM stage ``j`` and prompt row call
    ``check(j, step, out, row, candidates)``: ``out`` is the unpatched model's output (``outputs`` such as
    ``output_attentions=True``; an eager model when ``eager``) with the image tokens earlier stages
    dropped hidden, what stage ``j``'s layer saw; ``candidates`` the row's image tokens that reached it."""
    vlm_logits(model, kw)
    rec = tokenreduce.record(model)
    base = tiny_llava()
    if eager:
        base.set_attn_implementation("eager")
    candidates = [list(range(int((ids == IMAGE_TOKEN).sum()))) for ids in kw["input_ids"]]
    for j, step in enumerate(rec.steps):
        out = unpatched_before_stage(base, kw, rec, j, eager, **outputs)
        for row in range(len(candidates)):
            check(j, step, out, row, candidates[row])
        candidates = [k.tolist() for k in step.kept]


def naive_attention_rank(probs: torch.Tensor, kw: dict, row: int, candidates: list[int], keep: int) -> list[int]:
    """Written from the spec: the last prompt token's attention row (mean over heads) at one layer,
    the ``keep`` highest among an image's ``candidates`` (indices in its span), in order."""
    start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
    last = int(kw["attention_mask"][row].nonzero()[-1])
    row_probs = probs[row].mean(0)[last]
    score = {c: float(row_probs[start + c]) for c in candidates}
    return sorted(sorted(candidates, key=lambda c: -score[c])[:keep])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fastv_picks_what_the_naive_reference_picks(attention):
    kw = llava_inputs()
    model = tiny_llava()
    model.set_attn_implementation(attention)
    tokenreduce.apply(model, "fastv", layer=2, keep_ratio=0.25)
    vlm_logits(model, kw)
    kept = tokenreduce.record(model).steps[0].kept
    base = tiny_llava()
    base.set_attn_implementation("eager")
    with torch.no_grad():
        probs = base(**kw, output_attentions=True).attentions[1]  # layer K-1 = 1
    for row in range(2):
        assert kept[row].tolist() == naive_attention_rank(probs, kw, row, list(range(16)), 4)


def test_pdrop_picks_what_the_naive_reference_picks_at_every_stage():
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "pdrop", **METHODS["pdrop"], positions="keep")

    def check(j, step, out, row, candidates):  # the stage layer's own attention
        want = naive_attention_rank(out.attentions[step.layer], kw, row, candidates, (8, 4, 2)[j])
        assert step.kept[row].tolist() == want, (j, row)

    check_stages(model, kw, check, output_attentions=True)


@pytest.mark.parametrize(
    "method, config, error, match",
    [
        ("fastv", dict(layer=0), ValueError, "layer must be an integer >= 1, got 0"),
        ("fastv", dict(layer=4), ValueError, r"layer must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        ("fastv", dict(keep_ratio=0.0), ValueError, r"keep_ratio must be a number in \(0, 1\]"),
        ("fastv", dict(keep_ratio=1.5), ValueError, r"keep_ratio must be a number in \(0, 1\]"),
        ("pdrop", dict(ratios=(0.25, 0.5)), ValueError, "ratios must be a non-empty, non-increasing sequence"),
        ("pdrop", dict(ratios=(0.5, 0.0)), ValueError, r"ratios\[1\] must be a number in \(0, 1\]"),
        ("pdrop", dict(layers=(2, 1, 3)), ValueError, "layers must be 3 increasing layer indices"),
        ("pdrop", dict(layers=(1, 2, 4)), ValueError, r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        ("pdrop", dict(ratios=(0.5, 0.4, 0.3, 0.2)), ValueError, "an LLM of 4 layers cannot hold 4 pruning stages"),
        ("fastv", dict(positions="shift"), ValueError, "positions must be one of"),
    ],
)
def test_bad_config_raises_with_range(method, config, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


def test_reindexing_is_refused_where_positions_encode_the_grid():
    with pytest.raises(ValueError, match="positions='reindex' cannot apply to Qwen2VLModel"):
        tokenreduce.apply(tiny_vlm("qwen2_vl"), "pdrop", positions="reindex")


def test_a_static_cache_is_refused():
    model = tokenreduce.apply(tiny_llava(), "fastv")
    with pytest.raises(ValueError, match="in-LLM pruning needs a dynamic cache"), torch.no_grad():
        model.generate(**llava_inputs(), max_new_tokens=2, cache_implementation="static")


def test_record_and_kv_cache_follow_the_pruning_layers():
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "pdrop", **METHODS["pdrop"])
    with torch.no_grad():
        out = model(**kw, use_cache=True)
    rec = tokenreduce.record(model)
    assert [s.layer for s in rec.steps] == [1, 2, 3] and [len(s.kept[0]) for s in rec.steps] == [8, 4, 2]
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(rec.steps[0].kept, rec.steps[1].kept))
    lengths = [layer.keys.shape[2] for layer in out.cache.layers]  # padded to the longest row
    assert lengths == [max(row) for row in rec.layer_lengths] and lengths[0] > lengths[1] > lengths[2] > lengths[3]
    assert rec.images[0].kept == 2 and rec.images[0].owner.ge(0).sum() == 2


def test_describe_names_the_layers_and_counts():
    text = tokenreduce.describe(tokenreduce.apply(tiny_llava(), "pdrop", **METHODS["pdrop"]))
    assert "pruned before LLM layers 1, 2, 3 of 4: 16 -> 8 -> 4 -> 2" in text


def naive_dart(keys: torch.Tensor, states: torch.Tensor, start: int, n: int, after: list[int], per_pivot: int, pivots: int):
    """Written from the spec, one image: ``keys [L, D]`` (layer K-1, heads concatenated, rotary
    applied), ``states [L, D]`` (layer K's input through the final norm), text positions ``after``."""
    norm = [float(keys[i].abs().sum()) for i in range(keys.shape[0])]
    image = list(range(start, start + n))
    image_pivots = sorted(image, key=lambda i: -norm[i])[:pivots]
    text_pivots = sorted(after, key=lambda i: -norm[i])[:pivots]
    kept, free = set(image_pivots), [i for i in image if i not in image_pivots]
    for pivot in sorted(image_pivots + text_pivots):
        sim = {i: float(torch.nn.functional.cosine_similarity(states[pivot], states[i], dim=0)) for i in free}
        chosen = sorted(free, key=lambda i: sim[i])[:per_pivot]
        kept |= set(chosen)
        free = [i for i in free if i not in chosen]
    return sorted(i - start for i in kept)


def test_dart_picks_what_the_naive_reference_picks():
    import sys

    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "dart", layer=2, keep_ratio=0.5, image_pivots=2, text_pivots=2)
    vlm_logits(model, kw)
    kept = tokenreduce.record(model).steps[0].kept
    base = tiny_llava()
    text = base.model.language_model
    with torch.no_grad():
        hidden = base(**kw, output_hidden_states=True).hidden_states  # [0] embeddings, [i + 1] layer i's output
        layer = text.layers[1]
        positions = torch.arange(hidden[1].shape[1])[None]
        cos, sin = text.rotary_emb(hidden[1], positions)
        k = layer.self_attn.k_proj(layer.input_layernorm(hidden[1])).unflatten(-1, (2, -1)).transpose(1, 2)
        _, k = sys.modules[type(layer).__module__].apply_rotary_pos_emb(k, k, cos, sin)
        keys = k.transpose(1, 2).flatten(2)  # [B, L, heads * D]
        states = text.norm(hidden[2])
    for row in range(2):
        start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
        after = [i for i in range(start + 16, kw["input_ids"].shape[1]) if kw["attention_mask"][row, i]]
        want = naive_dart(keys[row], states[row], start, 16, after, per_pivot=2, pivots=2)
        assert kept[row].tolist() == want


STACK = [("visionzip", {"dominant": 6, "contextual": 2}), ("fastv", {"layer": 2, "keep_ratio": 0.5})]


def test_stacked_pre_llm_then_in_llm_prunes_among_the_kept_tokens():
    kw = llava_inputs()
    first = tokenreduce.apply(tiny_llava(), STACK[0][0], **STACK[0][1])
    with torch.no_grad():
        first(**kw)
    before = tokenreduce.record(first)
    model = tokenreduce.apply(tiny_llava(), STACK)
    assert "visionzip" in tokenreduce.describe(model) and "pruned before LLM layers 2 of 4: 8 -> 4" in tokenreduce.describe(model)
    got = generate(model, kw)
    rec = tokenreduce.record(model)
    assert [im.kept for im in rec.images] == [4, 4] and rec.steps[0].layer == 2
    assert rec.layer_lengths[0] == before.llm_lengths and rec.layer_lengths[-1] == tuple(n - 4 for n in before.llm_lengths)
    for image, was in zip(rec.images, before.images):  # every kept token is one visionzip kept, covering its patches
        assert set(image.position.tolist()) <= set(was.position.tolist())
        covered = image.owner >= 0
        assert covered.sum() < was.owner.ge(0).sum() and image.owner[covered].max() == 3
    for row in range(2):  # rows alone give the same tokens
        single = dict(input_ids=kw["input_ids"][row : row + 1], attention_mask=kw["attention_mask"][row : row + 1])
        single["pixel_values"] = kw["pixel_values"][row : row + 1]
        assert torch.equal(generate(model, single), got[row : row + 1])
    tokenreduce.remove(model)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize(
    "methods, error, match",
    [
        (["fastv", "visionzip"], TypeError, "the second of two stacked methods must act inside the LLM"),
        ([("tome", {"r": 1}), "fastv"], TypeError, r"must act between the vision side and the LLM \(stage pre_llm\)"),
        (["divprune", "fastv", "pdrop"], ValueError, "a stack holds two methods"),
    ],
)
def test_bad_stacks_are_refused(methods, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.apply(tiny_llava(), methods)
    with pytest.raises(TypeError, match=r"stacked methods take their config each in its own \(name, config\) pair"):
        tokenreduce.apply(tiny_llava(), ["divprune", "fastv"], layer=2)


SPARSE = dict(layers=(0, 1, 2), budgets=(288, 144, 72))  # 8, 4, 2 of 16 tokens


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_sparsevlm_batch_equals_singles_on_every_family(family):
    rec = reduce_batch_and_singles(family, "sparsevlm", **SPARSE)
    assert [s.layer for s in rec.steps] == [1, 2, 3]


def naive_density_peaks(states: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """Written from the spec (TCFormer's DPC-kNN as SparseVLM's ``cluster_and_merge``), loops; ties
    go to the earlier token (the reference breaks them with random noise)."""
    n, c = states.shape
    d = [[float((states[i] - states[j]).norm()) / c**0.5 for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(x**2 for x in sorted(d[i])[:clusters]) / clusters) for i in range(n)]
    top = max(max(row) for row in d)
    denser = [[density[j] > density[i] or (density[j] == density[i] and j < i) for j in range(n)] for i in range(n)]
    parent = [min([d[i][j] for j in range(n) if denser[i][j]] or [top]) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -parent[i] * density[i])[:clusters]
    assign = [centres.index(i) if i in centres else min(range(clusters), key=lambda a: d[i][centres[a]]) for i in range(n)]
    return centres, assign


def test_sparsevlm_picks_and_recycles_what_the_naive_reference_does():
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "sparsevlm", layers=(1,), budgets=(216,))  # 6 of 16 at layer 1's output
    seen = []  # what layer 2 reads once pruned: its input norm's input
    hook = model.model.language_model.layers[2].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    vlm_logits(model, kw)
    hook.remove()
    got = tokenreduce.record(model).steps[0].kept
    base = tiny_llava()
    base.set_attn_implementation("eager")
    with torch.no_grad():
        out = base(**kw, output_attentions=True, output_hidden_states=True)
    embeds, probs, states = out.hidden_states[0], out.attentions[1].mean(1), out.hidden_states[2]
    for row in range(2):
        start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
        text = list(range(start + 16, kw["input_ids"].shape[1]))
        v, t = embeds[row, start : start + 16], embeds[row, text]
        m = torch.stack([torch.softmax(v[i] @ t.T, 0) for i in range(16)]).mean(0)
        raters = [text[j] for j in range(len(text)) if m[j] > m.mean()]
        score = [float(sum(probs[row, r, start + i] for r in raters) / len(raters)) for i in range(16)]
        kept = sorted(sorted(range(16), key=lambda i: -score[i])[:6])
        dropped = [i for i in range(16) if i not in kept]
        chosen = sorted(dropped, key=lambda i: -score[i])[: int(len(dropped) * 0.3) + 1]
        centres, assign = naive_density_peaks(states[row, [start + i for i in chosen]], len(chosen) // 10 + 1)
        assert got[row].tolist() == kept + [chosen[c] for c in centres]
        merged = torch.stack([states[row, start + chosen[j]] for j in range(len(chosen)) if assign[j] == 0]).mean(0)
        where = seen[0].shape[1] - 2 - 1  # left padded: [pad, text, 6 kept, 1 merged, 7, 8]
        torch.testing.assert_close(seen[0][row, where], merged, rtol=1e-4, atol=1e-5)


def test_sparsevlm_needs_text_after_the_image_and_known_budgets():
    with pytest.raises(ValueError, match=r"retain must be one of \[64, 96, 128, 192\]"):
        tokenreduce.apply(tiny_llava(), "sparsevlm", retain=100)
    with pytest.raises(ValueError, match=r"budgets\[0\] must be an integer in \[1, 576\]"):
        tokenreduce.apply(tiny_llava(), "sparsevlm", layers=(0,), budgets=(600,))
    model = tokenreduce.apply(tiny_llava(), "sparsevlm", **SPARSE)
    ids = torch.tensor([[1, 5, *[IMAGE_TOKEN] * 16]])
    with pytest.raises(ValueError, match=r"sparsevlm rates each image by the text after it; image 0 \(row 0\) has none"):
        vlm_logits(model, dict(input_ids=ids, pixel_values=pixels(1)))


def test_a_saved_pruned_vlm_loads_where_the_scoring_kernel_is_not_registered(tmp_path):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tokenreduce.adapters import hf_llm

    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "fastv", layer=2, keep_ratio=0.25)
    torch.save(model, tmp_path / "vlm.pt")  # before running: transformers leaves unpicklable output hooks
    want = generate(model, kw)
    del ALL_ATTENTION_FUNCTIONS._global_mapping[hf_llm.KERNEL]  # as in a fresh process
    loaded = torch.load(tmp_path / "vlm.pt", weights_only=False)
    assert torch.equal(generate(loaded, kw), want)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_pdrop_keeping_everything_equals_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), generate(model, kw)
    tokenreduce.apply(model, "pdrop", layers=(1, 2, 3), ratios=(1.0, 1.0, 1.0))
    torch.testing.assert_close(vlm_logits(model, kw), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, kw), want_gen)
