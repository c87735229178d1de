"""Benchmark plumbing: spec parsing, the FLOP model against torch's counter, the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce
from conftest import build, images
from tokenreduce.adapters import find_adapter
from tokenreduce.bench import MethodSpec, model_macs, parse_specs, run_bench
from tokenreduce.bench.memory import peak_memory_bytes
from tokenreduce.cli import main


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


@pytest.mark.parametrize("model_name", ["vit", "deit_distilled", "qknorm_avg"])
@pytest.mark.parametrize(
    "method,config", [("none", {}), ("tome", dict(r=6)), ("evit", dict(keep_rate=0.5)), ("topk", dict(keep_rate=0.5))]
)
def test_analytic_macs_match_torch_flop_counter(model_name, method, config):
    model = build(model_name)
    for block in model.blocks:
        block.attn.fused_attn = False  # eager matmuls, which FlopCounterMode counts op by op
    tokenreduce.apply(model, method, **config)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images(batch=1))
    rec = tokenreduce.record(model)
    macs = model_macs(find_adapter(model), model, rec.input_tokens, rec.tokens_per_layer)
    # torch counts 2 FLOPs per MAC; scoring and matching (<1% here) are in its count, not ours
    assert counter.get_total_flops() / 2 == pytest.approx(macs, rel=0.01)


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


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "64",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--methods",
            "tome:r=1,topk:keep_rate=0.5",
            "--threads",
            "1",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "tome:r=1" in table and "speedup" in table and "FLOP-ideal" in table
    data = json.loads(out.read_text())
    assert data["environment"]["threads"] == 1 and data["environment"]["model"] == "vit_tiny_patch16_224"
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"none", "tome:r=1", "topk:keep_rate=0.5"}
    for key in ("method", "params", "images_per_s", "gflops", "speedup", "flops_speedup", "tokens_per_layer"):
        assert key in rows["tome:r=1"]
    assert rows["tome:r=1"]["tokens_per_layer"] == list(range(16, 4, -1))


def test_cli_errors_name_the_problem(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--methods", "tome:r=4", "--quiet"])
    assert err.value.code == 2
    assert "r=4 at layer 3 exceeds half" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["bench", "--model", "resnet18", "--quiet"])
    assert "no tokenreduce adapter for ResNet" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown timm model 'not_a_model'"):
        main(["bench", "--model", "not_a_model"])


def test_cli_pretrained_goes_to_the_hub():
    # The download path is real: offline (set before huggingface_hub is imported, in a fresh process)
    # it fails inside huggingface_hub, and the CLI says which weights it could not get.
    cmd = [sys.executable, "-m", "tokenreduce.cli", "bench", "--model", "vit_tiny_patch16_224", "--pretrained", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 1
    assert "could not load pretrained weights for 'vit_tiny_patch16_224' from the hub" in proc.stderr


def test_cli_methods_lists_everything(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in tokenreduce.list_methods():
        assert name in out
