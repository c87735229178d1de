"""VFlowOpt: attention relevance x feature entropy, progressive pruning with recycling, hyper-parameters
searched (``tokenreduce calibrate --vlm --method vflowopt``); naive oracles in naive_vflowopt.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_gsearch import calibration, degradation
from test_llm_pruning import assert_equals_unpatched_with_pruned_hidden, check_stages, llava_inputs

import naive_vflowopt as naive
import tokenreduce
from conftest import IMAGE_TOKEN, reduce_batch_and_singles, tiny_llava, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits
from tokenreduce.cli import main
from tokenreduce.methods.vflowopt import vflowopt_search

pytest.importorskip("transformers")

RATIOS = [0.5, 0.25, 0.1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("recycle", [True, False])
def test_batch_equals_singles_and_remove_restores(family, recycle):
    rec = reduce_batch_and_singles(family, "vflowopt", recycle=recycle)
    n = rec.images[0].placeholders
    assert [s.layer for s in rec.steps] == [1, 2, 3]
    counts = [n] + [max(1, round(r * n)) for r in RATIOS]
    assert all(im.kept == counts[-1] for im in rec.images)
    text = rec.input_lengths[-1] - n
    assert [lengths[-1] for lengths in rec.layer_lengths] == [text + k for k in counts]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keeping_everything_is_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, "vflowopt", ratios=[1, 1])
    assert torch.equal(vlm_logits(model, kw), want)
    assert torch.equal(vlm_generate(model, kw, 4), want_gen)


def test_pruned_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked():
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "vflowopt", recycle=False)
    assert_equals_unpatched_with_pruned_hidden(model, tiny_llava(), kw, eager=False)


def test_recycled_generate_continues_its_own_prefill():
    """With recycling there is no masked-model equivalent: generate's first token is the prefill's argmax."""
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "vflowopt")
    first = vlm_logits(model, kw)[:, -1].argmax(dim=-1)
    assert torch.equal(vlm_generate(model, kw, 4)[:, 0], first)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_each_stage_keeps_the_naive_importance_ranking(alpha):
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "vflowopt", alpha=alpha, recycle=False)

    def check(j, step, out, row, candidates):
        k = max(1, round(RATIOS[j] * 16))
        start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
        last = int(kw["attention_mask"][row].nonzero()[-1])
        probs, hidden = out.attentions[step.layer][row], out.hidden_states[step.layer][row]
        want = naive.importance_rank(probs, hidden, start, last, candidates, k, alpha)
        assert step.kept[row].tolist() == want, (j, row)

    check_stages(model, kw, check, output_attentions=True, output_hidden_states=True)


def test_the_entropy_changes_the_ranking():
    kw = llava_inputs()
    kept = []
    for alpha in (0.0, 3.0):
        model = tokenreduce.apply(tiny_llava(), "vflowopt", alpha=alpha)
        vlm_logits(model, kw)
        kept.append([k.tolist() for k in tokenreduce.record(model).steps[0].kept])
    assert kept[0] != kept[1]


def test_recycling_averages_each_dropped_token_into_its_most_similar_kept_one():
    kw = {k: v[1:] for k, v in llava_inputs().items()}  # one unpadded prompt: the image sits at the same place
    start = int((kw["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    seen = {}
    model = tokenreduce.apply(tiny_llava(), "vflowopt", recycle=True)
    norm = model.model.language_model.layers[1].input_layernorm  # reads the scored input, then the pruned one

    def capture(module, args) -> None:
        seen["x"] = args[0]

    hook = norm.register_forward_pre_hook(capture)
    vlm_logits(model, kw)
    hook.remove()
    kept = tokenreduce.record(model).steps[0].kept[0].tolist()
    with torch.no_grad():
        states = tiny_llava()(**kw, output_hidden_states=True).hidden_states[1][0, start : start + 16]
    want = torch.stack(naive.recycled(states, kept)).float()
    assert seen["x"].shape[1] == kw["input_ids"].shape[1] - 16 + len(kept)
    got = seen["x"][0, start : start + len(kept)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, states[kept], atol=1e-3)  # the kept tokens did change


def test_search_is_deterministic_for_a_seed_and_keeps_the_best_draw():
    model = tiny_llava()
    batches = calibration(model)
    result = vflowopt_search(model, batches, trials=3, seed=1, ratios=[0.5, 0.25])
    again = vflowopt_search(model, batches, trials=3, seed=1, ratios=[0.5, 0.25])
    assert {**again, "seconds": 0} == {**result, "seconds": 0}
    other = vflowopt_search(model, batches, trials=3, seed=2, ratios=[0.5, 0.25])
    assert [t["alpha"] for t in other["trials"]] != [t["alpha"] for t in result["trials"]]
    assert len(result["trials"]) == 3 and result["forwards"] == 2 + 3 * 2
    assert result["degradation"] == min(t["degradation"] for t in result["trials"])
    for t in result["trials"]:
        assert 0.1 <= t["alpha"] <= 10 and len(t["layers"]) == 2 and t["layers"] == sorted(set(t["layers"]))
    config = dict(method="vflowopt", layers=result["layers"], ratios=[0.5, 0.25], alpha=result["alpha"])
    assert result["degradation"] == pytest.approx(degradation(model, batches, **config), rel=1e-4)


def test_calibrate_writes_hyper_parameters_vflowopt_loads(tmp_path, capsys):
    tiny_llava().save_pretrained(tmp_path / "vlm")
    out = tmp_path / "s.json"
    argv = ["calibrate", "--vlm", "--checkpoint", str(tmp_path / "vlm"), "--method", "vflowopt", "--trials", "2"]
    argv += ["--prompts", "2", "--prompt-tokens", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert "calibrated vflowopt" in capsys.readouterr().out
    assert data["method"] == "vflowopt" and data["layers"] == [1, 2, 3] and len(data["trials"]) == 2
    assert main(argv) == 0 and json.loads(out.read_text())["alpha"] == data["alpha"]  # same seed, same draw
    model = tokenreduce.apply(tiny_llava(), "vflowopt", schedule=str(out))
    assert model is not None and tokenreduce.make_method("vflowopt", schedule=str(out)).alpha == data["alpha"]
    vlm_logits(model, llava_inputs())
    assert tokenreduce.record(model).images[0].kept == 2
    with pytest.raises(SystemExit):
        main([*argv, "--tolerance", "0.1"])
    assert "--tolerance applies to --method gsearch or btp; vflowopt takes --trials" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, error, match",
    [
        (dict(ratios=[0.5, 0.6]), ValueError, "ratios must be a non-empty, non-increasing"),
        (dict(layers=[2, 1, 3]), ValueError, "layers must be 3 increasing layer indices"),
        (dict(layers=[1, 2, 4]), ValueError, r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(alpha=-1), ValueError, r"alpha must be a number in \[0, 100\]"),
        (dict(recycle="yes"), TypeError, "recycle must be"),
        (dict(positions="shift"), ValueError, "positions must be one of"),
        (dict(schedule="missing.json"), ValueError, "schedule file 'missing.json' cannot be read"),
    ],
)
def test_bad_config_raises_naming_the_argument(config, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, "vflowopt", **config)
    assert not tokenreduce.is_patched(model)


def test_search_on_qwen2_vl_m_rope():
    from tokenreduce.bench.vlm import prompt_inputs

    model = tiny_vlm("qwen2_vl")
    batches = [prompt_inputs(model, 2, 4, seed=5)]
    result = vflowopt_search(model, batches, trials=2, seed=0, ratios=[0.5, 0.25])
    config = dict(method="vflowopt", layers=result["layers"], ratios=[0.5, 0.25], alpha=result["alpha"])
    assert result["degradation"] == pytest.approx(degradation(model, batches, **config), rel=1e-4)
