"""BTP: diversity in the early stages, attention in the deep ones, stage layers calibrated
(``tokenreduce calibrate --vlm --method btp``); naive oracles in naive_btp.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_gsearch import calibration, degradation
from test_llm_pruning import assert_equals_unpatched_with_pruned_hidden, check_stages, llava_inputs

import naive_btp as naive
import tokenreduce
from conftest import IMAGE_TOKEN, reduce_batch_and_singles, tiny_llava, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits
from tokenreduce.cli import main
from tokenreduce.methods.btp import btp_search

pytest.importorskip("transformers")

RATIOS = [0.5, 0.25, 0.125]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_equals_singles_and_remove_restores(family):
    rec = reduce_batch_and_singles(family, "btp")
    n = rec.images[0].placeholders
    assert [s.layer for s in rec.steps] == naive.stage_layers(3, 4) == [1, 2, 3]
    counts = [n] + [max(1, round(r * n)) for r in RATIOS]
    assert all(im.kept == counts[-1] for im in rec.images)
    text = rec.input_lengths[-1] - n
    assert [lengths[-1] for lengths in rec.layer_lengths] == [text + k for k in counts]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keeping_everything_is_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, "btp", ratios=[1, 1], diversity_stages=1)
    assert torch.equal(vlm_logits(model, kw), want)
    assert torch.equal(vlm_generate(model, kw, 4), want_gen)


@pytest.mark.parametrize("diversity_stages", [1, 2])
def test_pruned_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked(diversity_stages):
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "btp", diversity_stages=diversity_stages)
    assert_equals_unpatched_with_pruned_hidden(model, tiny_llava(), kw, eager=False)


@pytest.mark.parametrize("diversity_stages", [0, 1, 2, 3])
def test_each_stage_keeps_what_the_naive_rule_of_its_stage_keeps(diversity_stages):
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "btp", diversity_stages=diversity_stages)

    def check(j, step, out, row, candidates):
        k = max(1, round(RATIOS[j] * 16))
        start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
        last = int(kw["attention_mask"][row].nonzero()[-1])
        if j < diversity_stages:  # hidden_states[l] is layer l's input
            want = naive.diverse(out.hidden_states[step.layer][row], start, candidates, k)
        else:
            want = naive.attended(out.attentions[step.layer][row], start, last, candidates, k)
        assert step.kept[row].tolist() == want, (j, row)

    check_stages(model, kw, check, output_attentions=True, output_hidden_states=True)


def test_the_stage_rules_differ():
    """Diversity and attention pick different tokens here, so the oracle test can tell them apart."""
    kw = llava_inputs()
    kept = []
    for stages in (0, 1):
        model = tokenreduce.apply(tiny_llava(), "btp", diversity_stages=stages)
        vlm_logits(model, kw)
        kept.append([k.tolist() for k in tokenreduce.record(model).steps[0].kept])
    assert kept[0] != kept[1]


def test_search_picks_the_shallowest_layer_within_tolerance_deterministically():
    model, ratios = tiny_llava(), [0.5, 0.25]
    batches = calibration(model)
    one = dict(method="btp", ratios=[0.5], diversity_stages=1)
    values = {layer: degradation(model, batches, layers=[layer], **one) for layer in (1, 2)}
    # layer 1 fails the tolerance: layer 2 is picked when within it, else the layer of least degradation
    tolerance = (values[1] + values[2]) / 2 if values[1] > values[2] else values[1] / 2
    result = btp_search(model, batches, tolerance, ratios)
    again = btp_search(model, batches, tolerance, ratios)
    assert {**again, "seconds": 0} == {**result, "seconds": 0}
    first = 2 if values[2] <= tolerance else 1
    assert result["layers"][0] == first and result["layers"][1] > first
    assert result["diversity_stages"] == 1 and result["ratios"] == ratios and result["tokens"] == 16
    want = degradation(model, batches, method="btp", layers=result["layers"], ratios=ratios, diversity_stages=1)
    assert result["degradation"] == pytest.approx(want, rel=1e-4)
    rates = [1.0] * 4
    for layer, ratio in zip(result["layers"], ratios):
        rates[layer:] = [ratio] * (4 - layer)
    assert result["rates"] == rates and result["forwards"] > 2 and result["prompts"] == 4
    assert btp_search(model, batches, 1e9, ratios)["layers"] == [1, 2]  # all within: the shallowest


def test_calibrate_writes_stages_btp_loads(tmp_path, capsys):
    tiny_llava().save_pretrained(tmp_path / "vlm")
    out = tmp_path / "s.json"
    argv = ["calibrate", "--vlm", "--checkpoint", str(tmp_path / "vlm"), "--method", "btp", "--tolerance", "0.2"]
    argv += ["--prompts", "2", "--prompt-tokens", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "calibrated btp" in printed and "stage layers [1, 2, 3]" in printed
    assert data["method"] == "btp" and data["layers"] == [1, 2, 3] and data["diversity_stages"] == 1
    model = tokenreduce.apply(tiny_llava(), "btp", schedule=str(out))
    vlm_logits(model, llava_inputs())
    rec = tokenreduce.record(model)
    assert [s.layer for s in rec.steps] == [1, 2, 3] and rec.images[0].kept == 2
    gsearch = tokenreduce.apply(tiny_llava(), "gsearch", schedule=str(out))  # any schedule file holds rates
    vlm_logits(gsearch, llava_inputs())
    assert [s.layer for s in tokenreduce.record(gsearch).steps] == [1, 2, 3]
    for searched in (dict(ratios=(0.5, 0.5, 0.5)), dict(diversity_stages=2)):  # never silently overwritten
        with pytest.raises(ValueError, match=f"pass {next(iter(searched))} or schedule"):
            tokenreduce.make_method("btp", schedule=str(out), **searched)


@pytest.mark.parametrize(
    "config, error, match",
    [
        (dict(ratios=[0.5, 0.6]), ValueError, "ratios must be a non-empty, non-increasing"),
        (dict(ratios=[0.5, 0]), ValueError, r"ratios\[1\] must be a number in \(0, 1\]"),
        (dict(layers=[2, 1, 3]), ValueError, "layers must be 3 increasing layer indices"),
        (dict(layers=[1, 2, 4]), ValueError, r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(diversity_stages=4), ValueError, r"diversity_stages must be an integer in \[0, 3\]"),
        (dict(ratios=[0.9, 0.8, 0.7, 0.6]), ValueError, "an LLM of 4 layers cannot hold 4 pruning stages"),
        (dict(positions="shift"), ValueError, "positions must be one of"),
        (dict(schedule="missing.json"), ValueError, "schedule file 'missing.json' cannot be read"),
    ],
)
def test_bad_config_raises_naming_the_argument(config, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, "btp", **config)
    assert not tokenreduce.is_patched(model)


def test_schedule_files_of_other_methods_are_refused(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps({"format": "tokenreduce-llm-schedule", "method": "gsearch", "rates": [1, 1, 1, 1]}))
    with pytest.raises(ValueError, match="holds a 'gsearch' schedule, not a btp one"):
        tokenreduce.make_method("btp", schedule=str(bad))
    with pytest.raises(ValueError, match="pass layers or schedule"):
        tokenreduce.make_method("btp", schedule=str(bad), layers=[1, 2, 3])


def test_search_on_qwen2_vl_m_rope():
    from tokenreduce.bench.vlm import prompt_inputs

    model = tiny_vlm("qwen2_vl")
    batches = [prompt_inputs(model, 2, 4, seed=5)]
    result = btp_search(model, batches, 1e9, [0.5, 0.25])
    assert result["layers"] == [1, 2] and result["tokens"] > 0
    want = degradation(model, batches, method="btp", layers=[1, 2], ratios=[0.5, 0.25], diversity_stages=1)
    assert result["degradation"] == pytest.approx(want, rel=1e-4)
