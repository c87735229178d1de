"""The contract every VLM method (stage pre_llm or llm, stacks of the two, and encoder methods in the vision
tower) honours on a tiny LLaVA: half precision runs and keeps what float32 keeps, a padded batch equals its
rows alone (also on a tiny LLaVA-OneVision), and remove() restores the model bit for bit. Methods are read
from the registry, so a new one is swept."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import BATCH_TEXTS, _counted, batch, pixels, prompt, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits
from test_contract import REDUCING, traces
from tokenreduce.registry import method_classes
from tokenreduce.stages import Stage

pytest.importorskip("transformers")

# Configs for the methods whose defaults do not fit the tiny LLaVA (16 visual tokens on a 4x4 grid, a
# 4-layer LLM) or that have a required argument. Every other VLM method runs with its defaults.
CONFIGS: dict[str, dict] = {
    "dymu": dict(thresholds=0.5),
    "gsearch": dict(schedule=[1.0, 1.0, 0.5, 0.25]),
    "sparsevlm": dict(layers=(0, 1, 2), budgets=(288, 144, 72)),  # 8, 4, 2 of 16 tokens
    "visiondrop": dict(dominant=10, contextual=2, stages=((6, 2), (4, 1), (2, 1))),
    "visionzip": dict(dominant=4, contextual=2),
    "vscan": dict(tokens=8, llm_tokens=4, window=2),
}
# Encoder methods run in the tower of a tiny LLaVA that reads its last block (17 tokens into 2 blocks, both
# reducing), with the reducing configs of tests/test_contract.py, except where those do not fit.
ENCODER_CONFIGS: dict[str, dict] = {
    "tome": dict(r=3),
    "tofu": dict(r=3),
    "diffrate": dict(prune=[17, 12], merge=[17, 9]),  # DiffRate never reduces the first block
    "expedite": dict(clusters=9, recon_k=4),
    "kmedoids": dict(keep_rate=0.6, layers=(1,)),
}
# Methods that read an AnyRes layout (a base image and crops) run on the tiny LLaVA-NeXT instead.
FAMILY: dict[str, str] = {"globalcom2": "llava_next"}
# Two methods in one model: before the LLM, then inside it.
STACKS: dict[str, list] = {
    "visionzip+fastv": [("visionzip", dict(dominant=6, contextual=2)), ("fastv", dict(layer=2, keep_ratio=0.5))],
    "divprune+pdrop": [("divprune", dict(keep_tokens=8)), ("pdrop", dict(layers=(1, 2), ratios=(0.5, 0.25)))],
}
# float16 must keep exactly float32's tokens. bfloat16 keeps 8 bits of mantissa: the tiny LLaVA's hidden states
# drift 2-3.5% (relative norm) from float32's, so a decision whose float32 margin is below that can flip. These
# methods flip one on the sweep's inputs (margins measured in float32); for them bfloat16 must keep at least
# half of each image's float32 tokens at every stage, and, for a threshold method, may merge one more or less.
BF16_NEAR_TIES: dict[str, str] = {
    "btp": "the diversity stage's greedy max-min pick, image 1's 7th token: cosine distances 0.3892 (token 8) vs 0.3814",
    "dymu": "merges follow a similarity threshold: image 1's nearest is 0.0034 from 0.5, bfloat16 keys move it 0.008",
    "star": "a softmax of raw hidden-state dot products saturates: image 0's 4th late pick is among scores below 1e-4",
    "vflowopt": "attention times patch entropy, image 0's 4th and 5th at the second stage: 0.0362 vs 0.0335, and "
    "bfloat16 moves attention rows by up to 6% (0.2233 vs 0.2103)",
    "divprune+pdrop": "pdrop's first stage among the 8 tokens divprune kept, image 1's 4th: attention 0.0342 vs 0.0333",
    "diffrate@encoder": "block 1 ranks patches by CLS attention: image 1's 8th and 9th, 0.0339 vs 0.0326",
    "vomix@encoder": "each token votes for its single most similar token: at block 0 one of image 0's has its two "
    "best similarities 0.0028 apart",
}
THRESHOLD_COUNTS = {"dymu"}
# The padded batch also runs on the tiny LLaVA-OneVision (SigLIP without a class token, AnyRes packing of a
# base image and 4 crops, a Qwen2 LLM), except for the methods it refuses by design.
REFUSED: dict[str, dict[str, str]] = {
    "dymu": {"llava_onevision": "per-crop token counts, which AnyRes packing cannot follow"},
    "dtome@encoder": {"llava_onevision": "per-crop token counts, which AnyRes packing cannot follow"},
    "globalcom2": {"llava_onevision": "reads the class token's attention; SigLIP has none (runs on LLaVA-NeXT)"},
    "pool": {"llava_onevision": "OneVision's packed crops lay out no patch grid"},
    "recoverable": {"llava_onevision": "reads the class token's attention; SigLIP has none"},
    "vscan": {"llava_onevision": "ranks patches by the class token's attention; SigLIP has none"},
}


def vlm_methods() -> list[str]:
    return [n for n in tokenreduce.list_methods() if {Stage.PRE_LLM, Stage.LLM} & set(method_classes(n))]


def encoder_methods() -> list[str]:
    return [f"{n}@encoder" for n in tokenreduce.list_methods() if Stage.ENCODER in method_classes(n) and n != "none"]


METHODS = vlm_methods() + sorted(STACKS) + encoder_methods()


def spec(method: str) -> tuple[object, dict]:
    """``(what to apply, its config)`` for a swept method."""
    if method.endswith("@encoder"):
        name = method.removesuffix("@encoder")
        return name, {"stage": "encoder", **ENCODER_CONFIGS.get(name, REDUCING[name])}
    return STACKS.get(method, method), CONFIGS.get(method, {})


def patch(model, method: str, family: str) -> None:
    """Apply ``method`` with its sweep config; a method the tiny model cannot run fails, naming the fix."""
    what, config = spec(method)
    try:
        tokenreduce.apply(model, what, **config)
    except (TypeError, ValueError) as error:
        table = "ENCODER_CONFIGS" if method.endswith("@encoder") else "CONFIGS"
        pytest.fail(
            f"{method} does not run with {config or 'its defaults'} on the tiny {family}: add a small valid config for "
            f"it to {table} in tests/test_vlm_contract.py, or where the family refuses it by design, the reason to "
            f"REFUSED ({type(error).__name__}: {error})"
        )


def unpatched(method: str, family: str | None = None):
    """``(model, family)``: the tiny VLM the sweep runs ``method`` on (or the tiny ``family``)."""
    family = family or FAMILY.get(method, "llava")
    model = tiny_vlm(family)
    if family == "llava" and method.endswith("@encoder"):
        model.config.vision_feature_layer = -1
    return model, family


def patched(method: str, family: str | None = None):
    """``(model, family)``: :func:`unpatched`, patched with ``method``'s sweep config."""
    model, family = unpatched(method, family)
    patch(model, method, family)
    return model, family


def inputs(model, family: str, texts: list[list[int]], side: str = "left", seed: int = 3, dtype=torch.float32) -> dict:
    kw = _counted(vlm_inputs(model, family, texts, side, seed), family)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}


def without_positions(kw: dict) -> dict:
    """``kw`` for ``generate``, which counts its own position ids."""
    return {k: v for k, v in kw.items() if k != "position_ids"}


def kept(rec) -> list[tuple]:
    """Per image: its kept count, the original visual tokens it kept and the tokens each LLM pruning
    layer kept of it."""
    return [
        (image.kept, tuple(sorted(image.position.tolist())), *(tuple(sorted(s.kept[i].tolist())) for s in rec.steps))
        for i, image in enumerate(rec.images)
    ]


def real_lengths(rec) -> tuple[int, ...]:
    """Per row, the real tokens the LLM's last layer read (its logits' real positions)."""
    return rec.layer_lengths[-1] if rec.layer_lengths else rec.llm_lengths


def amplify(model, gain: float) -> None:
    """Scale the LLM's input (text embeddings and projected image features) by ``gain``: real LLMs carry
    hidden states in the hundreds, whose dot products overflow float16 unless a method scores in float32."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(gain)
        for p in model.model.multi_modal_projector.linear_2.parameters():
            p.mul_(gain)


@pytest.mark.parametrize(
    "dtype,gain", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 1000.0)], ids=["bf16", "fp16", "fp16-large"]
)
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_runs_and_keeps_what_float32_keeps(method, dtype, gain):
    model, family = patched(method)
    amplify(model, gain)
    texts = BATCH_TEXTS[:2]
    vlm_logits(model, inputs(model, family, texts))
    want = kept(tokenreduce.record(model))
    model.to(dtype)
    kw = inputs(model, family, texts, dtype=dtype)
    out = vlm_logits(model, kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    got = kept(tokenreduce.record(model))
    loose = dtype == torch.bfloat16 and method in BF16_NEAR_TIES
    counts = [(g[0], w[0]) for g, w in zip(got, want)]
    if loose and method in THRESHOLD_COUNTS:
        assert all(abs(g - w) <= 1 for g, w in counts), f"kept counts {counts} (half, float32)"
    else:
        assert all(g == w for g, w in counts), f"kept counts {counts} (half, float32)"
    share = 0.5 if loose else 1.0
    for image, (g, w) in enumerate(zip(got, want)):
        for stage, (a, b) in enumerate(zip(g[1:], w[1:])):
            overlap = len(set(a) & set(b)) / len(set(b)) if b else float(not a)
            assert overlap >= share, f"image {image} stage {stage}: kept {a} in {dtype}, {b} in float32"
    generated = vlm_generate(model, without_positions(kw), tokens=2)
    assert generated.shape == (2, 2)
    assert kept(tokenreduce.record(model)) == got, "generate's prefill kept other tokens than the forward"


@pytest.mark.parametrize(
    "side,family", [("left", None), ("right", None), ("left", "llava_onevision")], ids=["left", "right", "left-onevision"]
)
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_of_four_equals_each_prompt_alone(method, side, family):
    if family in REFUSED.get(method, {}):
        pytest.skip(REFUSED[method][family])
    if family == "llava_onevision" and method.endswith("@encoder"):
        name, config = spec(method)
        if tokenreduce.make_method(name, **config).needs_cls_token:
            pytest.skip(f"{name} scores tokens by class-token attention; SigLIP has no class token")
    model, family = patched(method, family)
    batched = vlm_logits(model, inputs(model, family, BATCH_TEXTS, side))
    rec = tokenreduce.record(model)
    lengths, per_image = real_lengths(rec), kept(rec)
    for row, text in enumerate(BATCH_TEXTS):
        alone = vlm_logits(model, inputs(model, family, [text], seed=3 + row))[0]
        single = tokenreduce.record(model)
        assert kept(single) == [per_image[row]], f"row {row} kept other tokens than alone"
        n = lengths[row]
        assert alone.shape[0] == n
        real = batched[row, -n:] if side == "left" else batched[row, :n]
        torch.testing.assert_close(real, alone, rtol=1e-5, atol=1e-5, msg=lambda m, row=row: f"row {row}: {m}")


@pytest.mark.parametrize("method", [m for m in METHODS if FAMILY.get(m, "llava") == "llava"])
def test_a_batch_with_two_images_in_a_prompt_equals_each_prompt_alone(method):
    prompts = [prompt([1, 5]), prompt([7], images=2), prompt([2, 3, 4, 6, 8, 9])]
    first = [0, 1, 3, 4]  # each prompt's first image in the batch's pixels
    px = pixels(4)
    model, _ = patched(method)
    ids, mask = batch(prompts)
    batched = vlm_logits(model, _counted(dict(input_ids=ids, attention_mask=mask, pixel_values=px), "llava"))
    rec = tokenreduce.record(model)
    lengths, per_image = real_lengths(rec), kept(rec)
    for row, one in enumerate(prompts):
        images = slice(first[row], first[row + 1])
        alone = vlm_logits(model, dict(input_ids=torch.tensor([one]), pixel_values=px[images]))[0]
        assert kept(tokenreduce.record(model)) == per_image[images], f"prompt {row} kept other tokens than alone"
        torch.testing.assert_close(batched[row, -lengths[row] :], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_remove_after_a_call_is_bit_identical_and_leaves_no_trace(method):
    model, family = unpatched(method)
    kw = inputs(model, family, BATCH_TEXTS[:2])
    before, untouched = vlm_logits(model, kw), traces(model)
    patch(model, method, family)
    vlm_generate(model, without_positions(kw), tokens=2)
    tokenreduce.remove(model)
    assert not tokenreduce.is_patched(model)
    assert torch.equal(vlm_logits(model, kw), before)
    assert traces(model) == untouched


def test_a_method_without_a_working_config_fails_the_sweep(monkeypatch):
    monkeypatch.delitem(CONFIGS, "gsearch")  # gsearch has no default schedule
    with pytest.raises(pytest.fail.Exception, match="add a small valid config for it to CONFIGS"):
        patched("gsearch")
