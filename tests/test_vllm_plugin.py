"""The parts of the vLLM plugin that import no vLLM: reading the method from the HF config, the
placeholder counts the processor emits, the architecture table and the entry point. The engine itself
is checked end to end by benchmarks/vllm_plugin_check.py in the vLLM venv (not part of this suite)."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points, metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokenreduce
from conftest import IMAGE_TOKEN, tiny_vlm
from tokenreduce.integrations import vllm as plugin
from tokenreduce.methods.divprune import DivPrune
from tokenreduce.methods.visual import VisualContext

ROOT = Path(__file__).resolve().parents[1]


def test_supported_methods_are_the_projected_space_ones_that_need_nothing_else():
    assert set(plugin.SUPPORTED_METHODS) == {"divprune", "pool", "random"}


@pytest.mark.parametrize("as_object", [False, True])
def test_method_from_config_reads_the_tokenreduce_key_of_a_dict_or_a_config_object(as_object):
    spec = {"method": "divprune", "keep_ratio": 0.25}
    config = SimpleNamespace(tokenreduce=spec) if as_object else {"tokenreduce": spec}
    method = plugin.method_from_config(config)
    assert isinstance(method, DivPrune) and method.keep_ratio == 0.25
    assert spec == {"method": "divprune", "keep_ratio": 0.25}  # the config is not consumed


def test_method_from_config_passes_method_options_through():
    method = plugin.method_from_config({"tokenreduce": {"method": "random", "keep_tokens": 5, "seed": 3}})
    assert (method.keep_tokens, method.seed) == (5, 3)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "has no 'tokenreduce' entry.*--hf-overrides"),
        ({"tokenreduce": "divprune"}, "must be a dict with a 'method' key"),
        ({"tokenreduce": {"keep_ratio": 0.5}}, "must be a dict with a 'method' key"),
        ({"tokenreduce": {"method": "visionzip"}}, r"method must be one of \['divprune', 'pool', 'random'\].*'visionzip'"),
        ({"tokenreduce": {"method": "fastv"}}, "method must be one of"),
        ({"tokenreduce": {"method": "divprune", "keep_ratio": 1.5}}, "keep_ratio"),
        ({"tokenreduce": {"method": "divprune", "layer": 2}}, "unknown config"),
    ],
)
def test_method_from_config_rejects_what_it_cannot_serve(config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plugin.method_from_config(config)


@pytest.mark.parametrize(
    ("spec", "tokens", "kept"),
    [
        ({"method": "divprune", "keep_ratio": 0.25}, 576, 144),
        ({"method": "divprune"}, 576, 56),  # the paper's default ratio 0.098
        ({"method": "random", "keep_tokens": 64}, 576, 64),
        ({"method": "pool", "stride": 2}, 576, 144),
        ({"method": "pool", "keep_ratio": 0.1}, 576, 36),  # stride 4: the smallest whose output fits in 58
        ({"method": "divprune", "keep_ratio": 0.25}, 64, 16),
    ],
)
def test_placeholders_per_image_follow_from_the_budget_alone(spec, tokens, kept):
    """What the processor emits before the encoder runs: ``num_kept`` on the tower's token count and grid."""
    side = int(tokens**0.5)
    method = plugin.method_from_config({"tokenreduce": spec})
    assert method.num_kept(tokens, plugin.patch_grid(tokens, side)) == kept


@pytest.mark.parametrize("name", ["divprune", "random", "pool"])
def test_select_returns_exactly_the_placeholder_count(name):
    """The model class returns ``select(...).apply(embeds)``: one row per placeholder, for any content."""
    method = plugin.method_from_config({"tokenreduce": {"method": name, "keep_ratio": 0.3}})
    embeds = torch.randn(3, 64, 16)
    grid = plugin.patch_grid(64, 8)
    keep = method.num_kept(64, grid)
    assert method.select(VisualContext(embeds, keep, 0, grid)).apply(embeds).shape == (3, keep, 16)


def test_patch_grid_only_when_the_tokens_are_the_patches():
    assert plugin.patch_grid(576, 24) == (24, 24)
    assert plugin.patch_grid(577, 24) is None  # the "full" strategy keeps CLIP's class token


def test_pool_needs_a_grid():
    method = plugin.method_from_config({"tokenreduce": {"method": "pool", "stride": 2}})
    with pytest.raises(ValueError, match="patch grid"):
        method.num_kept(577, plugin.patch_grid(577, 24))


def test_architectures_are_new_names_over_vllm_classes():
    for name, (base, path) in plugin.ARCHITECTURES.items():
        assert name == "TokenReduce" + base.replace("ForConditionalGeneration", "") + "ForConditionalGeneration"
        module, cls = path.split(":")
        assert module.startswith("tokenreduce.integrations.vllm.") and cls == name
        assert (ROOT / (module.replace(".", "/") + ".py")).exists()


def test_qwen_limitation_names_the_cause_and_the_alternative():
    text = plugin.MROPE_LIMITATION
    assert "M-RoPE" in text and "video_pruning_rate" in text and "TokenReduceLlavaForConditionalGeneration" in text


def test_entry_point_and_extra_are_installed():
    (point,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == "tokenreduce"]
    assert point.value == "tokenreduce.integrations.vllm:register" and point.load() is plugin.register
    assert "vllm" in metadata("tokenreduce").get_all("Provides-Extra")


def test_register_without_vllm_says_so(monkeypatch):
    """vLLM is imported only when vLLM itself calls register(), never by importing the plugin."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError):
        plugin.register()


# (height, width) of images for the tiny AnyRes models (32-pixel crops, pinpoints up to 64 x 64): one crop,
# a full 2 x 2 grid, and 1 x 2 / 2 x 1 grids whose crops are unpadded to the image's aspect ratio.
ANYRES_SIZES = [(32, 32), (64, 64), (40, 64), (64, 40), (20, 50), (64, 26)]


def _packed_image(model, height: int, width: int) -> tuple[torch.Tensor, dict]:
    """``[N, D]``: one random image of that size packed by the transformers model (base image, unpadded
    crops, newline tokens), as vLLM's model class packs it before the plugin reduces it; and its inputs."""
    config = model.config
    module = sys.modules[type(model.model).__module__]
    crops = module.image_size_to_num_patches((height, width), config.image_grid_pinpoints, config.vision_config.image_size)
    pixels = torch.randn(1, crops, 3, 32, 32, generator=torch.Generator().manual_seed(height * 100 + width))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[height, width]]))
    return features.pooler_output[0], dict(pixel_values=pixels, image_sizes=torch.tensor([[height, width]]))


ANYRES_SPECS = [
    {"method": "divprune", "keep_ratio": 0.25},
    {"method": "random", "keep_ratio": 0.3},
    {"method": "random", "keep_tokens": 7},
]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("spec", ANYRES_SPECS)
def test_anyres_placeholders_and_embeddings_equal_the_transformers_path(family, spec):
    """For each image size: the plugin's count for the packed span equals what ``tokenreduce.apply``
    sent to the LLM (``record``), and ``reduce_packed`` returns exactly the packed tokens it kept, in order."""
    model = tiny_vlm(family).eval()
    packed = {size: _packed_image(model, *size) for size in ANYRES_SIZES}
    method = plugin.packed_method_from_config({"tokenreduce": spec})
    tokenreduce.apply(model, method)
    for (height, width), (span, pixels) in packed.items():
        n = span.shape[0]
        ids = torch.tensor([[1, 5, *[IMAGE_TOKEN] * n, 7, 8]])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)
        (image,) = tokenreduce.record(model).images
        assert (image.placeholders, image.kept) == (n, plugin.packed_kept(method, n)), (height, width)
        (reduced,) = plugin.reduce_packed(method, [span])
        torch.testing.assert_close(reduced, span[image.position], rtol=0, atol=0)


def test_anyres_sizes_cover_unpadded_crops():
    """The sizes above give spans of different lengths (crops cut to the aspect ratio, newline per row)."""
    model = tiny_vlm("llava_next")
    lengths = {size: _packed_image(model, *size)[0].shape[0] for size in ANYRES_SIZES}
    assert len(set(lengths.values())) >= 4, lengths


def test_packed_spans_refuse_pool_naming_the_methods_that_serve_them():
    assert plugin.PACKED_METHODS == ("divprune", "random")
    with pytest.raises(ValueError, match=r"must be one of \['divprune', 'random'\] for LLaVA-NeXT.*'pool'.*patch grid"):
        plugin.packed_method_from_config({"tokenreduce": {"method": "pool", "stride": 2}})


def test_positions_keep_is_refused():
    with pytest.raises(ValueError, match="positions must be 'auto' or 'reindex' under vLLM"):
        plugin.method_from_config({"tokenreduce": {"method": "divprune", "positions": "keep"}})
