"""SiTo on tiny diffusers denoisers: the naive oracle (``naive_sito``) on a full-resolution UNet, a DiT and PixArt, config
checks, identities, every architecture, batch against singles, and compile."""

from __future__ import annotations

import diffusion_models as dm
import pytest
import torch

import naive_sito as naive
import tokenreduce
from tokenreduce.api import patch_of
from tokenreduce.core import hash_normal
from tokenreduce.methods.sito import SiTo
from tokenreduce.methods.tomesd import timestep_key


def engine_run(d: dm.Denoiser, kw: dict, **config) -> tuple[torch.Tensor, list]:
    """The patched model's output and the selections its blocks made (in call order)."""
    tokenreduce.apply(d.model, "sito", **config)
    method = patch_of(d.model).method
    selections = []

    def plan(x, ctx, _plan=method.plan):
        selection = _plan(x, ctx)
        if selection is not None:
            selections.append((ctx.grid, selection))
        return selection

    method.plan = plan
    try:
        return dm.output(d.model, kw), selections
    finally:
        tokenreduce.remove(d.model)


def naive_run(d: dm.Denoiser, kw: dict, grid: tuple[int, int], seed: int = 0, **config) -> tuple[torch.Tensor, list]:
    """The unpatched model under the oracle's hooks, with the method's noise values and its default noise_alpha."""
    config = {"noise_alpha": 0.1, **config}

    def noise(block: int, n: int) -> torch.Tensor:
        return hash_normal(n, timestep_key(seed, block, kw["timestep"]))

    oracle = naive.NaiveSiTo(d.model, grid, noise if config["noise_alpha"] else None, **config)
    try:
        return dm.output(d.model, kw), oracle.plans
    finally:
        oracle.remove()


CASES = {
    # model builder, latent (h, w), the acting blocks' grid
    "unet_square": (lambda: dm.unet(full_res=True, size=16), (16, 16), (16, 16)),
    "unet_odd": (lambda: dm.unet(full_res=True, size=16), (15, 9), (15, 9)),
    "dit_square": (dm.dit, (16, 16), (8, 8)),
    "pixart_odd": (dm.pixart, (10, 14), (5, 7)),  # diffusers' DiT un-patchifies square grids only
}
CONFIGS = {
    "no_noise": dict(noise_alpha=0.0),
    # noise as strong as the summed similarities, so that it moves base tokens
    "noise": dict(noise_alpha=1.0, sim_beta=0.02),
    "nearest_3x1": dict(recover="nearest", sx=3, sy=1, ratio=0.6),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_naive_oracle(case, config):
    build, (h, w), grid = CASES[case]
    d = build()
    kw = d.inputs(h=h, w=w)
    config = {"ratio": 0.5, **CONFIGS[config]}
    out, selections = engine_run(d, kw, **config)
    want, plans = naive_run(d, kw, grid, **config)
    assert len(selections) == len(plans) > 0
    nb = (grid[0] // config.get("sy", 2)) * (grid[1] // config.get("sx", 2))
    for (g, selection), images in zip(selections, plans):
        assert g == grid
        for b, p in enumerate(images):
            assert sorted(selection.index[b, -nb:].tolist()) == p.base
            assert sorted(selection.index[b].tolist()) == p.kept
            assert selection.index[b].gather(0, selection.slot[b]).tolist() == p.source
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_noise_moves_base_tokens_and_follows_the_timestep():
    d = dm.dit()
    kw = d.inputs()
    _, quiet = engine_run(d, kw, noise_alpha=0.0)
    _, noisy = engine_run(d, kw, noise_alpha=1.0, sim_beta=0.02)
    _, later = engine_run(d, {**kw, "timestep": kw["timestep"] - 1}, noise_alpha=1.0, sim_beta=0.02)
    _, again = engine_run(d, kw, noise_alpha=1.0, sim_beta=0.02)
    index = [[s.index for _, s in run] for run in (quiet, noisy, later, again)]
    assert not torch.equal(index[0][0], index[1][0])
    assert not torch.equal(index[1][0], index[2][0])
    assert all(torch.equal(a, b) for a, b in zip(index[1], index[3]))  # deterministic


def test_config_is_validated():
    assert SiTo().ratio == 0.5 and SiTo(ratio=0.75).ratio == 0.75
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.75\].*clip=True to prune"):
        SiTo(ratio=0.8)
    assert SiTo(ratio=0.8, clip=True).ratio == 0.8
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.666667\] with sx=3, sy=1"):
        SiTo(ratio=0.7, sx=3, sy=1)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio must be a number in"):
            SiTo(ratio=bad, clip=True)
    with pytest.raises(ValueError, match="noise_alpha must be a number >= 0"):
        SiTo(noise_alpha=-1)
    with pytest.raises(ValueError, match="sim_beta must be a number >= 0"):
        SiTo(sim_beta=-1)
    with pytest.raises(ValueError, match="recover must be one of"):
        SiTo(recover="mean")
    with pytest.raises(ValueError, match="sx must be an integer >= 1"):
        SiTo(sx=0)
    with pytest.raises(ValueError, match="at least one of prune_attn"):
        SiTo(prune_attn=False)


def test_clip_prunes_every_candidate():
    d = dm.dit(size=10)  # a 5x5 grid: 4 cells, 21 candidates, 23 = int(25 * 0.95) asked for
    out, selections = engine_run(d, d.inputs(), ratio=0.95, clip=True)
    assert all(s.num_out == 4 for _, s in selections)


def test_ratio_zero_and_remove_are_bit_exact():
    d = dm.unet(full_res=True, size=16)
    kw = d.inputs()
    ref = dm.output(d.model, kw)
    out, selections = engine_run(d, kw, ratio=0.0)
    assert torch.equal(out, ref) and not selections
    tokenreduce.apply(d.model, "sito", ratio=0.5)
    assert not torch.equal(dm.output(d.model, kw), ref)
    tokenreduce.apply(d.model, "sito", ratio=0.5)  # again: replaces the first patch
    tokenreduce.remove(d.model)
    assert torch.equal(dm.output(d.model, kw), ref)


@pytest.mark.parametrize("name", ["unet", "unet_sdxl", "dit", "pixart", "sd3", "sd3_dual", "flux"])
def test_changes_every_architecture(name):
    d = dm.BUILDERS[name]()
    kw = d.inputs()
    ref = dm.output(d.model, kw)
    config = {"max_downsample": 2} if name == "unet_sdxl" else {}
    if name == "unet_sdxl":
        with pytest.raises(ValueError, match="raise max_downsample to at least 2"):
            tokenreduce.apply(d.model, "sito")
    for parts in ({}, {"prune_crossattn": True, "prune_mlp": True}):
        tokenreduce.apply(d.model, "sito", **config, **parts)
        out = dm.output(d.model, kw)
        assert tokenreduce.record(d.model).reduced_blocks > 0
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert (out - ref).abs().max() > 1e-4
        tokenreduce.remove(d.model)
    assert torch.equal(dm.output(d.model, kw), ref)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_batch_equals_singles_and_split_cfg(name):
    d = dm.BUILDERS[name]()
    kw = d.inputs(batch=3)
    tokenreduce.apply(d.model, "sito", ratio=0.6)
    batch = dm.output(d.model, kw)
    for b in range(3):
        one = {k: v[b : b + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in kw.items()}
        torch.testing.assert_close(dm.output(d.model, one), batch[b : b + 1], atol=1e-5, rtol=0)
    tokenreduce.remove(d.model)


def test_positional_and_keyword_calls_agree():
    d = dm.unet(full_res=True, size=16)
    kw = d.inputs()
    tokenreduce.apply(d.model, "sito")
    with torch.no_grad():
        positional = d.model(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], return_dict=False)[0]
    assert torch.equal(positional, dm.output(d.model, kw))
    tokenreduce.remove(d.model)


def test_compiles_without_graph_breaks():
    d = dm.dit()
    kw = d.inputs()
    tokenreduce.apply(d.model, "sito", recover="nearest")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(d.model)(**kw, return_dict=False)
    tokenreduce.remove(d.model)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
