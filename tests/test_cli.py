"""The command line end to end: results, weights, and errors that come before anything slow."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import tokenreduce
import tokenreduce.cli as cli
from tokenreduce.cli import main
from tokenreduce.loading import create_timm_model
from tokenreduce.registry import method_classes
from tokenreduce.stages import Stage

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "64"]
BENCH = ["bench", *TINY, "--batch-size", "2", "--repeats", "1", "--threads", "1", "--quiet"]


def fails(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == code
    return capsys.readouterr().err


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if the command builds any model: its error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the request was checked")

    monkeypatch.setattr(cli, "create_timm_model", refuse)


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    pixels = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--methods", "tome:r=1,topk:keep_rate=0.5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tome:r=1" in table and "speedup" in table and "FLOP-ideal" in table
    data = json.loads(out.read_text())
    env = data["environment"]
    assert env["threads"] == 1 and env["model"] == "vit_tiny_patch16_224" and env["weights"] == "random"
    assert len(env["load_avg_before"]) == 3 and len(env["load_avg_after"]) == 3 and isinstance(env["warnings"], list)
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"none", "tome:r=1", "topk:keep_rate=0.5"}
    for key in ("method", "params", "images_per_s", "gflops", "speedup", "flops_speedup", "tokens_per_layer"):
        assert key in rows["tome:r=1"]
    assert rows["tome:r=1"]["tokens_per_layer"] == list(range(16, 4, -1))


def test_cli_bench_csv_uses_timm_column_names(tmp_path, capsys):
    out, js = tmp_path / "bench.csv", tmp_path / "bench.json"
    assert main([*BENCH, "--methods", "tome:r=1", "--csv", str(out), "--json", str(js)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == [
        *("model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "param_count", "infer_gmacs", "img_size")
    ]
    assert [r["method"] for r in rows] == ["none", "tome:r=1"]
    results = {r["method"]: r for r in json.loads(js.read_text())["results"]}
    tome, none = rows[1], rows[0]
    assert tome["model"] == "vit_tiny_patch16_224" and tome["img_size"] == "64" and tome["infer_batch_size"] == "2"
    assert json.loads(tome["config"])["r"] == 1 and tome["tokens_out"] == "5" and none["tokens_out"] == "17"
    params = sum(p.numel() for p in create_timm_model("vit_tiny_patch16_224", img_size=64).parameters())
    assert float(tome["param_count"]) == round(params / 1e6, 2)  # millions, as timm's results list them
    assert float(tome["infer_gmacs"]) == round(results["tome:r=1"]["gflops"], 3)
    assert float(tome["speedup"]) == results["tome:r=1"]["speedup"]


def test_cli_bench_preset_runs_every_method_at_matched_flops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--img-size", "224", "--preset", "matched-flops", "--flops-fraction", "0.63", "--json", str(out)]) == 0
    rows = {r["method"].split(":")[0]: r for r in json.loads(out.read_text())["results"]}
    encoders = [n for n in tokenreduce.list_methods() if Stage.ENCODER in method_classes(n)]
    # every encoder method but dtome, whose counts are read from the images (no plan to match)
    assert set(rows) == set(encoders) - {"dtome"}
    for name in rows:
        assert rows[name]["gflops"] / rows["none"]["gflops"] == pytest.approx(0.63, abs=0.05) or name == "none", name
    capsys.readouterr()
    assert main([*BENCH, "--img-size", "224", "--preset", "matched-flops", "--methods", "evit"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert rows[0] == "none" and rows[1].startswith("evit:keep_rate=0.6") and len(rows) == 2


def test_cli_bench_preset_errors(capsys):
    assert "--preset sets each method's config" in fails([*BENCH, "--preset", "matched-flops", "--methods", "tome:r=2"], capsys)
    assert "pass --preset matched-flops" in fails([*BENCH, "--flops-fraction", "0.5"], capsys)
    assert "--flops-fraction must be in (0, 1]" in fails([*BENCH, "--preset", "matched-flops", "--flops-fraction", "1.5"], capsys)
    assert "no config of ['tome']" in fails(
        [*BENCH, "--preset", "matched-flops", "--methods", "tome", "--flops-fraction", "0.01"], capsys
    )


def test_cli_bench_warns_when_the_machine_is_busy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (9.5, 8.0, 7.0))
    out = tmp_path / "bench.json"
    assert main([*BENCH, "--methods", "tome:r=1", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: machine busy: 1-minute load average 9.50 before and 9.50 after" in err
    assert "machine busy" in json.loads(out.read_text())["environment"]["warnings"][0]


def test_cli_errors_name_the_problem(capsys):
    assert "r=4 at layer 3 exceeds half" in fails([*BENCH, "--methods", "tome:r=4"], capsys)
    assert "no tokenreduce adapter for ResNet" in fails(["bench", "--model", "resnet18", "--quiet"], capsys)
    assert "unknown timm model 'not_a_model'" in fails(["bench", "--model", "not_a_model"], capsys)
    assert "--repeats must be an integer >= 1, got 0" in fails([*BENCH, "--repeats", "0"], capsys)


def test_cli_checks_before_building_a_model(tmp_path, capsys, no_model_built, image):
    assert "unknown method 'nope'" in fails([*BENCH, "--methods", "nope"], capsys)
    assert "keep_rate must be a number in (0, 1]" in fails([*BENCH, "--methods", "evit:keep_rate=2"], capsys)
    assert "--json" in fails([*BENCH, "--json", str(tmp_path / "missing" / "out.json")], capsys)
    assert "image 'nowhere.png' does not exist" in fails(["viz", "nowhere.png", *TINY], capsys)
    (tmp_path / "text.png").write_text("not an image")
    assert "cannot be read as an image" in fails(["viz", str(tmp_path / "text.png"), *TINY], capsys)
    err = fails(["viz", str(image), *TINY, "--out", str(tmp_path / "no" / "dir" / "v.png")], capsys)
    assert "--out" in err and "does not exist" in err
    assert "unknown image format" in fails(["viz", str(image), *TINY, "--out", str(tmp_path / "v.xyz")], capsys)
    assert "is not a readable file" in fails([*BENCH, "--checkpoint", str(tmp_path / "missing.safetensors")], capsys)
    assert "must be one of .safetensors, .pth, .pt, .bin" in fails([*BENCH, "--checkpoint", str(image)], capsys)


def test_cli_viz_unsupported_model_and_partial_patches(image, capsys):
    start = time.perf_counter()
    assert "no tokenreduce adapter for ResNet" in fails(["viz", str(image), "--model", "resnet50"], capsys)
    err = fails(["viz", str(image), "--model", "vit_tiny_patch16_224", "--img-size", "200"], capsys)
    assert "--img-size 200 is not a multiple of the 16x16 patches of vit_tiny_patch16_224" in err and "192 or 208" in err
    assert time.perf_counter() - start < 10  # checked on weightless skeletons


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_unusable_device(capsys):
    assert "--device 'cuda' is not usable here" in fails([*BENCH, "--device", "cuda"], capsys)
    assert "--device 'warp9' is not usable here" in fails([*BENCH, "--device", "warp9"], capsys)


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out.strip() == f"tokenreduce {tokenreduce.__version__}"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_checkpoint_loads_local_weights(tmp_path, suffix, capsys):
    source = create_timm_model("vit_tiny_patch16_224", img_size=64)
    source.reset_classifier(7)  # a fine-tuned head: the loader resizes the model's to match
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    else:  # torch files as training scripts write them: wrapped and with DataParallel prefixes
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = create_timm_model("vit_tiny_patch16_224", img_size=64, checkpoint=path)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert main([*BENCH, "--methods", "tome:r=1", "--checkpoint", str(path)]) == 0
    assert "tome:r=1" in capsys.readouterr().out


def test_checkpoint_for_another_model_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "small.safetensors"
    save_file(create_timm_model("vit_small_patch16_224", img_size=64).state_dict(), path)
    err = fails([*BENCH, "--checkpoint", str(path)], capsys)
    assert "does not fit VisionTransformer" in err


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tokenreduce.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_cli_pretrained_offline_fails_fast_and_names_checkpoint():
    # The download path is real: with the hub unreachable (a refused port), the CLI notices within
    # seconds instead of retrying for a minute, and says how to bring weights another way.
    start = time.perf_counter()
    proc = run_cli("bench", *TINY, "--pretrained", "--quiet", HF_ENDPOINT="http://127.0.0.1:9")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    assert "could not load pretrained weights for 'vit_tiny_patch16_224' from the hub" in proc.stderr
    assert "cannot be reached from here" in proc.stderr and "--checkpoint PATH" in proc.stderr
    assert elapsed < 30


def test_cli_pretrained_respects_hub_offline_mode():
    proc = run_cli("bench", *TINY, "--pretrained", "--quiet", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1
    assert "could not load pretrained weights for 'vit_tiny_patch16_224' from the hub" in proc.stderr


def test_cli_methods_lists_everything(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in tokenreduce.list_methods():
        assert name in out


def test_cli_viz_writes_a_figure(tmp_path, capsys, image):
    from PIL import Image

    out = tmp_path / "viz.png"
    assert main(["viz", str(image), str(image), *TINY, "--methods", "tome:r=1,topk:keep_rate=0.5", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(out).size == (3 * 64, 18 + 2 * 64)


def test_cli_vlm_bench_on_a_saved_model(tmp_path, capsys):
    from conftest import tiny_llava

    tiny_llava().save_pretrained(tmp_path / "vlm")
    out = tmp_path / "vlm.json"
    argv = ["bench", "--vlm", "--checkpoint", str(tmp_path / "vlm"), "--methods", "divprune:keep_tokens=4"]
    assert (
        main(
            [
                *argv,
                "--prompt-tokens",
                "6",
                "--new-tokens",
                "3",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "divprune:keep_tokens=4" in table and "TTFT ms" in table and "KV MiB" in table
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["divprune:keep_tokens=4"]["visual_tokens"] == 4 and rows["none"]["visual_tokens"] == 16


def test_cli_vlm_bench_needs_weights_for_a_hub_model(capsys):
    err = fails(["bench", "--vlm", "--model", "llava-hf/llava-1.5-7b-hf", "--quiet"], capsys)
    assert "a hub VLM needs --pretrained (or --checkpoint DIR)" in err


def test_cli_viz_draws_what_a_vlm_kept(tmp_path, capsys, image):
    from PIL import Image

    from conftest import tiny_llava

    tiny_llava().save_pretrained(tmp_path / "vlm")
    out = tmp_path / "viz.png"
    argv = ["viz", str(image), "--vlm", "--checkpoint", str(tmp_path / "vlm"), "--methods", "divprune:keep_tokens=4,pool"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(out).size == (3 * 32, 18 + 32)


def test_cli_viz_refuses_a_vlm_it_cannot_draw(tmp_path, capsys, image):
    from conftest import tiny_vlm

    tiny_vlm("qwen2_vl").save_pretrained(tmp_path / "qwen")
    err = fails(["viz", str(image), "--vlm", "--checkpoint", str(tmp_path / "qwen"), "--out", str(tmp_path / "v.png")], capsys)
    assert "viz --vlm draws VLMs that read one square tile per image" in err and "Qwen2VLModel is not one" in err


def test_cli_vlm_bench_on_a_saved_qwen(tmp_path, capsys):
    from conftest import tiny_vlm

    tiny_vlm("qwen2_vl").save_pretrained(tmp_path / "qwen")
    argv = ["bench", "--vlm", "--checkpoint", str(tmp_path / "qwen"), "--methods", "visionzip:dominant=30:contextual=6"]
    assert main([*argv, "--repeats", "1", "--new-tokens", "2", "--threads", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "visionzip:dominant=30:contextual=6" in out and " 144 " in out and " 36 " in out


def test_cli_bench_eval_and_viz_on_a_saved_hugging_face_tower(tmp_path, capsys):
    from PIL import Image

    from conftest import build

    build("hf_dinov2").save_pretrained(tmp_path / "tower")
    bench = ["bench", "--checkpoint", str(tmp_path / "tower"), "--methods", "tome:r=4", "--batch-size", "2"]
    assert main([*bench, "--repeats", "1", "--threads", "1", "--quiet"]) == 0
    assert "tome:r=4" in capsys.readouterr().out
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 90, 200)).save(tmp_path / "photos" / f"{i}.png")
    evaluate = ["eval", "--model", "vit_small_patch16_224", "--checkpoint", str(tmp_path / "tower"), "--methods", "tome:r=4"]
    assert main([*evaluate, "--images", str(tmp_path / "photos"), "--threads", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| 32px |" in out and "feature cos" in out and "tome:r=4" in out
    figure = tmp_path / "viz.png"
    assert main(["viz", str(tmp_path / "photos" / "0.png"), "--checkpoint", str(tmp_path / "tower"), "--out", str(figure)]) == 0
    assert Image.open(figure).size == (3 * 32, 18 + 32)  # input and the two default methods
