"""ZOO-Prune (projector sensitivity + diversity, vision space) and Script (redundancy graph intersected with
a query-conditioned DPP, reads the prompt's text) on tiny random LLaVA-1.5 shapes: naive oracles, keep-all,
padded batches with several images equal singles, generate() against the unpatched model fed the reduced
prompt, remove(), and where each refuses to run."""

from __future__ import annotations

import pytest
import torch
from test_text_methods import IMAGES, PROMPTS, generate, llm_prompt, logits, naive_inputs, padded
from test_vlm import check_remove_is_bit_identical

import naive_zoo_script as naive
import tokenreduce
from conftest import batch, pixels, prompt, reduce_batch_and_singles, tiny_llava, tiny_vlm
from tokenreduce.core import greedy_dpp
from tokenreduce.methods.visual import VisualContext
from tokenreduce.registry import method_classes

pytest.importorskip("transformers")

REDUCING = {"zoo_prune": dict(keep_tokens=5, similarity=0.7), "script": dict(keep_tokens=5)}
METHODS = sorted(REDUCING)


def _positions(model) -> list[list[int]]:
    return [im.position.tolist() for im in tokenreduce.record(model).images]


def vision_inputs(model, px: torch.Tensor) -> list[list[list[float]]]:
    """Per image, the patch features the projector reads (the class token dropped), as lists."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:].double().tolist()


@pytest.mark.parametrize("similarity", [0.7, 1.0])
def test_zoo_prune_keeps_the_naive_rules_tokens(similarity):
    base = tiny_llava()
    projector = base.model.multi_modal_projector

    def project(row: list[float]) -> list[float]:
        with torch.no_grad():
            return projector(torch.tensor([row], dtype=torch.float32)).double()[0].tolist()

    config = dict(eps=0.5, samples=3, bound=similarity, seed=7)
    ids, mask = batch(PROMPTS[:2], "right")
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    want = [naive.zoo_prune_keep(x, project, 6, **config) for x in vision_inputs(base, kw["pixel_values"])]
    model = tokenreduce.apply(tiny_llava(), "zoo_prune", keep_tokens=6, eps=0.5, samples=3, similarity=similarity, seed=7)
    logits(model, **kw)
    assert _positions(model) == want
    if similarity < 1:  # the bound changes the choice: the test sees diversity, not only sensitivity
        unbounded = [
            naive.zoo_prune_keep(x, project, 6, **{**config, "bound": 1.0}) for x in vision_inputs(base, kw["pixel_values"])
        ]
        assert want != unbounded


def test_zoo_prune_noise_depends_on_the_seed():
    kw = padded()
    kept = []
    for seed in (0, 1):
        model = tokenreduce.apply(tiny_llava(), "zoo_prune", keep_tokens=5, seed=seed, eps=0.5, samples=1)
        logits(model, **kw)
        kept.append(_positions(model))
    assert kept[0] != kept[1]


@pytest.mark.parametrize("k", [3, 6, 9, 12])
def test_script_keeps_the_naive_rules_tokens(k):
    model, kw = tiny_llava(), padded("right")
    want = [naive.script_keep(f, t, k, 0.6, 3.0) for f, t in naive_inputs(model, kw)]
    tokenreduce.apply(model, "script", keep_tokens=k, tau=0.6)
    logits(model, **kw)
    assert _positions(model) == want


def test_greedy_dpp_maximises_the_determinant_step_by_step():
    x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = x @ x.transpose(1, 2)
    got = greedy_dpp(kernel, 9).tolist()
    assert got == [naive._dpp_order(k.tolist(), 9) for k in kernel]
    low_rank = x[:, :, :3] @ x[:, :, :3].transpose(1, 2)  # rank 3: the rest follow by diagonal
    order = greedy_dpp(low_rank, 9)[0].tolist()
    rest = sorted(set(range(9)) - set(order[:3]), key=lambda i: (-float(low_rank[0, i, i]), i))
    assert order[:3] == naive._dpp_order(low_rank[0].tolist(), 3) and order[3:] == rest


def test_script_text_changes_the_selection():
    model = tokenreduce.apply(tiny_llava(), "script", keep_tokens=5)
    kept = []
    for before, after in (([1, 5], (7, 8)), ([30, 41], (52, 63))):  # no text token in common
        logits(model, input_ids=torch.tensor([prompt(before, text_after=after)]), pixel_values=pixels(1))
        kept.append(_positions(model))
    assert kept[0] != kept[1]


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_with_several_images_equals_singles(method):
    model = tokenreduce.apply(tiny_llava(), method, **REDUCING[method])
    kw = padded()
    batched, last = generate(model, **kw), logits(model, **kw)[:, -1]
    kept, single_kept, start = _positions(model), [], 0
    for i, p in enumerate(PROMPTS):
        one = dict(input_ids=torch.tensor([p]), pixel_values=kw["pixel_values"][start : start + IMAGES[i]])
        start += IMAGES[i]
        assert torch.equal(generate(model, **one), batched[i : i + 1]), f"prompt {i}"
        torch.testing.assert_close(logits(model, **one)[:, -1], last[i : i + 1], rtol=1e-4, atol=1e-4)
        single_kept += _positions(model)
    assert kept == single_kept and all(len(k) == 5 for k in kept)


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_the_unpatched_model_fed_the_reduced_prompt(method):
    base, kw = tiny_llava(), padded()
    model = tokenreduce.apply(tiny_llava(), method, **REDUCING[method])
    got = generate(model, **kw)
    embeds, mask = llm_prompt(model, kw)
    assert embeds.shape[1] < kw["input_ids"].shape[1]
    assert torch.equal(got, generate(base, inputs_embeds=embeds, attention_mask=mask))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_equals_the_unpatched_model(method, side):
    model, kw = tiny_llava(), padded(side)
    want = logits(model, **kw)
    want_gen = generate(model, **kw) if side == "left" else None
    tokenreduce.apply(model, method, keep_ratio=1.0)
    assert torch.equal(logits(model, **kw), want)
    if want_gen is not None:
        assert torch.equal(generate(model, **kw), want_gen)


@pytest.mark.parametrize("method", METHODS)
def test_remove_is_bit_identical(method):
    check_remove_is_bit_identical(method, REDUCING[method], padded())


def test_zoo_prune_needs_a_token_wise_projector():
    with pytest.raises(TypeError, match="'zoo_prune' runs the VLM's projector on vision features"):
        tokenreduce.apply(tiny_vlm("qwen2_vl"), "zoo_prune")
    (cls,) = method_classes("zoo_prune").values()
    with pytest.raises(ValueError, match="method 'zoo_prune' runs the VLM's projector"):
        cls(keep_tokens=4).select(VisualContext(torch.randn(2, 17, 32), 4, 1, (4, 4)))


def test_script_refuses_a_call_without_text():
    (cls,) = method_classes("script").values()
    with pytest.raises(ValueError, match="method 'script' reads the prompt's text, and this call has none"):
        cls(keep_tokens=4).select(VisualContext(torch.randn(2, 16, 64), 4, 0, (4, 4)))


@pytest.mark.parametrize(
    "method,config,match",
    [
        ("zoo_prune", dict(eps=0.0), "eps must be a number > 0"),
        ("zoo_prune", dict(samples=0), "samples must be an integer"),
        ("zoo_prune", dict(similarity=1.5), "similarity must be a number in \\[-1, 1\\]"),
        ("script", dict(tau=2.0), "tau must be a number in \\[-1, 1\\]"),
        ("script", dict(relevance=-1.0), "relevance must be a number"),
    ],
)
def test_config_is_validated(method, config, match):
    (cls,) = method_classes(method).values()
    with pytest.raises(ValueError, match=match):
        cls(**config)


def test_defaults():
    for name in METHODS:
        (cls,) = method_classes(name).values()
        assert cls().num_kept(576, (24, 24)) == 64


@pytest.mark.parametrize("family,method", [("llava_next", "zoo_prune"), ("qwen2_vl", "script")])
def test_another_family_batches_equal_singles(family, method):
    rec = reduce_batch_and_singles(family, method, keep_tokens=2)
    assert all(im.kept < im.placeholders for im in rec.images)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_script_select_matches_the_naive_rule_on_random_tokens(seed):
    """More tokens than the tiny VLM has, text of different lengths per image (masked rows), and budgets
    where the two parts' boundary tokens compete."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 20, 32, generator=g) + torch.randn(2, 1, 32, generator=g)  # correlated: edges above tau
    text, lengths = torch.randn(2, 5, 32, generator=g), [5, 2]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    (cls,) = method_classes("script").values()
    for k in (4, 9, 13):
        ctx = VisualContext(feats, k, 0, (4, 5), text=text * mask[..., None], text_mask=mask)
        got = cls(keep_tokens=k, tau=0.5).select(ctx).index.sort(dim=1).values.tolist()
        want = [naive.script_keep(f.tolist(), t[:n].tolist(), k, 0.5, 3.0) for f, t, n in zip(feats, text, lengths)]
        assert got == want, f"k={k}"
