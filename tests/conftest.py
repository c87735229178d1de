"""Tiny random timm ViTs covering every token layout the timm adapter supports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

# Tiny models: two threads on a shared 2-core machine are many times noisier than one.
torch.set_num_threads(1)

BASE = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

# name -> (class, overrides). 64 patch tokens plus the prefix tokens in every case.
MODELS = {
    "vit": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "dinov2_reg": (VisionTransformer, dict(init_values=0.5, reg_tokens=4, no_embed_class=True)),
    "qknorm_avg": (VisionTransformer, dict(qk_norm=True, global_pool="avg")),
    "respost": (VisionTransformer, dict(block_fn=ResPostBlock, init_values=0.7)),
    "no_cls_avg": (VisionTransformer, dict(class_token=False, global_pool="avg")),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough that tokens differ and attention is peaked, so a wrong merge shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    cls, kw = MODELS[name]
    model = cls(**{**BASE, **kw, **overrides})
    return randomize(model, seed).eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param
