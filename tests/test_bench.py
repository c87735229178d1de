"""Benchmark plumbing: spec parsing, the FLOP model against torch's counter, the CLI end to end."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce
from conftest import build, images, use_eager_attention
from test_contract import REDUCING
from tokenreduce.adapters import locate
from tokenreduce.bench import MethodSpec, model_macs, parse_specs, run_bench
from tokenreduce.bench.memory import peak_memory_bytes
from tokenreduce.bench.runner import load_warning, steps

# Methods whose scoring runs matrix products the count model leaves out (full attention maps,
# clustering distances), as a multiple of the counted MACs on the tiny 6-block model.
SCORING_ALLOWANCE: dict[str, float] = {
    # 14 products of K x P x C (5 soft k-means rounds, reconstruction): 15% on this tiny model, 3% at DeiT-S
    "expedite": 1.16,
    # the semantic graph, and the dense propagation matrix applied to the tokens in every block (about 9% of
    # these 48-wide blocks, about 4% of DeiT-S's)
    "gtp": 1.11,
    # the attention map recomputed beside SDPA at each pruning layer, and up to 30 PageRank steps on it
    "zero_tprune": 1.13,
    # token-to-token distances (N^2 C) at each clustering layer, and the medoid costs from them
    "dpc_knn": 1.06,
    "kmedoids": 1.11,
    "token_pooling": 1.15,  # distances after every block, five rounds of medoid costs
    # the dense [N', N] @ [N, C] mix in every block, and the similarities that build it
    "vomix": 1.1,
    "token_transforming": 1.12,
    # dct's dense mix, one [T', N] @ [N, C] product per block (N / 12C of a block: 10% at C = 48, 3.6% on DeiT-S),
    # and the [T', T'] @ [T', T] product that builds the matrix
    "dct": 1.15,
    # one step ahead: q/k/v and the full attention map on the unmerged tokens at the start of every block
    # (the algorithm's look-ahead, plus v and the re-projected q/k of the merged tokens, unused): 1.26 here
    "mctf": 1.3,
}


def test_parse_specs():
    specs = parse_specs("none, tome:r=8:clip=True,tome:r=[4,4,2,0],evit:keep_rate=0.7:layers=(1,2)")
    assert specs == [
        MethodSpec("none"),
        MethodSpec("tome", {"r": 8, "clip": True}),
        MethodSpec("tome", {"r": [4, 4, 2, 0]}),
        MethodSpec("evit", {"keep_rate": 0.7, "layers": (1, 2)}),
    ]
    assert specs[1].label == "tome:r=8:clip=True"
    with pytest.raises(ValueError, match="expected name:key=value"):
        parse_specs("tome:r")
    with pytest.raises(ValueError, match="at least one method"):
        parse_specs(" , ")


@pytest.mark.parametrize("model_name", ["vit", "deit_distilled", "qknorm_avg", "hf_clip", "hf_dinov2", "hf_vit"])
@pytest.mark.parametrize(
    "method,config", [("none", {}), ("tome", dict(r=6)), ("evit", dict(keep_rate=0.5)), ("topk", dict(keep_rate=0.5))]
)
def test_analytic_macs_match_torch_flop_counter(model_name, method, config):
    model = build(model_name)
    use_eager_attention(model)  # eager matmuls, which FlopCounterMode counts op by op
    tokenreduce.apply(model, method, **config)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images(batch=1))
    rec = tokenreduce.record(model)
    macs = model_macs(
        locate(model)[2], model, rec.input_tokens, rec.tokens_per_layer, tokenreduce.api.patch_of(model).method.hook
    )
    # torch counts 2 FLOPs per MAC; scoring and matching (up to 1.1% on these tiny towers) are in its count, not ours
    assert counter.get_total_flops() / 2 == pytest.approx(macs, rel=0.015)


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_every_methods_analytic_macs_follow_where_it_reduces(method):
    """The count model places each block's attention and MLP at the right token counts for the
    method's hook (start, after attention, end): torch's counter sees the same, up to the method's
    own scoring, which is counted by torch and not by the model."""
    model = build("vit", depth=6)
    use_eager_attention(model)
    tokenreduce.apply(model, method, **REDUCING[method])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images(batch=1))
    rec = tokenreduce.record(model)
    hook = tokenreduce.api.patch_of(model).method.hook
    macs = model_macs(locate(model)[2], model, rec.input_tokens, rec.tokens_per_layer, hook)
    assert macs <= counter.get_total_flops() / 2 <= macs * SCORING_ALLOWANCE.get(method, 1.03)


def test_peak_memory_sees_a_large_temporary():
    def fn():
        big = torch.ones(1024, 1024)  # 4 MiB, freed before the small one is made
        del big
        return torch.ones(10)

    assert 4 * 2**20 <= peak_memory_bytes(fn, torch.device("cpu")) < 5 * 2**20


def test_run_bench_reports_every_method_against_none():
    results = run_bench(build("vit"), [MethodSpec("tome", {"r": 6}), MethodSpec("evit")], batch_size=2, img_size=32, repeats=2)
    assert [r.method for r in results] == ["none", "tome:r=6", "evit"]
    none, tome, _ = results
    assert none.speedup == 1.0 and none.flops_speedup == 1.0 and none.reduce_share == 0.0
    assert tome.tokens_per_layer == [59, 53, 47, 41] and tome.gflops < none.gflops
    assert tome.flops_speedup == pytest.approx(none.gflops / tome.gflops)
    assert 0 < tome.reduce_share < 1 and len(tome.times_ms) == 2 and tome.peak_memory_mib > 0
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        run_bench(build("vit"), [MethodSpec("none")], repeats=0)


def test_run_bench_leaves_the_callers_model_as_it_was():
    model = build("vit").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_bench(model, [MethodSpec("tome", {"r": 2})], batch_size=1, img_size=32, repeats=1, dtype=torch.bfloat16)
    assert model.training and not tokenreduce.is_patched(model)
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_progress_counts_every_forward_including_memory_and_share_passes():
    ticks = []
    specs = [MethodSpec("tome", {"r": 2}), MethodSpec("evit")]
    run_bench(build("vit"), specs, batch_size=1, img_size=32, repeats=3, warmup=2, progress=ticks.append)
    # 3 models (with the baseline) x (first + 1 warmup + 3 repeats + memory) + 2 reduce-share passes
    assert sum(ticks) == steps(specs, repeats=3, warmup=2) == 3 * 6 + 2


def test_load_warning():
    assert load_warning((0.1, 0.1, 0.1), (1.9, 1.0, 0.5), threads=2, cores=2) is None
    assert "1-minute load average 1.50 before" in load_warning((1.5, 1, 1), (2.0, 1, 1), threads=2, cores=2)
    assert "3.10 after the run on 2 cores" in load_warning((0.0, 0, 0), (3.1, 1, 1), threads=1, cores=2)


def test_vlm_bench_reports_tokens_flops_and_cache_against_the_unpatched_model():
    from conftest import tiny_llava
    from tokenreduce.bench.vlm import run_vlm_bench

    model = tiny_llava()
    specs = parse_specs("divprune:keep_tokens=4,tome:r=3")
    results = run_vlm_bench(model, specs, prompt_tokens=6, new_tokens=3, repeats=1)
    none, divprune, tome = results
    assert [r.method for r in results] == ["none", "divprune:keep_tokens=4", "tome:r=3"]
    assert (none.visual_tokens, divprune.visual_tokens, tome.visual_tokens) == (16, 4, 13)
    assert (none.llm_tokens, divprune.llm_tokens) == (22, 10)
    assert divprune.llm_prefill_gflops < none.llm_prefill_gflops and divprune.kv_cache_mib < none.kv_cache_mib
    assert tome.prefill_gflops < none.prefill_gflops and none.speedup == 1.0
    assert 0 < divprune.reduce_share < 1 and divprune.decode_tokens_per_s > 0 and divprune.params["keep_tokens"] == 4
    assert not tokenreduce.is_patched(model)


def test_llm_prefill_macs_match_torch_flop_counter():
    from conftest import tiny_llava
    from tokenreduce.bench.vlm import llm_prefill_macs

    model = tiny_llava()
    model.set_attn_implementation("eager")
    text, head = model.model.language_model, model.get_output_embeddings()
    embeds = torch.randn(1, 37, 64)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        hidden = text(inputs_embeds=embeds).last_hidden_state
        head(hidden[:, -1:])
    assert counter.get_total_flops() / 2 == pytest.approx(llm_prefill_macs(text, head, 37), rel=0.01)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl", "gemma3"])
def test_vlm_bench_builds_each_familys_prompt(family):
    from conftest import tiny_vlm
    from tokenreduce.bench.vlm import run_vlm_bench

    none, pruned = run_vlm_bench(tiny_vlm(family), parse_specs("random:keep_ratio=0.5"), prompt_tokens=4, new_tokens=2, repeats=1)
    assert pruned.visual_tokens == round(none.visual_tokens / 2)
    assert none.llm_tokens - pruned.llm_tokens == none.visual_tokens - pruned.visual_tokens
    assert pruned.prefill_gflops < none.prefill_gflops and pruned.kv_cache_mib < none.kv_cache_mib


def test_counted_vision_macs_include_sdpa_attention():
    from conftest import tiny_llava
    from tokenreduce.bench.flops import counted_macs

    pixels = torch.randn(1, 3, 32, 32)
    counts = []
    for attention in ("eager", "sdpa"):
        model = tiny_llava()
        model.set_attn_implementation(attention)
        counts.append(counted_macs(lambda m=model: m.model.get_image_features(pixel_values=pixels)))
    assert counts[0] == counts[1] > 0


def test_vlm_bench_counts_each_llm_layer_at_its_own_length():
    from conftest import tiny_llava
    from tokenreduce.bench.vlm import run_vlm_bench

    specs = parse_specs("fastv:layer=2:keep_ratio=0.25,pdrop:layers=(1,2,3)")
    none, fastv, pdrop = run_vlm_bench(tiny_llava(), specs, prompt_tokens=6, new_tokens=3, repeats=1)
    assert (fastv.visual_tokens, pdrop.visual_tokens) == (4, 2)
    assert fastv.llm_tokens == round((22 * 2 + 10 * 2) / 4) and pdrop.llm_tokens == round((22 + 14 + 10 + 8) / 4)
    assert none.llm_prefill_gflops > fastv.llm_prefill_gflops > 0 and fastv.kv_cache_mib < none.kv_cache_mib
    assert 0 < fastv.reduce_share < 1 and 0 < pdrop.reduce_share < 1
