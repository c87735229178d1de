"""Public API behaviour: errors that name the argument and range, describe, record, context manager."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

import tokenreduce
from conftest import TIMM_MODELS, build, images


def test_import_pulls_in_no_model_library():
    libraries = ("timm", "transformers", "diffusers", "open_clip")
    code = f"import sys, tokenreduce; print(sorted(m for m in {libraries} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_methods_lists_registered_names():
    names = tokenreduce.list_methods()
    assert names == sorted(names)
    assert set(names) == {
        *("atc", "dart", "divprune", "dpc_knn", "dtome", "dymu", "evit", "expedite", "fastv", "gtp", "kmedoids", "none"),
        *("pdrop", "pool", "random", "sparsevlm", "token_pooling", "tome", "topk", "visionzip", "vwt", "zero_tprune"),
        *("visiondrop", "aim", "vscan"),
        *("pitome", "tofu", "dct", "mctf", "ppt", "diffrate"),
        *("vomix", "token_transforming", "bat"),
        *("tomesd", "todo", "sito", "importance_tome", "cat_pruning"),
        *("todre", "ficoco", "simignore", "recoverable", "star", "greedyprune", "gsearch", "psigmoid"),
        *("catp", "zoo_prune", "script", "globalcom2", "btp", "vflowopt"),
        *("ficoco_l", "lvlm_csp"),
        *("fastvid", "holitom"),
        *("trimmed_llama", "ptp"),
        *("framefusion",),
        "dycoke",
    }


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("nope", {}, ValueError, r"unknown method 'nope'; method must be one of \['aim', 'atc', .*'zero_tprune', 'zoo_prune'\]"),
        ("tome", dict(r=-1), ValueError, r"r must be an integer >= 0"),
        ("tome", dict(r=1.5), TypeError, r"r must be an integer >= 0, got 1.5 \(float\)"),
        ("tome", dict(r=(8, 2.0)), ValueError, r"r\[1\] \(inflection\) must be a number in \[-1, 1\], got 2.0"),
        ("tome", dict(r=[1, 2]), ValueError, r"one entry per block \(4\), got 2"),
        ("tome", dict(r=40), ValueError, r"r=40 at layer 0 exceeds half of the 64 mergeable tokens there \(allowed 0..32\)"),
        ("tome", dict(r=14), ValueError, r"r=14 at layer 3 .*of the 22 mergeable.*allowed 0..11.*clip=True"),
        ("tome", dict(k=3), TypeError, r"unknown config \['k'\]; it accepts \['r', 'keep_ratio', 'prop_attn', 'clip'\]"),
        ("evit", dict(keep_rate=0.0), ValueError, r"keep_rate must be a number in \(0, 1\], got 0.0"),
        ("topk", dict(keep_rate=1.5), ValueError, r"keep_rate must be a number in \(0, 1\], got 1.5"),
        ("random", dict(keep_rate=-0.1), ValueError, r"keep_rate must be a number in \(0, 1\]"),
        ("evit", dict(layers=(1, 9)), ValueError, r"layers must be block indices in \[0, 3\] for this model, got \[9\]"),
        ("topk", dict(layers=()), ValueError, r"layers must be a non-empty sequence"),
        ("random", dict(seed=-1), ValueError, r"seed must be an integer >= 0, got -1"),
        ("tome", dict(clip="False"), TypeError, r"clip must be True or False, got 'False' \(str\)"),
        ("tome", dict(prop_attn="no"), TypeError, r"prop_attn must be True or False, got 'no'"),
        ("tome", dict(clip=1), TypeError, r"clip must be True or False, got 1 \(int\)"),
        ("tome", dict(r=True), TypeError, r"r must be an integer >= 0, got True \(bool\)"),
        ("tome", dict(r=[2, 2.5, 2, 2]), TypeError, r"r\[1\] must be an integer >= 0, got 2.5"),
        ("tome", dict(r=4, keep_ratio=0.5), ValueError, r"pass r or keep_ratio, not both"),
        ("tome", dict(keep_ratio=0.0), ValueError, r"keep_ratio must be a number in \(0, 1\], got 0.0"),
        ("tome", dict(keep_ratio=0.1), ValueError, r"keep_ratio=0.1 needs r=14 .*keep_ratio must be in \(0.1875, 1\]"),
        ("evit", dict(keep_rate=float("nan")), ValueError, r"keep_rate must be a number in \(0, 1\], got nan"),
        ("evit", dict(keep_rate="0.7"), TypeError, r"keep_rate must be a number in \(0, 1\], got '0.7' \(str\)"),
        ("evit", dict(layers=3), TypeError, r"layers must be a sequence of integers >= 0, got 3 \(int\); for a single one pass"),
        ("topk", dict(layers=[1, -2]), ValueError, r"layers\[1\] must be an integer >= 0, got -2"),
        ("topk", dict(layers=np.zeros((2, 2), dtype=int)), TypeError, r"layers must be a 1-d sequence .* shape \(2, 2\)"),
        ("random", dict(seed=1.0), TypeError, r"seed must be an integer >= 0, got 1.0 \(float\)"),
    ],
)
def test_bad_config_raises_with_range(method, config, error, match):
    model = build("vit")
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize(
    "method,config,params",
    [
        ("tome", dict(r=np.int64(8), clip=np.bool_(True)), dict(r=8, clip=True)),
        ("tome", dict(r=torch.tensor(3)), dict(r=3)),
        ("tome", dict(r=np.array([1, 2, 3, 4])), dict(r=[1, 2, 3, 4])),
        ("tome", dict(r=(np.int32(4), np.float64(0.5))), dict(r=(4, 0.5))),
        ("tome", dict(keep_ratio=np.float32(0.5)), dict(keep_ratio=0.5, r=None)),
        ("evit", dict(keep_rate=np.float32(0.75), layers=np.array([1, 2])), dict(keep_rate=0.75, layers=(1, 2))),
        ("topk", dict(keep_rate=torch.tensor(0.5), layers=torch.tensor([0, 3])), dict(keep_rate=0.5, layers=(0, 3))),
        ("random", dict(seed=np.uint8(7), layers=range(2)), dict(seed=7, layers=(0, 1))),
    ],
)
def test_numpy_and_tensor_config_values_become_plain_python(method, config, params):
    model = tokenreduce.apply(build("vit"), method, **config)
    got = tokenreduce.make_method(method, **config).params()
    for key, want in params.items():
        assert got[key] == want and type(got[key]) is type(want), (key, got[key])
    with torch.no_grad():
        model(images())


def test_clip_lowers_r_where_tokens_run_out():
    model = build("vit")
    tokenreduce.apply(model, "tome", r=14, clip=True)
    with torch.no_grad():
        model(images())
    # 65 -> 51 -> 37 -> 23, then only 22 // 2 = 11 tokens can merge in the last block
    assert tokenreduce.record(model).tokens_per_layer == (51, 37, 23, 12)


def test_tome_r_schedules():
    tome = tokenreduce.make_method("tome", r=(8, 0.5))
    assert tome.per_layer_r(64, 4) == [4, 6, 9, 12]
    assert tokenreduce.make_method("tome", r=[1, 2, 3, 0]).per_layer_r(64, 4) == [1, 2, 3, 0]


def test_unsupported_models_raise_type_error():
    torchvision = pytest.importorskip("torchvision")
    families = r"supported model families: .*Hugging Face vision towers.*timm VisionTransformer"
    with pytest.raises(TypeError, match=rf"no tokenreduce adapter for ResNet; {families}"):
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


def test_self_attention_pooling_is_refused():
    model = build("vit", global_pool="prr")  # a parameter-free self-attention over all tokens, which takes no mask
    with pytest.raises(TypeError, match=r"global_pool='prr' \(AttentionPoolPrr\) is not supported; supported .*'map'"):
        tokenreduce.apply(model, "tome", r=2)
    assert not tokenreduce.is_patched(model) and type(model.blocks[0]) is Block


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
    tokenreduce.apply(model, "tome", r=3)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    rec = tokenreduce.record(model)
    assert rec.num_prefix == prefix and rec.tokens_per_layer == (rec.input_tokens - 3, rec.input_tokens - 6)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,match",
    [
        ("beit_base_patch16_224", "no tokenreduce adapter for Beit; supported model families: .*timm Eva"),
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


def test_forward_intermediates_gives_back_the_full_grid():
    x = images()
    model = build("vit")
    with torch.no_grad():
        _, want = model.forward_intermediates(x, indices=[1, 3])
        tokenreduce.apply(model, "tome", r=0)
        _, same = model.forward_intermediates(x, indices=[1, 3])
        assert all(torch.equal(a, b) for a, b in zip(same, want))
        tokenreduce.apply(model, "tome", r=4)
        _, tokens = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC")
        assert [t.shape[1] for t in tokens] == [56, 48]
        _, grids = model.forward_intermediates(x, indices=[1, 3])
        assert [g.shape for g in grids] == [(2, 48, 8, 8)] * 2
        owner = tokenreduce.record(model).owner[:, 1:] - 1  # the last block's: patch -> output, class token first
        for row in range(2):
            for patch in range(64):  # each patch shows the merged token that covers it
                torch.testing.assert_close(grids[1][row, :, patch // 8, patch % 8], tokens[1][row, owner[row, patch]])
        only = model.forward_intermediates(x, indices=[3], intermediates_only=True, return_prefix_tokens=True)
        assert only[0][0].shape == (2, 48, 8, 8) and only[0][1].shape == (2, 1, 48)
        tokenreduce.apply(model, "topk", keep_rate=0.5, layers=(1,))  # pruning: dropped patches take a neighbour's
        _, grids = model.forward_intermediates(x, indices=[3])
        assert grids[0].shape == (2, 48, 8, 8) and torch.isfinite(grids[0]).all()


def test_record_and_describe():
    model = build("dinov2_reg")
    assert "not patched" in tokenreduce.describe(model)
    tokenreduce.apply(model, "tome", r=4)
    with pytest.raises(ValueError, match="has not run a forward in this thread yet"):
        tokenreduce.record(model)
    text = tokenreduce.describe(model)
    assert "tome(r=4, keep_ratio=None, prop_attn=True, clip=False)" in text
    assert "4 blocks (Block), 5 prefix tokens" in text and "69 -> 65 61 57 53" in text
    with torch.no_grad():
        model(images(batch=3))
    rec = tokenreduce.record(model)
    assert rec.tokens_per_layer == (65, 61, 57, 53) and rec.size.shape == (3, 53, 1) and rec.owner.shape == (3, 69)
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
    tokenreduce.apply(model, "tome", r=5)
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
    tokenreduce.apply(model, "evit", keep_rate=0.5)
    with torch.no_grad():
        reduced = model(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), reduced)
    assert tokenreduce.record(loaded).owner.shape == (2, 69)
    tokenreduce.remove(loaded)
    assert type(loaded) is VisionTransformer and type(loaded.blocks[0]) is Block
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert traces_of(loaded) == traces_of(build("dinov2_reg"))


def traces_of(model):
    return [(n, type(m), sorted(vars(m)), len(m._forward_hooks)) for n, m in model.named_modules()]


def test_patched_model_loads_with_weights_only_once_its_own_classes_are_allowed(tmp_path):
    import timm.layers
    import timm.models.vision_transformer as vit

    model, x = build("vit"), images()
    tokenreduce.apply(model, "tome", r=4)
    with torch.no_grad():
        reduced = model(x)
    torch.save(model, tmp_path / "model.pt")
    timm_classes = [vit.VisionTransformer, vit.Block, timm.layers.Attention, timm.layers.Mlp, timm.layers.PatchEmbed]
    torch_classes = [nn.Linear, nn.Conv2d, nn.Identity, nn.Dropout, nn.Sequential, nn.GELU, timm.layers.LayerNorm]
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "model.pt")
    assert not [g for g in unsafe if g.startswith("tokenreduce")], "tokenreduce must allow its own classes"
    with torch.serialization.safe_globals([*timm_classes, *torch_classes, timm.layers.Format]):
        loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), reduced)
    tokenreduce.remove(loaded)
    assert type(loaded) is vit.VisionTransformer


class Classifier(nn.Module):
    """A user model holding a timm backbone."""

    def __init__(self, backbone: nn.Module, second: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.second = second
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize(
    "wrap,path",
    [
        (lambda m: Classifier(m), "backbone"),
        (lambda m: nn.DataParallel(m), "module"),
        (lambda m: torch.compile(m, backend="eager"), "_orig_mod"),
    ],
    ids=["user-module", "DataParallel", "torch.compile"],
)
def test_wrapped_model_gets_its_backbone_patched(wrap, path):
    model, x = build("vit"), images()
    wrapper = wrap(model)
    with torch.no_grad():
        expected = wrapper(x)
    tokenreduce.apply(wrapper, "tome", r=4)
    assert tokenreduce.is_patched(wrapper) and tokenreduce.is_patched(model)
    assert f"patched submodule '{path}' of {type(wrapper).__name__}" in tokenreduce.describe(wrapper)
    with torch.no_grad():
        reduced = wrapper(x)
    assert tokenreduce.record(wrapper).tokens_per_layer == (61, 57, 53, 49)
    assert not torch.allclose(reduced, expected, atol=1e-4)
    tokenreduce.remove(wrapper)
    assert not tokenreduce.is_patched(model)
    with torch.no_grad():
        assert torch.equal(wrapper(x), expected)


def test_wrapper_with_two_backbones_names_them():
    wrapper = Classifier(build("vit"), second=build("qknorm_avg"))
    with pytest.raises(TypeError, match=r"Classifier holds 2 supported models: 'backbone' \(VisionTransformer\), 'second'"):
        tokenreduce.apply(wrapper, "tome", r=2)
    tokenreduce.apply(wrapper.second, "tome", r=2)
    assert tokenreduce.is_patched(wrapper.second) and not tokenreduce.is_patched(wrapper.backbone)


def test_submodule_package_imports():
    code = "import tokenreduce.methods.tome as t; import tokenreduce; print(t.ToMe.name, tokenreduce.methods.tome.ToMe.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["tome", "tome"]


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_forward_intermediates_grid_on_every_timm_layout(name):
    model = build(name)
    with torch.no_grad():
        _, want = model.forward_intermediates(images(), indices=[3])
        tokenreduce.apply(model, "tome", r=4)
        _, got = model.forward_intermediates(images(), indices=[3])
    assert got[0].shape == want[0].shape == (2, 48, 8, 8)
    # merging changes the values but a patch's grid vector stays close to its unreduced one
    assert torch.nn.functional.cosine_similarity(got[0], want[0], dim=1).mean() > 0.5
