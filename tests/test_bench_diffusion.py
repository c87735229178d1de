"""The diffusion bench: PSNR and SSIM against direct computations, the command end to end on tiny
denoisers and pipelines (named configs and save_pretrained folders), and the tomesd package's column."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenreduce.bench import diffusion
from tokenreduce.bench.denoisers import MODELS, build_named, denoiser_inputs, load_checkpoint
from tokenreduce.bench.fidelity import psnr, ssim
from tokenreduce.bench.runner import parse_specs
from tokenreduce.cli import main

pytest.importorskip("diffusers")

COLUMNS = {"method", "implementation", "params", "latency_ms", "s_per_image", "gflops", "peak_memory_mib", "reduce_share",
           "reduced_blocks", "tokens", "psnr_db", "ssim", "speedup", "flops_speedup", "vs_tomesd", "max_abs_diff_tomesd",
           "times_ms", "efficiency"}  # fmt: skip
ENVIRONMENT = {"machine", "threads", "batch_size", "dtype", "torch", "diffusers", "tomesd", "latent_size", "command", "notes"}
FAST = ["--repeats", "1", "--threads", "1", "--quiet"]


def naive_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. (2004) written out: at every position where the window fits, Gaussian-weighted
    means, variances and covariance of one channel, then the mean of the SSIM map."""
    x, y = x.double(), y.double()
    c = (size - 1) / 2
    w = [[math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma**2)) for j in range(size)] for i in range(size)]
    total = sum(map(sum, w))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for b in range(x.shape[0]):
        for ch in range(x.shape[1]):
            for top in range(x.shape[2] - size + 1):
                for left in range(x.shape[3] - size + 1):
                    px = x[b, ch, top : top + size, left : left + size].tolist()
                    py = y[b, ch, top : top + size, left : left + size].tolist()
                    pairs = [(w[i][j] / total, px[i][j], py[i][j]) for i in range(size) for j in range(size)]
                    mx = sum(k * a for k, a, _ in pairs)
                    my = sum(k * v for k, _, v in pairs)
                    vx = sum(k * (a - mx) ** 2 for k, a, _ in pairs)
                    vy = sum(k * (v - my) ** 2 for k, _, v in pairs)
                    cov = sum(k * (a - mx) * (v - my) for k, a, v in pairs)
                    values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


def test_ssim_and_psnr_match_direct_computations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 13, 12, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert ssim(x, y, 1.0) == pytest.approx(naive_ssim(x, y, 1.0), abs=1e-10)
    assert ssim(x, y, 1.0) < 0.9 and ssim(x, x, 1.0) == pytest.approx(1.0)
    small = x[:, :, :7, :9]  # the window shrinks to 7x7
    assert ssim(small, y[:, :, :7, :9], 1.0) == pytest.approx(naive_ssim(small, y[:, :, :7, :9], 1.0, size=7), abs=1e-10)
    assert psnr(x, x + 0.1, 1.0) == pytest.approx(20.0) and psnr(x, x + 0.1, 2.0) == pytest.approx(20 + 20 * math.log10(2))
    assert psnr(x, x, 1.0) == math.inf
    with pytest.raises(ValueError, match=r"two \[B, C, H, W\] tensors"):
        ssim(x[0], y[0], 1.0)


def run(argv: list[str], capsys) -> tuple[dict, str]:
    assert main(argv) == 0
    return json.loads(open(argv[argv.index("--json") + 1]).read()), capsys.readouterr().out


def test_unet_bench_reports_every_column_beside_the_tomesd_package(tmp_path, capsys):
    pytest.importorskip("tomesd")
    out, table = tmp_path / "b.json", tmp_path / "b.csv"
    methods = "none,tomesd:ratio=0.5:use_rand=False"
    data, printed = run(["bench", "--diffusion", "--latent-size", "16", "--methods", methods, *FAST, "--json", str(out),
                         "--csv", str(table)], capsys)  # fmt: skip
    env, rows = data["environment"], {r["method"]: r for r in data["results"]}
    assert ENVIRONMENT <= set(env) and env["batch_size"] == 2 and env["latent_size"] == 16 and env["model"] == "sd-unet"
    assert env["command"].startswith("tokenreduce bench --diffusion")
    assert all(set(r) == COLUMNS for r in rows.values())
    assert list(rows) == ["none", methods.split(",")[1], f"{methods.split(',')[1]} [tomesd {env['tomesd']}]"]
    ours, pkg = rows["tomesd:ratio=0.5:use_rand=False"], rows[f"tomesd:ratio=0.5:use_rand=False [tomesd {env['tomesd']}]"]
    assert ours["implementation"] == "tokenreduce" and pkg["implementation"].startswith("tomesd ")
    # the three full-resolution blocks of the 16x16 latent merge half their 256 tokens, in both
    assert ours["tokens"] == pkg["tokens"] == [[256, 128]] * 3
    for r in (ours, pkg):
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("speedup", "flops_speedup", "efficiency", "psnr_db", "latency_ms"))
        assert 0 < r["ssim"] < 1 and 0 < r["reduce_share"] < 1 and r["flops_speedup"] > 1
    assert ours["max_abs_diff_tomesd"] < 1e-5 and math.isfinite(ours["vs_tomesd"]) and pkg["vs_tomesd"] is None
    assert ours["psnr_db"] == pytest.approx(pkg["psnr_db"], abs=1e-2)
    assert rows["none"]["psnr_db"] is None and rows["none"]["ssim"] == pytest.approx(1.0) and rows["none"]["speedup"] == 1
    assert "max|Δ| tomesd" in printed and "3x 256->128" in printed
    assert table.read_text().splitlines()[0].split(",")[:3] == ["method", "implementation", "params"]


def test_package_column_follows_the_settings_and_is_left_out_where_it_cannot_act(monkeypatch, capsys):
    model = build_named("sd-unet", 16)
    specs = parse_specs("tomesd:ratio=0.3:sx=4:sy=1:use_rand=True")
    rows, notes = diffusion.variants(model, specs)
    pkg = rows[-1]
    assert notes == [] and pkg.twin == 1
    assert pkg.params == dict(ratio=0.3, max_downsample=1, sx=4, sy=1, use_rand=True, merge_attn=True, merge_crossattn=False,
                              merge_mlp=False)  # fmt: skip
    results, notes = diffusion.run_diffusion_bench(model, specs, latent_size=16, repeats=1)
    assert results[1].max_abs_diff_tomesd is None and results[1].vs_tomesd > 0
    assert "use_rand=True draws other destinations" in notes[0]
    _, notes = diffusion.variants(build_named("dit", 16), specs)
    assert "on DiTTransformer2DModel it reads the latent's size as the token grid" in notes[0]
    monkeypatch.setattr(diffusion, "tomesd_version", lambda: None)
    rows, notes = diffusion.variants(model, specs)
    assert len(rows) == 2 and "the tomesd package is not installed" in notes[0]


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux"])
def test_transformer_denoisers_report_speedup_against_the_flop_ideal(name):
    results, notes = diffusion.run_diffusion_bench(
        build_named(name, 8), parse_specs("tomesd:ratio=0.5"), batch_size=MODELS[name].batch, latent_size=8, repeats=1
    )
    none, ours = results
    assert [r.implementation for r in results] == ["unreduced", "tokenreduce"] and "tomesd column skipped" in notes[0]
    assert ours.reduced_blocks == 2 and ours.flops_speedup > 1 and math.isfinite(ours.efficiency)
    assert math.isfinite(ours.psnr_db) and 0 < ours.ssim < 1 and none.gflops > ours.gflops


def test_inputs_are_a_cfg_pair_and_fixed_by_the_seed():
    model = build_named("sd-unet", 8)
    call = denoiser_inputs(model, 4, 8)
    assert torch.equal(call.latent[:2], call.latent[2:])  # the same latents in both halves, as a pipeline's CFG batch
    assert not torch.equal(call.kwargs["encoder_hidden_states"][:2], call.kwargs["encoder_hidden_states"][2:])
    assert torch.equal(denoiser_inputs(model, 4, 8).latent, call.latent)
    assert denoiser_inputs(model, 3, 8).latent.shape == (3, 4, 8, 8)


def test_checkpoint_folders_load_a_saved_denoiser_and_pipeline(tmp_path, capsys):
    pytest.importorskip("tomesd")
    build_named("sd-unet", 12).save_pretrained(tmp_path / "unet")
    argv = ["bench", "--diffusion", "--checkpoint", str(tmp_path / "unet"), "--methods", "tomesd:ratio=0.5:use_rand=False"]
    data, _ = run([*argv, *FAST, "--json", str(tmp_path / "u.json")], capsys)
    assert data["environment"]["latent_size"] == 12  # the saved config's sample size
    ours = data["results"][1]
    assert ours["tokens"] == [[144, 72]] * 3 and ours["max_abs_diff_tomesd"] < 1e-5

    build_named("sd-pipeline", 8).save_pretrained(tmp_path / "pipe")  # no text encoder: saved as None
    argv = ["bench", "--diffusion", "--checkpoint", str(tmp_path / "pipe"), "--steps", "2", "--methods", "tomesd:ratio=0.5"]
    data, printed = run([*argv, *FAST, "--json", str(tmp_path / "p.json")], capsys)
    env, (_, ours, pkg) = data["environment"], data["results"]
    assert env["pipeline"] and env["steps"] == 2 and env["batch_size"] == 1 and "s/image" in printed
    assert ours["s_per_image"] == pytest.approx(ours["latency_ms"] / 1e3) and ours["tokens"] == [[64, 32]] * 3
    assert math.isfinite(ours["psnr_db"]) and 0 < ours["ssim"] <= 1  # of the decoded image, in [0, 1]
    assert ours["max_abs_diff_tomesd"] is None  # use_rand=True by default
    assert pkg["tokens"] == [[64, 32]] * 3  # the last denoiser call's merges, not the whole generation's


def test_diffusion_bench_errors_name_the_problem(tmp_path, capsys):
    for argv, message in [
        (["--vlm"], "two different benches"),
        (["--model", "vit_small_patch16_224x"], "--model must be one of sd-unet"),
        (["--checkpoint", str(tmp_path / "none.pt")], "a diffusers folder written by save_pretrained"),
        (["--latent-size", "0"], "--latent-size must be an integer >= 1"),
        (["--methods", "tomesd:ratio=0.9"], "ratio must be in [0, 0.75]"),
    ]:
        with pytest.raises(SystemExit):
            main(["bench", "--diffusion", *argv, "--quiet"])
        assert message in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_checkpoint(tmp_path / "empty")
