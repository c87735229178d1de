"""``tokenreduce eval``: what each method costs in quality, side by side on one encoder and one set of
images, beside its measured speedup and GFLOPs from the same run.

Per method: top-1 of a linear probe fitted on the unreduced model's features (and its share of the
unreduced top-1); top-1 of a kNN vote of the reduced test features among the unreduced gallery features;
cosine of the pooled feature to the unreduced one; and, with a dense head, the head fed the full patch
grid restored from the reduced tokens (merged tokens spread back over the patches they cover, dropped
patches given the nearest covered patch's token) against the unreduced map: IoU at 0.5 and mean
absolute error. Unreduced features are computed once.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokenreduce
from tokenreduce.adapters import locate
from tokenreduce.api import patch_of
from tokenreduce.bench.runner import MethodSpec, run_bench, with_baseline
from tokenreduce.eval.data import Images
from tokenreduce.eval.probe import LinearProbe, knn_predict


@dataclass
class EvalData:
    """The image sets of one run (any may be missing): ``train``/``test`` for the probe, ``gallery`` for
    kNN (queries: ``test``), ``images`` for feature and dense fidelity."""

    train: Images | None = None
    test: Images | None = None
    gallery: Images | None = None
    images: Images | None = None


@dataclass
class EvalResult:
    """One method's quality; shares and speedups are against the ``none`` row of the same run."""

    method: str
    params: dict[str, Any]
    tokens_out: int
    probe_top1: float | None = None
    probe_share: float | None = None
    knn_top1: float | None = None
    feature_cosine: float | None = None
    saliency_iou: float | None = None
    saliency_mae: float | None = None
    dense: str = ""
    speedup: float | None = None
    gflops: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Outputs:
    pooled: Tensor
    maps: Tensor | None
    tokens_out: int
    filled: bool  # some patch was dropped and took its nearest covered patch's token


def _run(model: nn.Module, images: Images, size: int, norm, batch: int, head, tick) -> _Outputs:
    """Pooled features (and dense-head maps) of ``images``, batch by batch."""
    _, target, adapter = locate(model)
    prefix = adapter.num_prefix_tokens(target)
    pooled, maps, tokens_out, filled = [], [], 0, False
    for start in range(0, len(images), batch):
        x = images.batch(start, start + batch, size, *norm)
        tokens, feature = _encode(target, x)
        pooled.append(feature)
        tokens_out = tokens.shape[1]
        if head is not None:
            if tokenreduce.is_patched(model):
                rec = tokenreduce.record(model)
                filled |= bool((rec.owner[:, prefix:] < 0).any())
                patches = rec.restore(tokens)[:, prefix:]
            else:
                patches = tokens[:, prefix:]
            maps.append(head(patches, (size, size)))
        tick(1)
    return _Outputs(torch.cat(pooled), torch.cat(maps) if maps else None, tokens_out, filled)


def _encode(encoder: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(final tokens [B, N, D], pooled feature [B, D])``: timm's ``forward_features`` and pre-logits head,
    or a Hugging Face tower's ``last_hidden_state`` and ``pooler_output`` (its class token when it has none)."""
    if hasattr(encoder, "forward_features"):
        tokens = encoder.forward_features(x)
        return tokens, encoder.forward_head(tokens, pre_logits=True)
    out = encoder(pixel_values=x)
    pooled = getattr(out, "pooler_output", None)
    return out.last_hidden_state, out.last_hidden_state[:, 0] if pooled is None else pooled


def eval_steps(specs: Sequence[MethodSpec], data: EvalData, batch: int) -> int:
    """Batches ``run_eval`` reports to ``progress``."""

    def n(images: Images | None) -> int:
        return 0 if images is None else -(-len(images) // batch)

    per_method = n(data.test) + n(data.images)
    return n(data.train) + n(data.gallery) + len(with_baseline(specs)) * per_method


def run_eval(
    model: nn.Module,
    specs: Sequence[MethodSpec],
    data: EvalData,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    head: nn.Module | None = None,
    batch: int = 50,
    bench_batch: int = 8,
    bench_repeats: int = 3,
    knn_k: int = 20,
    progress: Callable[[int], None] | None = None,
) -> list[EvalResult]:
    """Evaluate every spec (``none`` first) on ``model`` (a timm ViT or a Hugging Face vision tower
    tokenreduce patches), left as it was."""
    specs, tick, norm = with_baseline(specs), progress or (lambda n: None), (tuple(mean), tuple(std))
    if data.train is not None and (data.test is None or data.train.labels is None or data.test.labels is None):
        raise ValueError("the linear probe needs labeled train and test images")
    if data.gallery is not None and (data.test is None or data.gallery.labels is None):
        raise ValueError("kNN needs a labeled gallery and labeled test images (the queries)")
    for name, images in (("train", data.train), ("test", data.test), ("gallery", data.gallery)):
        if images is not None and images.labels is not None and data.test is not None and images.classes != data.test.classes:
            raise ValueError(f"{name} classes {images.classes} do not match the test classes {data.test.classes}")
    for spec in specs:  # every method must run on this model before any long work starts
        if spec.name != "none":
            with tokenreduce.applied(model, spec.name, **spec.config):
                pass

    results: list[EvalResult] = []
    with torch.inference_mode():
        probe = gallery = None
        if data.train is not None:
            train = _run(model, data.train, img_size, norm, batch, None, tick)
            probe = LinearProbe.fit(train.pooled, torch.from_numpy(data.train.labels), len(data.train.classes))
        if data.gallery is not None:
            gallery = _run(model, data.gallery, img_size, norm, batch, None, tick).pooled
        reference: _Outputs | None = None
        for spec in specs:
            context = tokenreduce.applied(model, spec.name, **spec.config) if spec.name != "none" else nullcontext()
            with context:
                params = patch_of(model).method.params() if spec.name != "none" else {}
                test = _run(model, data.test, img_size, norm, batch, None, tick) if data.test is not None else None
                seen = _run(model, data.images, img_size, norm, batch, head, tick) if data.images is not None else None
            row = EvalResult(spec.label, params, (seen or test).tokens_out if (seen or test) else 0)
            if test is not None and probe is not None:
                row.probe_top1 = _top1(probe.predict(test.pooled), data.test)
            if test is not None and gallery is not None:
                row.knn_top1 = _top1(knn_predict(test.pooled, gallery, torch.from_numpy(data.gallery.labels), knn_k), data.test)
            if seen is not None:
                reference = reference or seen
                row.feature_cosine = F.cosine_similarity(seen.pooled, reference.pooled).mean().item()
                if seen.maps is not None:
                    row.saliency_iou, row.saliency_mae = _dense(seen.maps, reference.maps)
                    row.dense = "none" if spec.name == "none" else "unmerged" + (", dropped filled" if seen.filled else "")
            results.append(row)
    base = results[0]
    for row in results:
        if row.probe_top1 is not None and base.probe_top1:
            row.probe_share = row.probe_top1 / base.probe_top1
    bench = run_bench(model, specs, batch_size=bench_batch, img_size=img_size, repeats=bench_repeats)
    for row, measured in zip(results, bench):
        row.speedup, row.gflops = measured.speedup, measured.gflops
    return results


def _top1(predicted: Tensor, images: Images) -> float:
    return (predicted == torch.from_numpy(images.labels)).float().mean().item()


def _dense(maps: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean IoU of the maps thresholded at 0.5 (1 where both are empty), and mean absolute error."""
    a, b = maps > 0.5, reference > 0.5
    inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return statistics.fmean(iou.tolist()), (maps - reference).abs().mean().item()


COLUMNS = (
    ("method", "method", "{}"),
    ("tokens", "tokens_out", "{}"),
    ("probe top-1", "probe_top1", "{:.3f}"),
    ("of unreduced", "probe_share", "{:.1%}"),
    ("kNN top-1", "knn_top1", "{:.3f}"),
    ("feature cos", "feature_cosine", "{:.4f}"),
    ("saliency IoU", "saliency_iou", "{:.3f}"),
    ("saliency MAE", "saliency_mae", "{:.4f}"),
    ("dense grid", "dense", "{}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("GFLOPs", "gflops", "{:.2f}"),
)


def format_eval_table(results: Sequence[EvalResult]) -> str:
    """A fixed-width table; columns no row measured are left out, a missing value is ``-``."""
    columns = [c for c in COLUMNS if any(getattr(r, c[1]) not in (None, "") for r in results)]
    cells = [[c[0] for c in columns]]
    for r in results:
        cells.append(["-" if getattr(r, key) in (None, "") else fmt.format(getattr(r, key)) for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_csv(results: Sequence[EvalResult], path: str, model: str, img_size: int) -> None:
    """timm's results-CSV names where they apply (``model``, ``img_size``, ``infer_gmacs``, ``top1``),
    plus the method, its config and every quality column."""
    import csv

    names = ["model", "method", "config", "img_size", "tokens_out", "top1", "probe_share", "knn_top1"]
    names += ["feature_cosine", "saliency_iou", "saliency_mae", "dense", "speedup", "infer_gmacs"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for r in results:
            writer.writerow(
                [model, r.method, json.dumps(r.params), img_size, r.tokens_out, r.probe_top1, r.probe_share, r.knn_top1]
                + [r.feature_cosine, r.saliency_iou, r.saliency_mae, r.dense, r.speedup, r.gflops]
            )
