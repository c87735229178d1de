"""The VLM bench: pre-LLM (and vision-encoder) methods side by side on one VLM and one prompt batch:
prefill latency, time to first token, decode speed, visual tokens kept, prefill FLOPs, peak memory
and KV-cache size."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import tokenreduce
from tokenreduce.adapters import hf_llm, locate
from tokenreduce.adapters.blocks import linear_macs
from tokenreduce.adapters.hf_mllama import HFMllama
from tokenreduce.api import patch_of
from tokenreduce.bench.flops import counted_macs
from tokenreduce.bench.memory import peak_memory_bytes
from tokenreduce.bench.runner import MethodSpec, interleaved_times, reduction_share, with_baseline
from tokenreduce.methods.stack import parts
from tokenreduce.validate import as_int

DEFAULT_VLM = "llava-cpu"
# The random-weight token vocabulary of every named config (LLaVA-1.5's): the prefill reads one LM-head
# row, and bigger vocabularies (Qwen2's 152k, Llama 3's 128k) would only multiply each bench copy's memory.
VOCAB = 32064


def _widths(tiny: bool, vision: int, llm: int, heads: int, kv_heads: int, mlp: int) -> dict[str, int]:
    """A named config's widths, or with ``tiny`` the test widths (same token counts, layers and
    proportions of tokens; vision 32, LLM 64 with 4 heads, half of them KV heads when the config shares)."""
    if tiny:
        return dict(vision=32, vision_heads=2, llm=64, heads=4, kv_heads=4 if kv_heads == heads else 2, mlp=128)
    return dict(vision=vision, vision_heads=vision // 64, llm=llm, heads=heads, kv_heads=kv_heads, mlp=mlp)


def _llm(w: dict[str, int], layers: int) -> dict[str, int]:
    return dict(
        hidden_size=w["llm"],
        intermediate_size=w["mlp"],
        num_hidden_layers=layers,
        num_attention_heads=w["heads"],
        num_key_value_heads=w["kv_heads"],
        vocab_size=VOCAB,
        max_position_embeddings=4096,
    )


def _tower(w: dict[str, int], image_size: int, layers: int = 4) -> dict[str, int]:
    return dict(
        hidden_size=w["vision"],
        intermediate_size=4 * w["vision"],
        num_hidden_layers=layers,
        num_attention_heads=w["vision_heads"],
        image_size=image_size,
        patch_size=14,
    )


def llava_cpu(tiny: bool = False) -> nn.Module:
    """LLaVA-1.5's shapes scaled for a CPU: a CLIP tower on 336 px images with 14 px patches (576 visual
    tokens, the penultimate layer read; width 256, 4 layers) and a Llama LLM of width 1024, 8 layers,
    16 heads, MLP 2816 and LLaVA's 32064-token vocabulary. Random weights."""
    import transformers as T

    w = _widths(tiny, vision=256, llm=1024, heads=16, kv_heads=16, mlp=2816)
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**_tower(w, 336)),
        text_config=T.LlamaConfig(**_llm(w, 8)),
        image_token_id=32000,
        vision_feature_layer=-2,
        image_seq_length=576,
    )
    torch.manual_seed(0)
    return T.LlavaForConditionalGeneration(config).eval()


def llava_next_cpu(tiny: bool = False) -> nn.Module:
    """LLaVA-NeXT's AnyRes scaled for a CPU: a CLIP tower on 224 px tiles with 14 px patches (256 tokens
    a tile, the penultimate layer read, its class token dropped; width 256, 4 layers), LLaVA-NeXT's
    grid pinpoints in 224 px tiles (LLaVA-NeXT's 336 px ones scaled by 2/3), so the bench's 448 px
    square image is a 2x2 crop grid and the base image: 256 base tokens, then 32 rows of 32 crop tokens
    each closed by a newline, 1312 visual tokens (2.3 times llava-cpu's 576, as LLaVA-NeXT's 2880 are 5
    times LLaVA-1.5's: 2 times fewer crops' worth of tokens to fit a CPU); a Llama LLM of width 640, 8
    layers, 10 heads, MLP 1728 (Vicuna-7B's proportions; narrower than llava-cpu's, so that a prefill
    costs about what llava-cpu's does). Random weights."""
    import transformers as T

    w = _widths(tiny, vision=256, llm=640, heads=10, kv_heads=10, mlp=1728)
    pinpoints = [[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]]
    config = T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**_tower(w, 224)),
        text_config=T.LlamaConfig(**_llm(w, 8)),
        image_token_id=32000,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return T.LlavaNextForConditionalGeneration(config).eval()


VIDEO_FRAMES = 8


def llava_onevision_video_cpu(tiny: bool = False) -> nn.Module:
    """LLaVA-OneVision's video path scaled for a CPU: a SigLIP tower on 384 px frames with 14 px patches
    (27x27 patches, its last layer read whole; width 256, 4 layers), each frame pooled 2x2 to OneVision's
    196 tokens (14x14), a video of 8 frames (OneVision samples 32: 8 fit a CPU) and its newline, 1569
    visual tokens; a Qwen2 LLM of width 384, 8 layers, 6 heads sharing 2 KV heads, MLP 2048 (Qwen2-0.5B's
    proportions, narrower so that a prefill costs about what llava-cpu's does). The bench's prompts
    carry the video (:data:`NAMED_VLMS`). Random weights."""
    import transformers as T

    w = _widths(tiny, vision=256, llm=384, heads=6, kv_heads=2, mlp=2048)
    config = T.LlavaOnevisionConfig(
        vision_config=T.SiglipVisionConfig(**_tower(w, 384)),
        text_config=T.Qwen2Config(**_llm(w, 8)),
        image_token_id=32000,
        video_token_id=32001,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    return T.LlavaOnevisionForConditionalGeneration(config).eval()


def mllama_cpu(tiny: bool = False) -> nn.Module:
    """Llama 3.2 Vision's shapes scaled for a CPU: a vision model on four 224 px tiles of 14 px patches
    (257 features a tile with its class token, 1028 an image; width 256, 4 local layers and 2 global
    ones, intermediate layers 1 and 3 concatenated) and a 10-layer Llama of width 1024, 16 heads sharing
    4 KV heads, MLP 2816, whose layers 3 and 8 cross-attend to the image features (the 11B model's
    every fifth layer from 3). Random weights; the cross-attention gates opened (tanh 1, as trained
    models' are), so the image reaches the text."""
    import transformers as T

    w = _widths(tiny, vision=256, llm=1024, heads=16, kv_heads=4, mlp=2816)
    vision = T.MllamaVisionConfig(
        hidden_size=w["vision"],
        intermediate_size=4 * w["vision"],
        num_hidden_layers=4,
        num_global_layers=2,
        attention_heads=w["vision_heads"],
        image_size=224,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[1, 3],
        vision_output_dim=3 * w["vision"],
    )
    text = T.MllamaTextConfig(**_llm(w, 10), cross_attention_layers=[3, 8], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = T.MllamaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    torch.manual_seed(0)
    model = T.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(1.0)
    return model


@dataclass(frozen=True)
class NamedVLM:
    """A built-in VLM of the bench: ``build(tiny)`` makes it (``tiny``: test widths, same token counts);
    ``video_frames``: its prompts carry a video of that many frames instead of an image."""

    build: Callable[[bool], nn.Module]
    video_frames: int = 0


NAMED_VLMS: dict[str, NamedVLM] = {
    "llava-cpu": NamedVLM(llava_cpu),
    "llava-next-cpu": NamedVLM(llava_next_cpu),
    "llava-onevision-video-cpu": NamedVLM(llava_onevision_video_cpu, VIDEO_FRAMES),
    "mllama-cpu": NamedVLM(mllama_cpu),
}


# Every VLM method's bench case: the named config it runs on (AnyRes methods on llava-next-cpu, video
# methods on llava-onevision-video-cpu, cross-attention methods on mllama-cpu, the rest on llava-cpu)
# and its config. Budgets the command line fixes (64 of 576 visual tokens: VisionZip's 54+10 setting) or
# the method has no default for (gsearch's schedule, dymu's thresholds) are set here; the rest run at
# their papers' defaults. tests/test_bench_vlm.py checks that every registered VLM method has a case.
BENCH_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "aim": ("llava-cpu", {}),
    "btp": ("llava-cpu", {}),
    "catp": ("llava-cpu", {}),
    "dart": ("llava-cpu", {}),
    "divprune": ("llava-cpu", {"keep_tokens": 64}),
    # one threshold for every block (a calibrate file has one per block): about 83 of llava-cpu's 576 tokens
    # remain on its random weights (0.9 merges none of them there)
    "dymu": ("llava-cpu", {"thresholds": 0.3}),
    "fastv": ("llava-cpu", {"layer": 2, "keep_ratio": 0.25}),
    "ficoco": ("llava-cpu", {}),
    "ficoco_l": ("llava-cpu", {}),
    "greedyprune": ("llava-cpu", {}),
    "gsearch": ("llava-cpu", {"schedule": [1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.125]}),  # a schedule by hand
    "lvlm_csp": ("llava-cpu", {}),
    "pdrop": ("llava-cpu", {}),
    "pool": ("llava-cpu", {"stride": 3}),
    "psigmoid": ("llava-cpu", {}),
    "recoverable": ("llava-cpu", {}),
    "script": ("llava-cpu", {}),
    "simignore": ("llava-cpu", {}),
    "sparsevlm": ("llava-cpu", {"retain": 64}),
    "star": ("llava-cpu", {}),
    "todre": ("llava-cpu", {}),
    "vflowopt": ("llava-cpu", {}),
    "visiondrop": ("llava-cpu", {}),
    "visionzip": ("llava-cpu", {"dominant": 54, "contextual": 10}),
    "vscan": ("llava-cpu", {}),
    "zoo_prune": ("llava-cpu", {}),
    "globalcom2": ("llava-next-cpu", {}),
    "ptp": ("llava-next-cpu", {}),
    "dycoke": ("llava-onevision-video-cpu", {}),
    "fastvid": ("llava-onevision-video-cpu", {}),
    "framefusion": ("llava-onevision-video-cpu", {}),
    "holitom": ("llava-onevision-video-cpu", {}),
    "random": ("llava-onevision-video-cpu", {"keep_ratio": 0.25}),  # llava-cpu's default list has it on images
    "trimmed_llama": ("mllama-cpu", {}),
}


def bench_cases(model_name: str) -> list[MethodSpec]:
    """``none`` and the :data:`BENCH_CASES` of the named config ``model_name``, in the table's order."""
    return [MethodSpec("none"), *(MethodSpec(m, dict(c)) for m, (name, c) in BENCH_CASES.items() if name == model_name)]


def prompt_inputs(
    model: nn.Module, batch_size: int, prompt_tokens: int, seed: int = 0, video_frames: int = 0
) -> dict[str, torch.Tensor]:
    """One random image (or with ``video_frames``, a video of that many frames) and ``prompt_tokens``
    random text tokens per row (half before the image, half after), laid out, framed and typed as the
    VLM family's processor does."""
    _, inner, adapter = locate(model)
    video = {"video_frames": video_frames} if video_frames else {}
    return adapter.example_inputs(inner, batch_size, prompt_tokens, seed, **video)


def llm_prefill_macs(
    text_model: nn.Module, lm_head: nn.Module, length: int | Sequence[int], attention_length: int | None = None
) -> int:
    """Multiply-accumulates of one prompt through the LLM, of ``length`` tokens (or, per layer, the
    tokens each layer read): every layer's linear layers per token, ``QK^T`` and ``AV`` over the full
    ``length x length`` map (what SDPA computes on CPU), and the LM head for the one token whose logits
    a prefill keeps. ``attention_length``: the tokens every self-attention module runs on when it is
    not ``length`` (virtual token unmerging: the attention, its projections included, over the full
    prompt; the MLP over the merged tokens)."""
    layers = list(text_model.layers)
    lengths = [length] * len(layers) if isinstance(length, int) else list(length)
    macs = lm_head.in_features * lm_head.out_features
    for layer, n in zip(layers, lengths):
        width = layer.self_attn.q_proj.out_features
        a = n if attention_length is None else attention_length
        macs += linear_macs(layer.self_attn) * a + linear_macs(layer.mlp) * n + 2 * a * a * width
    return macs


def kv_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


@dataclass
class VLMBenchResult:
    """One method on the VLM bench; ratios are against the ``none`` row of the same run."""

    method: str
    params: dict[str, Any]
    visual_tokens: int  # per image, into the LLM (into its last layers when pruned inside it)
    llm_tokens: int  # prompt length the LLM read (row mean; mean over layers when pruned inside it)
    prefill_ms: float  # median latency of the prompt's forward (vision, selection, LLM)
    ttft_ms: float  # median time to the first generated token
    decode_tokens_per_s: float  # per row, after the first token
    prefill_gflops: float  # per prompt: vision tower, projector and LLM prefill (multiply-accumulates)
    llm_prefill_gflops: float
    peak_memory_mib: float
    kv_cache_mib: float
    reduce_share: float  # share of the prefill spent selecting and compacting
    speedup: float = 1.0  # prefill
    flops_speedup: float = 1.0
    prefill_times_ms: list[float] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        return self.speedup / self.flops_speedup


def _prefill(model: nn.Module, inputs: dict) -> Any:
    return model(**inputs, use_cache=True, logits_to_keep=1)


def _generate(model: nn.Module, inputs: dict, tokens: int) -> None:
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def _targets(model: nn.Module) -> list[tuple[object, str]]:
    """Where a reduction spends its time: scoring (one query row against the keys), selecting, and
    cutting the sequence and its masks."""
    patch = patch_of(model)
    methods = [m for m in parts(patch.method) if m is not None]
    targets = [
        (patch, "reduce"),
        (patch.adapter, "compact_prompt"),
        *((m, "select") for m in methods),
        *((m, "text_raters") for m in methods),
        (hf_llm, "_prune"),
        (hf_llm, "_own_attention"),
        (hf_llm, "row_attention"),
        (hf_llm, "rows_attention"),
        (hf_llm, "_cut"),
    ]
    return [(owner, name) for owner, name in targets if hasattr(owner, name)]


def vlm_steps(specs: Sequence[MethodSpec], repeats: int, warmup: int) -> int:
    """Calls ``run_vlm_bench`` reports to ``progress``: per method the checked prompt, warmup, three
    timed calls per repeat (prefill, first token, generation), memory, and the share pass when patched."""
    specs = with_baseline(specs)
    return len(specs) * (1 + max(warmup - 1, 0) + 3 * repeats + 1) + sum(s.name != "none" for s in specs)


def run_vlm_bench(
    model: nn.Module,
    specs: Sequence[MethodSpec],
    *,
    batch_size: int = 1,
    prompt_tokens: int = 64,
    new_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    video_frames: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[VLMBenchResult]:
    """Benchmark every spec on private copies of the VLM ``model`` (left as it was), with the same
    prompts (one image each, or with ``video_frames`` one video of that many frames), interleaving the
    timed repeats; ``none`` is the unpatched model. A method the model cannot take raises its adapter's
    error before anything is timed."""
    batch_size, prompt_tokens = as_int("batch_size", batch_size, 1), as_int("prompt_tokens", prompt_tokens, 0)
    new_tokens, repeats, warmup = as_int("new_tokens", new_tokens, 2), as_int("repeats", repeats, 1), as_int("warmup", warmup, 0)
    video_frames = as_int("video_frames", video_frames, 0)
    specs, device, tick = with_baseline(specs), torch.device(device), progress or (lambda n: None)
    base = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    inputs = {k: v.to(device) for k, v in prompt_inputs(base, batch_size, prompt_tokens, video_frames=video_frames).items()}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    _, inner, adapter = locate(base)

    models, rows = [], []
    with torch.inference_mode():
        for spec in specs:
            m = copy.deepcopy(base)
            if spec.name != "none":
                tokenreduce.apply(m, spec.name, **spec.config)
            out = _prefill(m, inputs)
            tick(1)
            rows.append(_accounting(m, inner, adapter, inputs, out, spec))
            models.append(m)
        for _ in range(max(warmup - 1, 0)):
            for m in models:
                _prefill(m, inputs)
                tick(1)
        calls = [
            [lambda m=m: _prefill(m, inputs), lambda m=m: _generate(m, inputs, 1), lambda m=m: _generate(m, inputs, new_tokens)]
            for m in models
        ]
        prefill, first, whole = zip(*interleaved_times(calls, repeats, device, tick))
        peaks, shares = [], []
        for m in models:
            peaks.append(peak_memory_bytes(lambda m=m: _prefill(m, inputs), device))
            tick(1)
        for m, spec in zip(models, specs):
            if spec.name == "none":
                shares.append(0.0)
                continue
            shares.append(reduction_share(lambda m=m: _prefill(m, inputs), _targets(m), device))
            tick(1)

    results = []
    for row, pre, ttft, gen, peak, share in zip(rows, prefill, first, whole, peaks, shares):
        decode = statistics.median(gen) - statistics.median(ttft)
        results.append(
            VLMBenchResult(
                **row,
                prefill_ms=statistics.median(pre) * 1e3,
                ttft_ms=statistics.median(ttft) * 1e3,
                decode_tokens_per_s=(new_tokens - 1) / decode if decode > 0 else float("inf"),
                peak_memory_mib=peak / 2**20,
                reduce_share=share,
                prefill_times_ms=[t * 1e3 for t in pre],
            )
        )
    baseline = next(r for r, s in zip(results, specs) if s.name == "none")
    for r in results:
        r.speedup = baseline.prefill_ms / r.prefill_ms
        r.flops_speedup = baseline.prefill_gflops / r.prefill_gflops
    return results


def _accounting(m: nn.Module, inner: nn.Module, adapter, inputs: dict, out, spec: MethodSpec) -> dict[str, Any]:
    """Tokens, FLOPs and KV-cache size of one checked prompt; the vision side (tower, projector and
    any selection before the LLM) counted on ``m``'s own image (or video) feature computation."""
    if isinstance(adapter, HFMllama):
        return _cross_accounting(m, inner, inputs, out, spec)
    rows = inputs["input_ids"].shape[0]
    videos = "pixel_values_videos" in inputs
    if spec.name == "none":
        lengths, params = inputs["attention_mask"].sum(1).tolist(), {}
        token = inner.config.video_token_id if videos else getattr(inner.config, adapter.spec(inner).image_token)
        visual = int(inputs["input_ids"][0].eq(int(token)).sum())
    else:
        rec = tokenreduce.record(m)
        lengths, params = rec.llm_lengths, patch_of(m).method.params()
        visual = (rec.videos if videos else rec.images)[0].kept
        if rec.layer_lengths:  # pruned inside the LLM: each layer's own lengths, per row
            lengths = list(zip(*rec.layer_lengths))
    text = getattr(inner, adapter.spec(inner).text)
    lm_head = m.get_output_embeddings()
    unmerged = spec.name != "none" and patch_of(m).method.unmerges_in_llm
    full = inputs["attention_mask"].sum(1).tolist() if unmerged else [None] * rows  # DyMU's attention runs over every patch
    llm = sum(llm_prefill_macs(text, lm_head, n, a) for n, a in zip(lengths, full)) / rows
    _, patched, _ = locate(m)
    if videos:
        vision = counted_macs(lambda: patched.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])) / rows
    else:
        images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and not k.endswith("type_ids")}
        vision = counted_macs(lambda: patched.get_image_features(**images)) / rows
    return dict(
        method=spec.label,
        params=params,
        visual_tokens=visual,
        llm_tokens=round(sum(n if isinstance(n, int) else sum(n) / len(n) for n in lengths) / rows),
        prefill_gflops=(vision + llm) / 1e9,
        llm_prefill_gflops=llm / 1e9,
        kv_cache_mib=kv_cache_bytes(out.cache) / 2**20,
    )


def _cross_accounting(m: nn.Module, inner: nn.Module, inputs: dict, out, spec: MethodSpec) -> dict[str, Any]:
    """:func:`_accounting` for a VLM whose image features reach the LLM through cross-attention (Mllama):
    visual tokens are the image features its cross-attention layers read (per row, mean), the LLM reads
    the prompt alone, and the FLOPs are torch's count of the whole prefill (the vision model's and the
    LLM's: the count model of :func:`llm_prefill_macs` has no cross-attention layers)."""
    rows = inputs["input_ids"].shape[0]
    vision_inputs = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    vision_model = locate(m)[1].vision_model
    vision = counted_macs(lambda: vision_model(**vision_inputs)) / rows
    total = counted_macs(lambda: _prefill(m, inputs)) / rows
    if spec.name == "none":
        states = inner.vision_model(**vision_inputs)[0]
        visual, params = int(states[0].shape[-3] * states[0].shape[-2]), {}
    else:
        rec = tokenreduce.record(m)
        visual, params = round(sum(k.numel() for k in rec.kept) / rows), patch_of(m).method.params()
    return dict(
        method=spec.label,
        params=params,
        visual_tokens=visual,
        llm_tokens=round(int(inputs["attention_mask"].sum()) / rows),
        prefill_gflops=total / 1e9,
        llm_prefill_gflops=(total - vision) / 1e9,
        kv_cache_mib=kv_cache_bytes(out.cache) / 2**20,
    )


def format_vlm_table(results: Sequence[VLMBenchResult]) -> str:
    head = ["method", "visual", "LLM tokens", "prefill GFLOPs", "prefill ms", "TTFT ms", "decode tok/s", "speedup",
            "FLOP-ideal", "of ideal", "peak MiB", "KV MiB", "select %"]  # fmt: skip
    rows = [
        [
            r.method,
            str(r.visual_tokens),
            str(r.llm_tokens),
            f"{r.prefill_gflops:.1f}",
            f"{r.prefill_ms:.0f}",
            f"{r.ttft_ms:.0f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.speedup:.2f}x",
            f"{r.flops_speedup:.2f}x",
            f"{r.efficiency:.0%}",
            f"{r.peak_memory_mib:.0f}",
            f"{r.kv_cache_mib:.1f}",
            f"{r.reduce_share:.1%}",
        ]
        for r in results
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
