"""G-Search and P-Sigmoid: per-layer keep schedules inside the LLM, their searches (``tokenreduce
calibrate --vlm``) and schedule files; naive oracles in naive_gsearch.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_llm_pruning import assert_equals_unpatched_with_pruned_hidden, check_stages, llava_inputs

import naive_gsearch as naive
import tokenreduce
from conftest import IMAGE_TOKEN, reduce_batch_and_singles, tiny_llava, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits
from tokenreduce.cli import main
from tokenreduce.methods.gsearch import g_search, p_sigmoid_search

pytest.importorskip("transformers")

SCHEDULE = [1.0, 0.5, 0.5, 0.25]  # 16 -> 8 before layer 1, -> 4 before layer 3
CONFIGS = {"gsearch": dict(schedule=SCHEDULE), "psigmoid": dict(slope=6.0, midpoint=0.6)}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_batch_equals_singles_and_remove_restores(family, method):
    rec = reduce_batch_and_singles(family, method, **CONFIGS[method])
    n = rec.images[0].placeholders
    rates = SCHEDULE if method == "gsearch" else naive.sigmoid_schedule(6.0, 0.6, 4)
    layers = naive.pruning_layers(rates)
    assert [s.layer for s in rec.steps] == layers
    counts = naive.kept_per_layer(rates, n)
    assert all(im.kept == counts[-1] for im in rec.images)
    text = rec.input_lengths[-1] - n
    assert [lengths[-1] for lengths in rec.layer_lengths] == [text + k for k in counts]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_keep_all_schedule_is_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, "gsearch", schedule=[1, 1, 1, 1])
    assert torch.equal(vlm_logits(model, kw), want)
    assert torch.equal(vlm_generate(model, kw, 4), want_gen)
    assert not tokenreduce.record(model).steps


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_pruned_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked(method):
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), method, **CONFIGS[method])
    assert_equals_unpatched_with_pruned_hidden(model, tiny_llava(), kw, eager=False)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_each_layer_keeps_what_the_naive_per_layer_ranking_keeps(method):
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), method, **CONFIGS[method])
    rates = SCHEDULE if method == "gsearch" else naive.sigmoid_schedule(6.0, 0.6, 4)
    counts = naive.kept_per_layer(rates, 16)

    def check(j, step, out, row, candidates):  # the pruning layer's own attention
        start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
        last = int(kw["attention_mask"][row].nonzero()[-1])
        want = naive.rank_by_last_token(out.attentions[step.layer][row], start, last, candidates, counts[step.layer])
        assert step.kept[row].tolist() == want, (j, row)

    check_stages(model, kw, check, output_attentions=True)
    assert [s.layer for s in tokenreduce.record(model).steps] == naive.pruning_layers(rates)


def calibration(model, seeds=(5, 6)) -> list[dict]:
    from tokenreduce.bench.vlm import prompt_inputs

    return [prompt_inputs(model, 2, 4, seed=s) for s in seeds]


def degradation(model, batches, rates=None, method="gsearch", **config) -> float:
    """The objective computed apart from the search's: the pruned model's last logits against the
    unpruned model's."""
    want = [vlm_logits(model, b)[:, -1] for b in batches]
    tokenreduce.apply(model, method, **(dict(schedule=rates) if rates is not None else config))
    got = [vlm_logits(model, b)[:, -1] for b in batches]
    tokenreduce.remove(model)
    return sum(naive.relative_change(g, w) for g, w in zip(got, want)) / len(batches)


def test_g_search_is_greedy_minimal_within_tolerance_and_deterministic():
    model, tolerance = tiny_llava(), 0.2
    batches = calibration(model)
    result = g_search(model, batches, tolerance)
    assert g_search(model, batches, tolerance)["rates"] == result["rates"]
    counts = result["counts"]
    assert counts[0] == 16 and counts == sorted(counts, reverse=True) and counts[-1] < 16  # it found something to drop
    assert result["forwards"] > 2 and result["prompts"] == 4 and result["seconds"] > 0
    assert result["degradation"] == pytest.approx(degradation(model, batches, result["rates"]), rel=1e-4)
    assert result["degradation"] <= tolerance
    for layer in range(1, 4):  # one token fewer at a layer (the later ones following) breaks the tolerance
        if counts[layer] > 1:
            fewer = counts[:layer] + [counts[layer] - 1] * (4 - layer)
            assert degradation(model, batches, [c / 16 for c in fewer]) > tolerance, layer
    assert g_search(model, batches, 0.0)["counts"] == [16] * 4


def test_g_search_on_qwen2_vl_m_rope():
    from tokenreduce.bench.vlm import prompt_inputs

    model = tiny_vlm("qwen2_vl")
    batches = [prompt_inputs(model, 2, 4, seed=5)]
    result = g_search(model, batches, 0.2)
    counts = result["counts"]
    assert counts[0] == result["tokens"] > counts[-1] and counts == sorted(counts, reverse=True)
    assert result["degradation"] == pytest.approx(degradation(model, batches, result["rates"]), rel=1e-4)
    assert result["degradation"] <= 0.2


def test_p_sigmoid_meets_the_budget_and_keeps_the_best_trial_deterministically():
    model = tiny_llava()
    batches = calibration(model)
    result = p_sigmoid_search(model, batches, budget=0.6, trials=3, seed=1)
    again = p_sigmoid_search(model, batches, budget=0.6, trials=3, seed=1)
    assert {**again, "seconds": 0} == {**result, "seconds": 0}
    other = p_sigmoid_search(model, batches, budget=0.6, trials=3, seed=2)
    assert [t["slope"] for t in other["trials"]] != [t["slope"] for t in result["trials"]]
    rates = naive.sigmoid_schedule(result["slope"], result["midpoint"], 4)
    assert result["rates"] == pytest.approx(rates) and sum(rates) / 4 == pytest.approx(0.6)
    assert result["degradation"] == min(t["degradation"] for t in result["trials"])
    assert len(result["trials"]) == 3 and result["forwards"] == 2 + 3 * 2
    want = degradation(model, batches, method="psigmoid", slope=result["slope"], midpoint=result["midpoint"])
    assert result["degradation"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("method", ["gsearch", "psigmoid"])
def test_calibrate_writes_a_schedule_the_method_loads(tmp_path, capsys, method):
    tiny_llava().save_pretrained(tmp_path / "vlm")
    out = tmp_path / "s.json"
    search = ["--tolerance", "0.2"] if method == "gsearch" else ["--budget", "0.5", "--trials", "3"]
    argv = ["calibrate", "--vlm", "--checkpoint", str(tmp_path / "vlm"), "--method", method, *search]
    argv += ["--prompts", "3", "--batch-size", "2", "--prompt-tokens", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert f"calibrated {method}" in printed and f"{data['forwards']} forward passes in" in printed
    assert data["prompts"] == 3 and len(data["rates"]) == 4 and data["seed"] == 0
    assert main(argv) == 0 and json.loads(out.read_text())["rates"] == data["rates"]  # same seed, same schedule
    model = tokenreduce.apply(tiny_llava(), method, schedule=str(out))
    counts = naive.kept_per_layer(data["rates"], 16)
    layers = naive.pruning_layers(data["rates"])
    vlm_logits(model, llava_inputs())
    rec = tokenreduce.record(model)
    assert [s.layer for s in rec.steps] == layers and rec.images[0].kept == counts[-1]


def save_llava_with_processor(folder) -> None:
    """The tiny LLaVA and a processor for it (a word-level tokenizer, ``<image>`` = its image token)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "USER:", "ASSISTANT:", "describe", "the", "image", "what", "is", "this"]
    vocab = {**{w: i for i, w in enumerate(words)}, "<image>": IMAGE_TOKEN}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = T.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", extra_special_tokens={"image_token": "<image>"}
    )
    images = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layout = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor = T.LlavaProcessor(image_processor=images, tokenizer=fast, **layout)
    tiny_llava().save_pretrained(folder)
    processor.save_pretrained(folder)


def test_calibrate_on_a_folder_of_images_and_prompts(tmp_path, capsys):
    from PIL import Image

    save_llava_with_processor(tmp_path / "vlm")
    (tmp_path / "images").mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / "images" / f"img{i}.png")
    (tmp_path / "prompts.txt").write_text("USER: <image> describe the image ASSISTANT:\nUSER: <image> what is this ASSISTANT:\n")
    out = tmp_path / "s.json"
    argv = ["calibrate", str(tmp_path / "images"), "--vlm", "--checkpoint", str(tmp_path / "vlm"), "--text"]
    argv += [str(tmp_path / "prompts.txt"), "--tolerance", "0.2", "--batch-size", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["prompts"] == 3 and data["tokens"] == 16 and data["degradation"] <= 0.2
    assert "calibrated gsearch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(argv[:5] + ["--out", str(out)])
    assert "takes a folder of images and --text FILE (prompts) together" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, config, error, match",
    [
        ("gsearch", dict(), ValueError, "gsearch has no schedule: pass schedule='file.json'"),
        ("gsearch", dict(schedule=[1, 0.5, 0.5]), ValueError, r"schedule must have one keep rate per LLM layer \(4\), got 3"),
        ("gsearch", dict(schedule=[1, 0.5, 0.6, 0.5]), ValueError, "schedule must be non-increasing keep rates"),
        ("gsearch", dict(schedule=[0.9, 0.5, 0.5, 0.5]), ValueError, "schedule must be non-increasing .* starting at 1"),
        ("gsearch", dict(schedule=[1, 0.5, 0.0, 0.0]), ValueError, r"schedule\[2\] must be a number in \(0, 1\]"),
        ("gsearch", dict(schedule=0.5), TypeError, "schedule must be a sequence of keep rates"),
        ("gsearch", dict(schedule="missing.json"), ValueError, "schedule file 'missing.json' cannot be read"),
        ("psigmoid", dict(slope=0), ValueError, r"slope must be a number in \(0, inf\)|slope must be a number > 0"),
        ("psigmoid", dict(midpoint=11), ValueError, r"midpoint must be a number in \[-10, 10\]"),
        ("psigmoid", dict(positions="shift"), ValueError, "positions must be one of"),
    ],
)
def test_bad_config_raises_naming_the_argument(method, config, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


def test_bad_schedule_files_and_calibrate_options_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="schedule file .* is not JSON"):
        tokenreduce.make_method("gsearch", schedule=str(bad))
    bad.write_text(json.dumps({"rates": [1, 1, 1, 1]}))
    with pytest.raises(ValueError, match="was not written by `tokenreduce calibrate --vlm`"):
        tokenreduce.make_method("gsearch", schedule=str(bad))
    bad.write_text(json.dumps({"format": "tokenreduce-llm-schedule", "method": "gsearch", "rates": [1, 2, 1, 1]}))
    with pytest.raises(ValueError, match=r"schedule in '.*bad.json'\[1\] must be a number in \(0, 1\]"):
        tokenreduce.make_method("gsearch", schedule=str(bad))
    bad.write_text(json.dumps({"format": "tokenreduce-llm-schedule", "method": "gsearch", "rates": [1, 1, 1, 1]}))
    with pytest.raises(ValueError, match="holds a 'gsearch' schedule, not a psigmoid one"):
        tokenreduce.make_method("psigmoid", schedule=str(bad))
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"budget must be a number in \(0.25, 1\)"):
        p_sigmoid_search(model, calibration(model, (5,)), budget=0.2)
    with pytest.raises(ValueError, match="tolerance must be a number >= 0|tolerance must be a number in"):
        g_search(model, calibration(model, (5,)), tolerance=-1)
    for argv, match in [
        (["--method", "psigmoid"], "--method psigmoid needs --budget"),
        (["--method", "gsearch", "--budget", "0.5"], "--budget applies to --method psigmoid"),
        (["--prompts", "0"], "--prompts must be an integer >= 1"),
    ]:
        with pytest.raises(SystemExit):
            main(["calibrate", "--vlm", *argv, "--out", str(tmp_path / "x.json")])
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--tolerance", "0.1"])
    assert "--tolerance apply to calibrate --vlm" in capsys.readouterr().err
