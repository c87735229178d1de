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
from tokenreduce.api import patch_of
from tokenreduce.bench.flops import counted_macs
from tokenreduce.bench.memory import peak_memory_bytes
from tokenreduce.bench.runner import MethodSpec, interleaved_times, reduction_share, with_baseline
from tokenreduce.methods.stack import parts
from tokenreduce.validate import as_int

DEFAULT_VLM = "llava-cpu"


def llava_cpu(image_token: int = 32000) -> nn.Module:
    """LLaVA-1.5's shapes scaled for a CPU: a CLIP tower on 336 px images with 14 px patches (576 visual
    tokens, the penultimate layer read; width 256, 4 layers) and a Llama LLM of width 1024, 8 layers,
    16 heads, MLP 2816 and LLaVA's 32064-token vocabulary. Random weights."""
    import transformers as T

    vision = T.CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14
    )
    text = T.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    config = T.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-2, image_seq_length=576
    )
    torch.manual_seed(0)
    return T.LlavaForConditionalGeneration(config).eval()


def prompt_inputs(model: nn.Module, batch_size: int, prompt_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One random image and ``prompt_tokens`` random text tokens per row (half before the image, half
    after), laid out, framed and typed as the VLM family's processor does."""
    _, inner, adapter = locate(model)
    return adapter.example_inputs(inner, batch_size, prompt_tokens, seed)


def llm_prefill_macs(text_model: nn.Module, lm_head: nn.Module, length: int | Sequence[int]) -> int:
    """Multiply-accumulates of one prompt through the LLM, of ``length`` tokens (or, per layer, the
    tokens each layer read): every layer's linear layers per token, ``QK^T`` and ``AV`` over the full
    ``length x length`` map (what SDPA computes on CPU), and the LM head for the one token whose logits
    a prefill keeps."""
    layers = list(text_model.layers)
    lengths = [length] * len(layers) if isinstance(length, int) else list(length)
    macs = lm_head.in_features * lm_head.out_features
    for layer, n in zip(layers, lengths):
        width = layer.self_attn.q_proj.out_features
        macs += (linear_macs(layer.self_attn) + linear_macs(layer.mlp)) * n + 2 * n * n * width
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
    progress: Callable[[int], None] | None = None,
) -> list[VLMBenchResult]:
    """Benchmark every spec on private copies of the VLM ``model`` (left as it was), with the same
    prompts, interleaving the timed repeats; ``none`` is the unpatched model."""
    batch_size, prompt_tokens = as_int("batch_size", batch_size, 1), as_int("prompt_tokens", prompt_tokens, 0)
    new_tokens, repeats, warmup = as_int("new_tokens", new_tokens, 2), as_int("repeats", repeats, 1), as_int("warmup", warmup, 0)
    specs, device, tick = with_baseline(specs), torch.device(device), progress or (lambda n: None)
    base = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    inputs = {k: v.to(device) for k, v in prompt_inputs(base, batch_size, prompt_tokens).items()}
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
    any selection before the LLM) counted on ``m``'s own image-feature computation."""
    rows = inputs["input_ids"].shape[0]
    if spec.name == "none":
        lengths, params = inputs["attention_mask"].sum(1).tolist(), {}
        visual = int(inputs["input_ids"][0].eq(int(getattr(inner.config, adapter.spec(inner).image_token))).sum())
    else:
        rec = tokenreduce.record(m)
        lengths, visual, params = rec.llm_lengths, rec.images[0].kept, patch_of(m).method.params()
        if rec.layer_lengths:  # pruned inside the LLM: each layer's own lengths, per row
            lengths = list(zip(*rec.layer_lengths))
    text = getattr(inner, adapter.spec(inner).text)
    lm_head = m.get_output_embeddings()
    llm = sum(llm_prefill_macs(text, lm_head, n) for n in lengths) / rows
    _, patched, _ = locate(m)
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
