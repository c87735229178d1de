"""The VLM bench covers every VLM method: each has a case on a named config, and every case runs."""

from __future__ import annotations

import json

import pytest

import tokenreduce
from tokenreduce.bench import vlm
from tokenreduce.bench.vlm import BENCH_CASES, NAMED_VLMS, NamedVLM, bench_cases, run_vlm_bench
from tokenreduce.registry import method_classes, method_names
from tokenreduce.stages import Stage

# Visual tokens (Mllama: image features) of one prompt of each named config, as its docstring gives them.
VISUAL_TOKENS = {"llava-cpu": 576, "llava-next-cpu": 1312, "llava-onevision-video-cpu": 8 * 196 + 1, "mllama-cpu": 4 * 257}


def vlm_methods() -> set[str]:
    """Registered methods acting between the vision side and the LLM or inside it (stacks included)."""
    return {n for n in method_names() if {Stage.PRE_LLM, Stage.LLM} & {Stage(s) for s in method_classes(n)}}


def test_every_vlm_method_has_a_bench_case():
    missing = sorted(vlm_methods() - set(BENCH_CASES))
    assert not missing, f"add a bench case for {missing} to BENCH_CASES in tokenreduce/bench/vlm.py"
    assert set(BENCH_CASES) <= vlm_methods(), "BENCH_CASES names methods that are not registered VLM methods"
    for method, (model, config) in BENCH_CASES.items():
        assert model in NAMED_VLMS, f"{method}: {model!r} is not a named config"
        tokenreduce.make_method(method, **config)


@pytest.mark.parametrize("name", sorted(NAMED_VLMS))
def test_every_bench_case_runs_on_its_config(name):
    """Each named config's cases in one bench run on its tiny version (test widths, the named config's
    token counts and layers, so the cases' budgets hold as they do at full size)."""
    named = NAMED_VLMS[name]
    specs = bench_cases(name)
    results = run_vlm_bench(
        named.build(True), specs, prompt_tokens=8, new_tokens=2, repeats=1, warmup=0, video_frames=named.video_frames
    )
    assert [r.method for r in results] == [s.label for s in specs]
    none, *reduced = results
    assert none.visual_tokens == VISUAL_TOKENS[name]
    for r in reduced:
        assert r.visual_tokens <= none.visual_tokens and r.prefill_gflops > 0 and r.kv_cache_mib > 0, r.method


def test_a_method_its_config_cannot_take_raises_the_adapters_error():
    with pytest.raises(TypeError, match="cross-attention layers"):
        run_vlm_bench(vlm.mllama_cpu(True), [bench_cases("llava-cpu")[1]], new_tokens=2, repeats=1, warmup=0)


def test_cli_bench_gives_a_named_video_config_its_video_and_its_cases(tmp_path, monkeypatch, capsys):
    from tokenreduce.cli import main

    tiny = NamedVLM(lambda _: vlm.llava_onevision_video_cpu(True), video_frames=2)
    monkeypatch.setitem(NAMED_VLMS, "llava-onevision-video-cpu", tiny)
    out = tmp_path / "video.json"
    argv = ["bench", "--vlm", "--model", "llava-onevision-video-cpu", "--prompt-tokens", "4", "--new-tokens", "2"]
    assert main([*argv, "--repeats", "1", "--warmup", "0", "--quiet", "--json", str(out)]) == 0
    assert "4 text tokens + a 2-frame video" in capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == [s.label for s in bench_cases("llava-onevision-video-cpu")]  # its cases are its default
    assert rows["none"]["visual_tokens"] == 2 * 196 + 1 and rows["fastvid"]["visual_tokens"] < 2 * 196


def test_an_unknown_model_lists_the_named_configs():
    from tokenreduce.loading import create_hf_vlm

    names = "llava-cpu, llava-next-cpu, llava-onevision-video-cpu, mllama-cpu"
    with pytest.raises(ValueError, match=f"the built-in ones are {names}"):
        create_hf_vlm("no-such-vlm")


def test_virtual_unmerging_counts_attention_over_the_full_prompt():
    """DyMU's attention (projections, QK^T and AV) runs over every patch while its MLP runs over the
    merged tokens: the count puts each at its own length."""
    from conftest import tiny_llava

    model = tiny_llava()
    text, head = model.model.language_model, model.get_output_embeddings()
    layer = text.layers[0]
    width = layer.self_attn.q_proj.out_features
    attn = sum(m.in_features * m.out_features for m in layer.self_attn.modules() if hasattr(m, "in_features"))
    merged, full = vlm.llm_prefill_macs(text, head, 10), vlm.llm_prefill_macs(text, head, 10, 30)
    assert vlm.llm_prefill_macs(text, head, 10, 10) == merged
    assert full - merged == len(text.layers) * (attn * 20 + 2 * width * (30 * 30 - 10 * 10))
