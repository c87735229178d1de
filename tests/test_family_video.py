"""Hugging Face video ViTs (VideoMAE, ViViT): every method runs over their space-time tubelet tokens, through
the ``*ForVideoClassification`` wrappers; ToMe and EViT match a naive forward over all tubelets; ToMe merges
across time slices; pixel-reading methods see each tubelet's pixels; hook points, MACs, save/load, export,
full-size defaults; TimeSformer and VideoMAE pre-training are refused with the reason."""

from __future__ import annotations

import pytest
import torch

import naive_families
import tokenreduce
from conftest import randomize
from family_checks import FamilyTests, check_defaults_plan, run
from test_contract import DATA_DEPENDENT_COUNTS, IDENTITY, REDUCING
from tokenreduce.core import patchify, size_weighted_mean, tubelets_as_image

transformers = pytest.importorskip("transformers")

# 8 frames of 32 x 32 px in tubelets of 2 frames x 8 x 8 px: 4 time slices of a 4 x 4 grid, 64 tubelet tokens.
SIZES = dict(image_size=32, num_frames=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
SLICE = 16  # tubelets per time slice
# name -> (model, classification wrapper, config, config keywords), by name so that collection imports nothing
FAMILIES = {
    "videomae": ("VideoMAEModel", "VideoMAEForVideoClassification", "VideoMAEConfig", dict(patch_size=8, tubelet_size=2)),
    "vivit": ("VivitModel", "VivitForVideoClassification", "VivitConfig", dict(tubelet_size=[2, 8, 8])),
}
PREFIX = {"videomae": 0, "vivit": 1}
# Methods that lay the tokens on a patch grid get the tubelets' tall one (4 slices x 4 rows, 4 columns): gtp's
# spatial graph, which would take 64 tokens for an 8 x 8 square, and expedite's identity, every tubelet alone.
TALL_GRID = (16, 4)
REDUCING_VIDEO = {**REDUCING, "gtp": dict(REDUCING["gtp"], grid=TALL_GRID)}
IDENTITY_VIDEO = {**IDENTITY, "expedite": dict(clusters=TALL_GRID, n_iters=0, recon_k=1)}


def build(name: str, classify: bool = True, seed: int = 0, **overrides):
    model, wrapper, config, kw = FAMILIES[name]
    cls, config_cls = getattr(transformers, wrapper if classify else model), getattr(transformers, config)
    return randomize(cls(config_cls(**{**SIZES, **kw, **overrides})), seed).eval()


def videos(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class TestVideo(FamilyTests):
    build = staticmethod(build)
    naive_forward = staticmethod(naive_families.video_forward)
    inputs = staticmethod(videos)
    every_method = tuple(sorted(FAMILIES))
    without_cls_token = ("videomae",)
    identity = IDENTITY_VIDEO
    reducing = REDUCING_VIDEO
    tome_matches = tuple((name, prop_attn) for name in sorted(FAMILIES) for prop_attn in (True, False))
    cls_pruning = (("vivit", "evit"), ("vivit", "topk"))
    six_blocks = dict(num_hidden_layers=6)
    hook_points = tuple(sorted(FAMILIES))
    save_load = ("videomae",)
    macs = tuple(sorted(FAMILIES))
    # twice the width: at 32, ToMe's matching (in torch's count only) passes the 1.5% bound
    macs_overrides = dict(hidden_size=64, intermediate_size=128)
    # VideoMAE: under torch.export, ViViT (as transformers' ViT, SigLIP and DINOv2) builds an all-true attention
    # mask from no mask, which a reducing patch refuses as it refuses any mask
    export = "videomae"

    def encoder(self, variant, **overrides):
        return build(variant, classify=False, **overrides)  # the encoder, without the classification head

    def skip(self, variant, method):
        if variant == "videomae" and method in DATA_DEPENDENT_COUNTS:
            # the head's plain mean would average each row's padding: see test_dtome_rows_are_their_videos
            return "per-video counts under VideoMAE's unweighted mean-pooling head"
        return None


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tome_merges_r_space_time_tokens_per_block(name):
    model, x = build(name, classify=False), videos(batch=3)
    expected = run(model, x)
    tokenreduce.apply(model, "tome", r=6)
    out, rec = run(model, x), tokenreduce.record(model)
    p = PREFIX[name]
    assert rec.input_tokens == p + 64
    assert rec.tokens_per_layer == tuple(p + 64 - 6 * (i + 1) for i in range(4))
    assert out.shape == (3, p + 40, 32)
    assert torch.equal(rec.size.sum(dim=(1, 2)), torch.full((3,), p + 64.0))
    # one bipartite matching over all tubelets: some final tokens cover tubelets of several time slices
    slices = torch.arange(64) // SLICE
    for owner in rec.owner[:, p:]:
        spans = [slices[owner == token].unique().numel() for token in owner.unique()]
        assert max(spans) > 1
    assert not torch.allclose(size_weighted_mean(out, rec.size), expected.mean(1), atol=1e-4)


def test_tubelets_as_image_patches_are_the_tokens_in_order():
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 8, 8), stride=(2, 8, 8))
    video = torch.randn(2, 3, 9, 36, 33)  # trailing frame, rows and columns past the last whole tubelet
    tokens = conv(video).flatten(2).transpose(1, 2)  # [B, 4 * 4 * 4, 16] in (time, row, column) order
    image = tubelets_as_image(video, 2, (8, 8))
    assert image.shape == (2, 6, 4 * 32, 32)
    patches = patchify(image, (8, 8))
    torch.testing.assert_close(patches @ conv.weight.flatten(1).T + conv.bias, tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vwt_keeps_the_tubelets_whose_pixels_vary_most(name):
    model, x = build(name), videos(batch=2)
    tokenreduce.apply(model, "vwt", keep_ratio=0.6)
    run(model, x)
    kept = tokenreduce.record(model).owner[:, PREFIX[name] :] >= 0
    # [B, T, C, H, W] -> [B, time slice, row, column, channel, frame, y, x]
    tubelets = x.unflatten(1, (4, 2)).unflatten(-2, (4, 8)).unflatten(-1, (4, 8)).permute(0, 1, 4, 6, 3, 2, 5, 7)
    variance = tubelets.flatten(4).var(dim=-1).flatten(1)
    want = torch.zeros_like(kept).scatter_(1, variance.topk(39, dim=1).indices, True)
    assert torch.equal(kept, want)


def test_dtome_rows_are_their_videos():
    """Per-video counts: each row of VideoMAEModel's padded output is what its video gives alone, and the
    size-weighted mean the docstring recommends for mean pooling is the video's own."""
    model, x = build("videomae", classify=False), videos(batch=4)
    tokenreduce.apply(model, "dtome", thresholds=0.75)
    padded, size = run(model, x), tokenreduce.record(model).size
    lengths = set()
    for i in range(4):
        alone = run(model, x[i : i + 1])
        lengths.add(alone.shape[1])
        torch.testing.assert_close(padded[i, : alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)
        assert (size[i, alone.shape[1] :] == 0).all()
        mean_alone = size_weighted_mean(alone, tokenreduce.record(model).size)
        torch.testing.assert_close(size_weighted_mean(padded, size)[i], mean_alone[0], rtol=1e-5, atol=1e-5)
    assert len(lengths) > 1, "dtome gave every video the same count: the test shows nothing"


# the default configs' tubelet tokens: 16 frames / 2 x 14 x 14 (VideoMAE-B), 32 frames / 2 x 14 x 14 (ViViT-B)
FULL_SIZE_TOKENS = {"videomae": 1568, "vivit": 1 + 3136}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_method_default_plans_on_full_size_models(name):
    model_name, _, config, _ = FAMILIES[name]
    with torch.device("meta"):
        model = getattr(transformers, model_name)(getattr(transformers, config)())
    # gtp's spatial graph and expedite's clusters default to a square grid, which 1568 tokens do not fill:
    # they need grid=(rows, cols) and clusters=(h, w)
    check_defaults_plan(model, unplannable=("expedite", "gtp") if name == "videomae" else ())
    tokenreduce.apply(model, "tome", r=8)
    tokens = FULL_SIZE_TOKENS[name]
    assert f"tokens per block at the native input size: {tokens} -> {tokens - 8} " in tokenreduce.describe(model)


def test_timesformer_is_refused_with_the_reason():
    config = transformers.TimesformerConfig(patch_size=8, **SIZES)
    for model in (transformers.TimesformerModel(config), transformers.TimesformerForVideoClassification(config)):
        with pytest.raises(TypeError, match="cannot patch TimesformerModel.*divided space-time attention"):
            tokenreduce.apply(model, "tome", r=2)
        assert not tokenreduce.is_patched(model)


def test_videomae_pretraining_is_refused_with_the_reason():
    _, _, config, kw = FAMILIES["videomae"]
    model = transformers.VideoMAEForPreTraining(getattr(transformers, config)(**SIZES, **kw))
    with pytest.raises(TypeError, match=r"cannot patch VideoMAEForPreTraining: its decoder .* tokenreduce.apply\(model.videomae"):
        tokenreduce.apply(model, "tome", r=2)
    tokenreduce.apply(model.videomae, "tome", r=2)  # its encoder, as the error says
    assert tokenreduce.is_patched(model.videomae)
