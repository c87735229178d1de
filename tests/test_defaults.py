"""Every method's defaults run on the canonical models, and a model built on the meta device patches."""

from __future__ import annotations

import doctest

import pytest
import torch

import tokenreduce
from conftest import BASE, TIMM_MODELS, build, images
from tokenreduce.registry import method_classes
from tokenreduce.stages import Stage

CANONICAL = [
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "deit_small_patch16_224",
    "deit_base_distilled_patch16_224",
    "vit_small_patch14_dinov2",  # 518 px: 1370 tokens
    "vit_base_patch14_reg4_dinov2",
    "vit_base_patch16_clip_224",
    "vit_huge_patch14_clip_224",
]


def meta_model(name: str) -> torch.nn.Module:
    import timm

    with torch.device("meta"):  # full-size architectures without allocating their weights
        return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("name", CANONICAL)
def test_every_method_default_runs_on_canonical_models(name):
    model = meta_model(name)
    for method in [n for n in tokenreduce.list_methods() if Stage.ENCODER in method_classes(n)]:
        tokenreduce.apply(model, method)  # plans the schedule at the native size; raises if it cannot
        assert "tokens per block at the native input size" in tokenreduce.describe(model)
    tokenreduce.remove(model)


@pytest.mark.parametrize("name,img_size,final", [("vit_small_patch16_224", 224, 41), ("vit_small_patch14_dinov2", 518, 278)])
def test_tome_default_keeps_a_fifth_at_any_resolution(name, img_size, final):
    model = tokenreduce.apply(meta_model(name), "tome")
    line = next(t for t in tokenreduce.describe(model).splitlines() if "tokens per block" in t)
    assert int(line.split()[-1]) == final  # r=13 at 224 px (the paper's setting), r=91 at 518 px


def test_package_docstring_example_runs():
    failures, tried = doctest.testmod(tokenreduce, verbose=False)
    assert tried > 0 and failures == 0


def test_apply_on_meta_then_materialise_and_load():
    real = build("dinov2_reg")
    tokenreduce.apply(real, "tome", r=5)
    cls, kw = TIMM_MODELS["dinov2_reg"]
    with torch.device("meta"):
        model = cls(**{**BASE, **kw})
    tokenreduce.apply(model, "tome", r=5)
    model.to_empty(device="cpu").load_state_dict(real.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images()), real(images()))
    assert tokenreduce.record(model).tokens_per_layer == (64, 59, 54, 49)
