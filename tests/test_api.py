"""Public API behaviour: errors that name the argument and range, describe, record, context manager."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import tokenreduce
from conftest import build, images


def test_import_pulls_in_no_model_library():
    libraries = ("timm", "transformers", "diffusers", "open_clip")
    code = f"import sys, tokenreduce; print(sorted(m for m in {libraries} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_methods_lists_registered_names():
    assert tokenreduce.methods() == ["evit", "none", "random", "tome", "topk"]


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("nope", {}, ValueError, r"unknown method 'nope'; method must be one of \['evit'"),
        ("tome", dict(r=-1), ValueError, r"r must be an integer >= 0"),
        ("tome", dict(r=1.5), ValueError, r"r must be an integer >= 0"),
        ("tome", dict(r=(8, 2.0)), ValueError, r"inflection in \[-1, 1\]"),
        ("tome", dict(r=[1, 2]), ValueError, r"one entry per block \(4\), got 2"),
        ("tome", dict(r=40), ValueError, r"r=40 at layer 0 exceeds half of the 64 mergeable tokens there \(allowed 0..32\)"),
        ("tome", dict(r=14), ValueError, r"r=14 at layer 3 .*of the 22 mergeable.*allowed 0..11.*clip=True"),
        ("tome", dict(k=3), TypeError, r"unknown config \['k'\]; it accepts \['r', 'prop_attn', 'clip'\]"),
        ("evit", dict(keep_rate=0.0), ValueError, r"keep_rate must be a number in \(0, 1\], got 0.0"),
        ("topk", dict(keep_rate=1.5), ValueError, r"keep_rate must be a number in \(0, 1\], got 1.5"),
        ("random", dict(keep_rate=-0.1), ValueError, r"keep_rate must be a number in \(0, 1\]"),
        ("evit", dict(layers=(1, 9)), ValueError, r"layers must be block indices in \[0, 3\] for this model, got \[9\]"),
        ("topk", dict(layers=()), ValueError, r"layers must be a non-empty sequence"),
        ("random", dict(seed=-1), ValueError, r"seed must be an integer >= 0, got -1"),
    ],
)
def test_bad_config_raises_with_range(method, config, error, match):
    model = build("vit")
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


def test_clip_lowers_r_where_tokens_run_out():
    model = build("vit")
    tokenreduce.apply(model, "tome", r=14, clip=True)
    with torch.no_grad():
        model(images())
    # 65 -> 51 -> 37 -> 23, then only 22 // 2 = 11 tokens can merge in the last block
    assert tokenreduce.record(model).tokens_per_layer == (51, 37, 23, 12)


def test_tome_r_schedules():
    tome = tokenreduce.make_method("tome", r=(8, 0.5))
    assert tome.per_layer_r(4) == [4, 6, 9, 12]
    assert tokenreduce.make_method("tome", r=[1, 2, 3, 0]).per_layer_r(4) == [1, 2, 3, 0]


def test_unsupported_models_raise_type_error():
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(TypeError, match=r"no tokenreduce adapter for ResNet; supported model families: timm VisionTransformer"):
        tokenreduce.apply(torchvision.models.resnet18(), "tome", r=8)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tokenreduce.apply("vit", "tome")


def test_model_without_blocks_raises():
    model = build("vit", depth=0)
    with pytest.raises(TypeError, match="no transformer blocks to patch"):
        tokenreduce.apply(model, "none")


def test_cls_methods_need_a_class_token():
    with pytest.raises(ValueError, match="'evit' scores tokens by CLS attention; this model has no class token"):
        tokenreduce.apply(build("no_cls_avg"), "evit")


def test_attention_pooling_is_refused():
    model = build("no_cls_avg", global_pool="map")
    with pytest.raises(TypeError, match=r"global_pool='map' \(attention pooling\) is not supported"):
        tokenreduce.apply(model, "tome", r=2)
    assert not tokenreduce.is_patched(model) and type(model.blocks[0]).__name__ == "Block"


def test_grad_checkpointing_is_refused():
    model = build("vit")
    model.set_grad_checkpointing(True)
    with pytest.raises(TypeError, match=r"model.set_grad_checkpointing\(False\) before tokenreduce.apply"):
        tokenreduce.apply(model, "tome", r=2)
    model.set_grad_checkpointing(False)
    tokenreduce.apply(model, "tome", r=2)
    with pytest.raises(TypeError, match="gradient checkpointing cannot be combined with token reduction"):
        model.set_grad_checkpointing(True)


@pytest.mark.parametrize(
    "name,kwargs,prefix",
    [
        ("vit_tiny_patch16_224", {}, 1),
        ("deit_tiny_distilled_patch16_224", {}, 2),
        ("vit_small_patch14_reg4_dinov2", dict(img_size=56), 5),
        ("vit_base_patch16_clip_224", dict(img_size=64), 1),
        ("vit_medium_patch16_gap_256", dict(img_size=64), 0),
    ],
)
def test_registered_timm_architectures(name, kwargs, prefix):
    import timm

    model = timm.create_model(name, pretrained=False, depth=2, **kwargs).eval()
    size = kwargs.get("img_size", 224)
    tokenreduce.apply(model, "tome", r=3, trace_source=True)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    rec = tokenreduce.record(model)
    assert rec.num_prefix == prefix and rec.tokens_per_layer == (rec.input_tokens - 3, rec.input_tokens - 6)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,match",
    [
        ("eva02_tiny_patch14_224", "no tokenreduce adapter for Eva; supported model families: timm VisionTransformer"),
        ("vit_base_patch16_siglip_224", r"global_pool='map' \(attention pooling\) is not supported"),
        ("vit_pwee_patch16_reg1_gap_256", "block 0 is a ParallelScalingBlock; supported block classes"),
    ],
)
def test_unsupported_timm_architectures_say_why(name, match):
    import timm

    model = timm.create_model(name, pretrained=False, depth=1)
    with pytest.raises(TypeError, match=match):
        tokenreduce.apply(model, "tome", r=2)
    assert not tokenreduce.is_patched(model)


def test_changed_block_forward_is_detected():
    from timm.models.vision_transformer import Block

    class SkipsLayerScale(Block):
        def forward(self, x, attn_mask=None, is_causal=False):
            x = x + self.attn(self.norm1(x))
            return x + self.ls2(self.mlp(self.norm2(x)))

    model = build("dinov2_reg", block_fn=SkipsLayerScale)
    with pytest.raises(TypeError, match="SkipsLayerScale.forward does not match the layout"):
        tokenreduce.apply(model, "tome", r=2)
    assert all(type(b) is SkipsLayerScale for b in model.blocks)


def test_attn_mask_with_reduction_raises():
    model = build("vit")
    mask = torch.zeros(65, 65)
    tokenreduce.apply(model, "tome", r=2)
    with pytest.raises(ValueError, match="attn_mask / is_causal cannot be combined with token reduction"):
        model.forward_features(images(), attn_mask=mask)
    tokenreduce.apply(model, "none")
    with torch.no_grad():
        model.forward_features(images(), attn_mask=mask)


def test_forward_intermediates_refuses_a_grid_it_cannot_fill():
    model = build("vit")
    tokenreduce.apply(model, "tome", r=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"output_fmt='NCHW'\) needs every patch token"):
            model.forward_intermediates(images())
        _, inter = model.forward_intermediates(images(), output_fmt="NLC")
        assert [t.shape[1] for t in inter] == [60, 56, 52, 48]
        tokenreduce.apply(model, "tome", r=0)
        _, inter = model.forward_intermediates(images())
        assert inter[0].shape == (2, 48, 8, 8)


def test_record_and_describe():
    model = build("dinov2_reg")
    assert "not patched" in tokenreduce.describe(model)
    tokenreduce.apply(model, "tome", r=4)
    with pytest.raises(ValueError, match="has not run a forward yet"):
        tokenreduce.record(model)
    text = tokenreduce.describe(model)
    assert "tome(r=4, prop_attn=True, clip=False)" in text
    assert "4 blocks (Block), 5 prefix tokens" in text and "69 -> 65 61 57 53" in text
    with torch.no_grad():
        model(images(batch=3))
    rec = tokenreduce.record(model)
    assert rec.tokens_per_layer == (65, 61, 57, 53) and rec.size.shape == (3, 53, 1) and rec.source is None
    with pytest.raises(ValueError, match="not patched by tokenreduce"):
        tokenreduce.record(build("vit"))


def test_applied_restores_an_earlier_patch():
    model, x = build("vit"), images()
    tokenreduce.apply(model, "tome", r=3)
    with torch.no_grad():
        before = model(x)
        with tokenreduce.applied(model, "topk", keep_rate=0.5):
            model(x)
            assert tokenreduce.record(model).tokens_per_layer[-1] < 40
        assert torch.equal(model(x), before)
    assert "tome(r=3" in tokenreduce.describe(model)


def test_remove_on_unpatched_model_is_a_no_op():
    model = build("vit")
    assert tokenreduce.remove(model) is model and not tokenreduce.is_patched(model)


def test_training_mode_and_gradients_flow():
    model = build("qknorm_avg").train()
    tokenreduce.apply(model, "tome", r=4)
    loss = model(images()).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.blocks[-1].parameters())


@pytest.mark.parametrize(
    "method,config",
    [("tome", dict(r=4)), ("evit", dict(keep_rate=0.5)), ("topk", dict(keep_rate=0.5)), ("random", dict(keep_rate=0.5))],
)
def test_torch_compile_traces_the_patched_model(method, config):
    model, x = build("dinov2_reg"), images()
    tokenreduce.apply(model, method, **config)
    with torch.no_grad():
        eager = model(x)
        plan = tokenreduce.record(model).tokens_per_layer
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph breaks
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    assert tokenreduce.record(model).tokens_per_layer == plan


def test_method_object_can_be_passed():
    method = tokenreduce.make_method("evit", keep_rate=0.5)
    model = tokenreduce.apply(build("vit"), method)
    assert "evit(keep_rate=0.5" in tokenreduce.describe(model)
    with pytest.raises(TypeError, match="not both"):
        tokenreduce.apply(model, method, keep_rate=0.3)


def test_state_is_not_a_module_and_adds_no_parameters():
    model = build("vit")
    n_params = sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_modules()]
    tokenreduce.apply(model, "tome", r=2)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert [n for n, _ in model.named_modules()] == names
    assert not isinstance(model._tokenreduce, nn.Module)


def test_bad_config_keeps_the_earlier_patch():
    model = build("vit")
    tokenreduce.apply(model, "tome", r=3)
    with pytest.raises(ValueError, match="keep_rate"):
        tokenreduce.apply(model, "evit", keep_rate=2.0)
    assert "tome(r=3" in tokenreduce.describe(model)


def test_deepcopy_of_a_patched_model_is_independent():
    model, x = build("qknorm_avg"), images()
    with torch.no_grad():
        expected = model(x)
    tokenreduce.apply(model, "tome", r=5, trace_source=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        reduced = model(x)
        assert torch.equal(twin(x[:1]), model(x[:1]))
    assert tokenreduce.record(twin).size.shape[0] == 1 and tokenreduce.record(model).size.shape[0] == 1
    tokenreduce.remove(twin)
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
        assert torch.equal(model(x), reduced)  # the original keeps its own patch


def test_patched_model_survives_torch_save_and_load(tmp_path):
    model, x = build("dinov2_reg"), images()
    with torch.no_grad():
        expected = model(x)
    tokenreduce.apply(model, "evit", keep_rate=0.5, trace_source=True)
    with torch.no_grad():
        reduced = model(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), reduced)
    assert tokenreduce.record(loaded).source is not None
    tokenreduce.remove(loaded)
    assert type(loaded).__name__ == "VisionTransformer" and type(loaded.blocks[0]).__name__ == "Block"
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert traces_of(loaded) == traces_of(build("dinov2_reg"))


def traces_of(model):
    return [(n, type(m), sorted(vars(m)), len(m._forward_hooks)) for n, m in model.named_modules()]
