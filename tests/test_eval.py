"""``tokenreduce eval``: the probe, kNN, feature and dense fidelity columns on tiny models and data;
restoring a full patch grid from reduced tokens; the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import build
from tokenreduce.bench.runner import parse_specs
from tokenreduce.cli import main
from tokenreduce.core import keep, mix, restore_tokens
from tokenreduce.eval.data import Images, load_folder, load_npz
from tokenreduce.eval.probe import LinearProbe, knn_predict
from tokenreduce.eval.runner import EvalData, format_eval_table, run_eval

NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def images(n: int, classes: int = 2, seed: int = 0) -> Images:
    """Class ``c`` images are noise around a class-specific colour, so a probe can tell them apart."""
    gen = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    base = np.array([[40, 200, 90], [220, 30, 160], [90, 90, 250]])[labels][:, None, None, :]
    x = np.clip(base + gen.normal(0, 25, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return Images(x, labels, [f"c{i}" for i in range(classes)])


class Head(nn.Module):
    """A stand-in dense head: a fixed projection of each patch token to one channel, upsampled."""

    def forward(self, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        side = int(patches.shape[1] ** 0.5)
        logits = patches.mean(-1).view(-1, 1, side, side)
        return torch.sigmoid(nn.functional.interpolate(logits, size=size, mode="nearest"))


def test_restore_gives_dropped_patches_the_nearest_covered_patch():
    kept = keep(torch.tensor([[0, 3, 8]]), 9)  # 3x3 grid, three patches kept
    tokens = torch.arange(3.0).view(1, 3, 1)
    # (0, 2) is as far from patch 0 as from patch 8: the lower index wins
    assert restore_tokens(tokens, [kept], 0, (3, 3))[0, :, 0].tolist() == [0, 0, 0, 1, 1, 2, 1, 2, 2]
    with pytest.raises(ValueError, match="9 patch tokens do not fill a 2x2 grid"):
        restore_tokens(tokens, [kept], 0, (2, 2))


def test_restore_undoes_merges_in_reverse_and_stops_at_a_reconstruction():
    merge = mix(torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]]))  # 4 -> 2: a mean and a sum
    tokens = torch.tensor([[[2.0], [4.0]]])
    # each input takes the outputs it feeds, weighted by its share in them
    assert restore_tokens(tokens, [merge], 0, (2, 2))[0, :, 0].tolist() == [2.0, 2.0, 4.0, 4.0]
    kept = keep(torch.tensor([[1, 0]]), 2)  # then 2 -> 2, swapped
    assert restore_tokens(tokens, [merge, kept], 0, (2, 2))[0, :, 0].tolist() == [4.0, 4.0, 2.0, 2.0]
    rebuild = mix(torch.ones(1, 4, 2) / 2, restores=True)  # back to the 4 original tokens
    assert restore_tokens(torch.ones(1, 4, 1), [merge, rebuild], 0, (2, 2)).tolist() == torch.ones(1, 4, 1).tolist()


def test_probe_and_knn_separate_separable_features():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    features = torch.randn(60, 8, generator=gen) + 4 * nn.functional.one_hot(labels, 8).float()
    probe = LinearProbe.fit(features, labels, 3)
    assert (probe.predict(features) == labels).all()
    assert (knn_predict(features, features, labels, k=1) == labels).all()


def test_run_eval_reports_every_column_against_the_unreduced_model():
    model = build("vit")
    data = EvalData(train=images(40), test=images(20, seed=1), gallery=images(20, seed=2), images=images(6, seed=3))
    specs = parse_specs("tome:r=4,topk:keep_rate=0.5")
    results = run_eval(model, specs, data, img_size=32, head=Head(), batch=16, bench_batch=2, bench_repeats=1, knn_k=3, **NORM)
    none, tome, topk = results
    assert [r.method for r in results] == ["none", "tome:r=4", "topk:keep_rate=0.5"]
    assert none.probe_share == 1.0 and none.feature_cosine == pytest.approx(1.0) and none.saliency_iou == 1.0
    assert none.probe_top1 > 0.9 and none.knn_top1 > 0.9  # separable colours
    assert tome.tokens_out < none.tokens_out and tome.feature_cosine < 1.0 and tome.dense == "unmerged"
    assert topk.dense == "unmerged, dropped filled" and topk.saliency_mae > 0
    assert none.speedup == 1.0 and tome.gflops < none.gflops
    table = format_eval_table(results)
    assert "probe top-1" in table and "saliency IoU" in table and "tome:r=4" in table


def test_bad_eval_inputs_are_refused_before_any_work(tmp_path):
    model = build("vit")
    unlabeled = Images(images(4).images, None, [])
    with pytest.raises(ValueError, match="the linear probe needs labeled train and test images"):
        run_eval(model, [], EvalData(train=unlabeled, test=images(4)), img_size=32, **NORM)
    with pytest.raises(ValueError, match=r"train classes \['c0', 'c1', 'c2'\] do not match the test classes"):
        run_eval(model, [], EvalData(train=images(6, classes=3), test=images(4)), img_size=32, **NORM)
    with pytest.raises(ValueError, match="method .evit. scores tokens by CLS attention; this model has no class token"):
        run_eval(build("no_cls_avg"), parse_specs("evit"), EvalData(test=images(4)), img_size=32, **NORM)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in class subfolders"):
        load_folder(tmp_path / "empty")
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((3, 32, 32, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="3 images in x_train but 2 labels in y_train"):
        load_npz(tmp_path / "bad.npz", "train")


def test_cli_eval_on_image_folders(tmp_path, capsys):
    from PIL import Image

    for split, n in (("train", 6), ("test", 4)):
        data = images(n, seed=len(split))
        for i, (x, y) in enumerate(zip(data.images, data.labels)):
            folder = tmp_path / split / f"class{y}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(folder / f"{i}.png")
    argv = ["eval", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--methods", "tome:keep_ratio=0.5", "--quiet"]
    argv += ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--images", str(tmp_path / "test")]
    argv += ["--json", str(tmp_path / "eval.json"), "--csv", str(tmp_path / "eval.csv"), "--threads", "1"]
    argv += ["--plot", str(tmp_path / "pareto.png"), "--gallery", str(tmp_path / "train")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "probe top-1" in out and "kNN top-1" in out and "tome:keep_ratio=0.5" in out
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["none", "tome:keep_ratio=0.5"] and rows[0]["probe_share"] == 1.0
    assert (tmp_path / "eval.csv").read_text().startswith("model,method,config,img_size,tokens_out,top1")
    assert Image.open(tmp_path / "pareto.png").size[0] > 500
    # the matched-FLOPs preset of the bench, on quality
    argv = ["eval", "--model", "vit_tiny_patch16_224", "--img-size", "224", "--quiet", "--threads", "1"]
    argv += ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--images", str(tmp_path / "test")]
    argv += [
        "--preset",
        "matched-flops",
        "--methods",
        "tome,evit",
        "--flops-fraction",
        "0.7",
        "--json",
        str(tmp_path / "eval.json"),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert sorted(r["method"].split(":")[0] for r in rows) == ["evit", "none", "tome"]
    assert all(r["gflops"] / rows[0]["gflops"] == pytest.approx(0.7, abs=0.05) for r in rows[1:])


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    from tokenreduce.eval.plot import pareto_front

    speedup, quality = [1.0, 1.5, 1.4, 2.0, 1.2], [1.0, 0.9, 0.95, 0.5, 0.8]
    assert pareto_front(speedup, quality, cheaper_is_larger=True) == [3, 1, 2, 0]  # 1.2x at 0.8 is beaten by 1.4x at 0.95
    gflops = [6.0, 4.0, 4.5, 2.0, 5.0]
    assert pareto_front(gflops, quality, cheaper_is_larger=False) == [3, 1, 2, 0]


def test_run_eval_on_a_hugging_face_tower():
    model = build("hf_dinov2")
    data = EvalData(train=images(20), test=images(10, seed=1), images=images(4, seed=3))
    none, tome = run_eval(
        model, parse_specs("tome:r=4"), data, img_size=32, head=Head(), batch=8, bench_batch=2, bench_repeats=1, **NORM
    )
    assert none.probe_share == 1.0 and tome.tokens_out < none.tokens_out
    assert tome.feature_cosine < 1.0 and tome.dense == "unmerged" and 0 <= tome.saliency_iou <= 1
