"""The contract every VLM method (stage pre_llm or llm, stacks of the two, and encoder methods in the vision
tower) honours on the inputs it acts on: half precision runs and keeps what float32 keeps, a padded batch
equals its rows alone (also on a second family), and remove() restores the model bit for bit. Methods are
read from the registry, so a new one is swept: an image method on a tiny LLaVA (and LLaVA-OneVision), a
method whose modalities exclude images on videos of a tiny LLaVA-OneVision (and Qwen2-VL), a method acting
on both on each (``name@video``), and a method tied to model families on those (``FAMILY``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenreduce
from conftest import (
    BATCH_TEXTS,
    _counted,
    batch,
    mllama_inputs,
    pixels,
    prompt,
    tiny_mllama,
    tiny_vlm,
    vlm_generate,
    vlm_inputs,
    vlm_logits,
    vlm_video_inputs,
)
from test_contract import REDUCING, traces
from tokenreduce.adapters.hf_mllama import CrossAttentionRecord
from tokenreduce.methods.stack import Stack
from tokenreduce.registry import method_classes
from tokenreduce.stages import Stage

pytest.importorskip("transformers")

# Configs for the methods whose defaults do not fit the tiny LLaVA (16 visual tokens on a 4x4 grid, a
# 4-layer LLM) or that have a required argument. Every other VLM method runs with its defaults.
CONFIGS: dict[str, dict] = {
    "dymu": dict(thresholds=0.5),
    "gsearch": dict(schedule=[1.0, 1.0, 0.5, 0.25]),
    "trimmed_llama": dict(keep_ratio=0.25),  # 0.5's union over heads keeps all 17 features of a one-tile image
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
# The families each input kind runs on: every check on the first, the padded batch also on the second.
FAMILIES: dict[str, tuple[str, ...]] = {
    "image": ("llava", "llava_onevision"),
    "video": ("llava_onevision", "qwen2_vl"),
}
# Methods tied to families run on them instead: those that read an AnyRes layout (a base image and crops) on
# the tiny LLaVA-NeXT, trimmed_llama (Mllama's cross-attention) on the tiny Mllama alone.
FAMILY: dict[str, tuple[str, ...]] = {
    "globalcom2": ("llava_next", "llava_onevision"),
    "ptp": ("llava_next", "llava_onevision"),
    "trimmed_llama": ("mllama",),
}
FRAMES = 4  # per video: 17 tokens on the tiny LLaVA-OneVision (2x2 per frame and a newline), 64 on Qwen2-VL
# Two methods in one model: before the LLM, then inside it.
STACKS: dict[str, list] = {
    "visionzip+fastv": [("visionzip", dict(dominant=6, contextual=2)), ("fastv", dict(layer=2, keep_ratio=0.5))],
    "divprune+pdrop": [("divprune", dict(keep_tokens=8)), ("pdrop", dict(layers=(1, 2), ratios=(0.5, 0.25)))],
}
# float16 must keep exactly float32's tokens. bfloat16 keeps 8 bits of mantissa: the tiny LLaVA's hidden states
# drift 2-3.5% (relative norm) from float32's, so a decision whose float32 margin is below that can flip. These
# methods flip one on the sweep's inputs (margins measured in float32); for them bfloat16 must keep at least
# half of each image's float32 tokens at every stage, and, for a method whose count follows its scores (a
# threshold, a union over heads), may keep one more or less.
BF16_NEAR_TIES: dict[str, str] = {
    "btp": "the diversity stage's greedy max-min pick, image 1's 7th token: cosine distances 0.3892 (token 8) vs 0.3814",
    "dymu": "merges follow a similarity threshold: image 1's nearest is 0.0034 from 0.5, bfloat16 keys move it 0.008",
    "star": "a softmax of raw hidden-state dot products saturates: image 0's 4th late pick is among scores below 1e-4",
    "vflowopt": "attention times patch entropy, image 0's 4th and 5th at the second stage: 0.0362 vs 0.0335, and "
    "bfloat16 moves attention rows by up to 6% (0.2233 vs 0.2103)",
    "trimmed_llama": "each head keeps its 8 best of 34 features and the union is kept: row 0's head 0 ranks feature "
    "9 (0.1495 of attention) 8th, feature 15 (0.1466) 9th; bfloat16 swaps them, and 15 joins the union",
    "divprune+pdrop": "pdrop's first stage among the 8 tokens divprune kept, image 1's 4th: attention 0.0342 vs 0.0333",
    "diffrate@encoder": "block 1 ranks patches by CLS attention: image 1's 8th and 9th, 0.0339 vs 0.0326",
    "vomix@encoder": "each token votes for its single most similar token: at block 0 one of image 0's has its two "
    "best similarities 0.0028 apart",
}
THRESHOLD_COUNTS = {"dymu", "trimmed_llama"}
# The padded batch also runs on the second family (for images the tiny LLaVA-OneVision: SigLIP without a class
# token, AnyRes packing of a base image and 4 crops, a Qwen2 LLM), except for the methods it refuses by design.
REFUSED: dict[str, dict[str, str]] = {
    "dymu": {"llava_onevision": "per-crop token counts, which AnyRes packing cannot follow"},
    "dtome@encoder": {"llava_onevision": "per-crop token counts, which AnyRes packing cannot follow"},
    "globalcom2": {"llava_onevision": "reads the class token's attention; SigLIP has none (runs on LLaVA-NeXT)"},
    "pool": {"llava_onevision": "OneVision's packed crops lay out no patch grid"},
    "ptp": {
        "llava_onevision": "reads the class token's attention of the base image and crops; SigLIP has none (runs on LLaVA-NeXT)"
    },
    "recoverable": {"llava_onevision": "reads the class token's attention; SigLIP has none"},
    "vscan": {"llava_onevision": "ranks patches by the class token's attention; SigLIP has none"},
}


def vlm_methods() -> list[str]:
    return [n for n in tokenreduce.list_methods() if {Stage.PRE_LLM, Stage.LLM} & set(method_classes(n))]


def encoder_methods() -> list[str]:
    return [f"{n}@encoder" for n in tokenreduce.list_methods() if Stage.ENCODER in method_classes(n) and n != "none"]


def spec(method: str) -> tuple[object, dict]:
    """``(what to apply, its config)`` for a swept method."""
    if method.endswith("@encoder"):
        name = method.removesuffix("@encoder")
        return name, {"stage": "encoder", **ENCODER_CONFIGS.get(name, REDUCING[name])}
    name = method.removesuffix("@video")
    return STACKS.get(name, name), CONFIGS.get(name, {})


def modalities(method: str) -> frozenset[str]:
    """What ``method`` acts on, read from its class (a stack's: from either part; image by default)."""
    if method.endswith("@encoder"):
        return frozenset({"image"})
    what, config = spec(method)
    try:
        made = tokenreduce.make_method(what, **config)
    except (TypeError, ValueError):  # no working config: its classes say, and the sweep fails naming the fix
        parts = tuple(method_classes(what).values())
    else:
        parts = (made.before, made.inside) if isinstance(made, Stack) else (made,)
    return frozenset().union(*(getattr(p, "modalities", frozenset({"image"})) for p in parts))


def with_videos(methods: list[str]) -> list[str]:
    """``methods`` as swept: one acting on images and videos also as ``name@video``."""
    out = []
    for method in methods:
        acts = modalities(method)
        out += [method] if "image" in acts else []
        out += [f"{method}@video" if "image" in acts else method] if "video" in acts else []
    return out


METHODS = with_videos(vlm_methods() + sorted(STACKS)) + encoder_methods()


def kind(method: str) -> str:
    """The input kind ``method`` is swept on: ``"video"`` or ``"image"``."""
    return "video" if method.endswith("@video") or "image" not in modalities(method) else "image"


def families(method: str) -> tuple[str, ...]:
    """The family all checks run ``method`` on, then the padded batch's second family (if any)."""
    return FAMILY.get(method.removesuffix("@video"), FAMILIES[kind(method)])


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
    family = family or families(method)[0]
    model = tiny_mllama() if family == "mllama" else tiny_vlm(family)
    if family == "llava" and method.endswith("@encoder"):
        model.config.vision_feature_layer = -1
    return model, family


def patched(method: str, family: str | None = None):
    """``(model, family)``: :func:`unpatched`, patched with ``method``'s sweep config."""
    model, family = unpatched(method, family)
    patch(model, method, family)
    return model, family


def inputs(
    model, method: str, family: str, texts: list[list[int]], side: str = "left", row: int = 0, dtype=torch.float32
) -> dict:
    """One image (or video, for a video ``method``) per prompt of ``texts``, the first drawn as row ``row``'s,
    in ``dtype``, with the position ids ``generate`` gives them. Mllama's images alternate one tile (and a
    padding tile) and two."""
    if family == "mllama":
        kw = mllama_inputs(texts, [1 + (row + i) % 2 for i in range(len(texts))], side, 3 + row)
    elif kind(method) == "video":
        kw = vlm_video_inputs(family, texts, frames=FRAMES, side=side, seed=7 + row)
    else:
        kw = vlm_inputs(model, family, texts, side, 3 + row)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in _counted(kw, family).items()}


def without_positions(kw: dict) -> dict:
    """``kw`` for ``generate``, which counts its own position ids."""
    return {k: v for k, v in kw.items() if k != "position_ids"}


def kept(rec) -> list[tuple]:
    """Per image (or video): its kept count, the original visual tokens it kept and the tokens each LLM
    pruning layer kept of it; of Mllama, per row: the count and indices of the image features kept."""
    if isinstance(rec, CrossAttentionRecord):
        return [(len(k), tuple(k.tolist())) for k in rec.kept]
    return [
        (span.kept, tuple(sorted(span.position.tolist())), *(tuple(sorted(s.kept[i].tolist())) for s in rec.steps))
        for i, span in enumerate(rec.videos or rec.images)
    ]


def decoded(rec) -> list[list[list[int]]]:
    """Per span, per decode step, the cached tokens the decode layers read (DyCoke); empty for others."""
    steps = getattr(rec, "decode_steps", [])
    return [[s[i].tolist() for s in steps] for i in range(len(steps[0]))] if steps else []


def overlap(got, want) -> float:
    """The share of ``want``'s tokens that ``got`` holds (1 when both are empty)."""
    return len(set(got) & set(want)) / len(set(want)) if want else float(not got)


def real_lengths(rec, kw: dict) -> tuple[int, ...]:
    """Per row, the real tokens the LLM's last layer read (its logits' real positions)."""
    if isinstance(rec, CrossAttentionRecord):  # the sequence stays: only the image features shrink
        return tuple(kw["attention_mask"].sum(-1).tolist())
    return rec.layer_lengths[-1] if rec.layer_lengths else rec.llm_lengths


def amplify(model, gain: float) -> None:
    """Scale the LLM's input (text embeddings and projected visual features) by ``gain``: real LLMs carry
    hidden states in the hundreds, whose dot products overflow float16 unless a method scores in float32."""
    projector = getattr(model.model, "multi_modal_projector", None) or model.model.visual.merger
    last = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(gain)
        for p in last.parameters():
            p.mul_(gain)


@pytest.mark.parametrize(
    "dtype,gain", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 1000.0)], ids=["bf16", "fp16", "fp16-large"]
)
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_runs_and_keeps_what_float32_keeps(method, dtype, gain):
    model, family = patched(method)
    amplify(model, gain)
    texts = BATCH_TEXTS[:2]
    kw = inputs(model, method, family, texts)
    vlm_logits(model, kw)
    want = kept(tokenreduce.record(model))
    video = kind(method) == "video"  # a video method may select cached tokens on decode steps (DyCoke)
    if video:
        vlm_generate(model, without_positions(kw), tokens=3)
        want_decoded = decoded(tokenreduce.record(model))
    model.to(dtype)
    kw = inputs(model, method, family, texts, dtype=dtype)
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
            assert overlap(a, b) >= share, f"image {image} stage {stage}: kept {a} in {dtype}, {b} in float32"
    generated = vlm_generate(model, without_positions(kw), tokens=3 if video else 2)
    assert generated.shape == (2, 3 if video else 2)
    rec = tokenreduce.record(model)
    assert kept(rec) == got, "generate's prefill kept other tokens than the forward"
    if video:
        got_decoded = decoded(rec)
        assert [[len(s) for s in d] for d in got_decoded] == [[len(s) for s in d] for d in want_decoded]
        for span, (g, w) in enumerate(zip(got_decoded, want_decoded)):
            for step, (a, b) in enumerate(zip(g, w)):
                assert overlap(a, b) >= share, f"span {span} decode step {step}: read {a} in {dtype}, {b} in float32"


@pytest.mark.parametrize("side,second", [("left", False), ("right", False), ("left", True)], ids=["left", "right", "left-second"])
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_of_four_equals_each_prompt_alone(method, side, second):
    if second and len(families(method)) == 1:
        pytest.skip(f"{method} acts on one family alone")
    family = families(method)[second]
    if family in REFUSED.get(method, {}):
        pytest.skip(REFUSED[method][family])
    if family == "llava_onevision" and method.endswith("@encoder"):
        name, config = spec(method)
        if tokenreduce.make_method(name, **config).needs_cls_token:
            pytest.skip(f"{name} scores tokens by class-token attention; SigLIP has no class token")
    model, family = patched(method, family)
    kw = inputs(model, method, family, BATCH_TEXTS, side)
    batched = vlm_logits(model, kw)
    rec = tokenreduce.record(model)
    lengths, per_image = real_lengths(rec, kw), kept(rec)
    # a video method's decode steps (DyCoke's cache selection) run in generate alone, which continues left-padded
    # prompts only (it appends after a right-padded prompt's padding)
    video = kind(method) == "video" and side == "left"
    if video:
        tokens, steps = vlm_generate(model, without_positions(kw), tokens=2), decoded(tokenreduce.record(model))
    for row, text in enumerate(BATCH_TEXTS):
        one = inputs(model, method, family, [text], row=row)
        alone = vlm_logits(model, one)[0]
        assert kept(tokenreduce.record(model)) == [per_image[row]], f"row {row} kept other tokens than alone"
        n = lengths[row]
        assert alone.shape[0] == n
        real = batched[row, -n:] if side == "left" else batched[row, :n]
        torch.testing.assert_close(real, alone, rtol=1e-5, atol=1e-5, msg=lambda m, row=row: f"row {row}: {m}")
        if video:
            assert torch.equal(vlm_generate(model, without_positions(one), tokens=2), tokens[row : row + 1]), f"row {row}"
            assert decoded(tokenreduce.record(model)) == steps[row : row + 1], f"row {row} decoded other tokens"


@pytest.mark.parametrize("method", [m for m in METHODS if families(m)[0] == "llava" and kind(m) == "image"])
def test_a_batch_with_two_images_in_a_prompt_equals_each_prompt_alone(method):
    prompts = [prompt([1, 5]), prompt([7], images=2), prompt([2, 3, 4, 6, 8, 9])]
    first = [0, 1, 3, 4]  # each prompt's first image in the batch's pixels
    px = pixels(4)
    model, _ = patched(method)
    ids, mask = batch(prompts)
    kw = _counted(dict(input_ids=ids, attention_mask=mask, pixel_values=px), "llava")
    batched = vlm_logits(model, kw)
    rec = tokenreduce.record(model)
    lengths, per_image = real_lengths(rec, kw), kept(rec)
    for row, one in enumerate(prompts):
        images = slice(first[row], first[row + 1])
        alone = vlm_logits(model, dict(input_ids=torch.tensor([one]), pixel_values=px[images]))[0]
        assert kept(tokenreduce.record(model)) == per_image[images], f"prompt {row} kept other tokens than alone"
        torch.testing.assert_close(batched[row, -lengths[row] :], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_remove_after_a_call_is_bit_identical_and_leaves_no_trace(method):
    model, family = unpatched(method)
    kw = inputs(model, method, family, BATCH_TEXTS[:2])
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


def test_methods_are_swept_on_the_inputs_their_classes_declare():
    videos = {m for m in METHODS if kind(m) == "video"}
    assert {"dycoke", "fastvid", "framefusion", "holitom", "random@video"} <= videos  # stacks read from their parts
    assert "random" in METHODS and "random" not in videos and "fastvid@video" not in METHODS
