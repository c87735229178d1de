"""importance_tome: the matching against a naive oracle (step by step and on a whole UNet call), the
classifier-free-guidance importance from batched and split CFG, the step schedule and its fallbacks in a
Stable Diffusion pipeline, and every denoiser architecture."""

from __future__ import annotations

import pytest
import torch
from diffusion_models import BUILDERS, output, sd_pipeline, unet

import naive_importance_tome as naive
import tokenreduce
from tokenreduce.core import index_only, pool_partition
from tokenreduce.methods.denoiser import DenoiserContext
from tokenreduce.methods.importance_tome import ImportanceToMe, guidance_difference
from tokenreduce.methods.tomesd import ToMeSD

torch.set_num_threads(1)


def _memory(model):
    return tokenreduce.api.patch_of(model).local.generation.memory


def _ctx(grid, step, memory, block=3, t=400.0, level=1):
    return DenoiserContext(block, 4, level, grid, torch.tensor(t), step, memory)


# -- the matching against the oracle ---------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (6, 9)])
@pytest.mark.parametrize(
    "config",
    [dict(ratio=0.7), dict(ratio=0.5, pool_ratio=1.0), dict(ratio=0.3, dst_ratio=0.2, seed=3)],
)
@pytest.mark.parametrize("split", [False, True])
def test_plan_matches_naive_matching(grid, config, split):
    h, w = grid
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, h * w, 16, generator=g)
    eps = torch.randn(2, 4, h, w, generator=g)
    method = ImportanceToMe(**config)
    memory = method.new_memory()
    if split:  # two calls at step 1 (uncond, cond) with one row each; step 2 plans a call of one row
        uncond, cond = eps[:1], eps[1:]
        memory.observe(uncond, 1, grid)
        memory.observe(cond, 1, grid)
        x = x[:1]
    else:  # one call of [uncond; cond]; both rows of the next call share its partition
        memory.observe(eps, 1, grid)
        uncond, cond = eps[:1], eps[1:]
    sel = method.plan(x, _ctx(grid, 2, memory))
    importance = [v for row in naive.guidance_map(uncond[0], cond[0]) for v in row]
    key = naive.hash_key(method.seed, 3, 400.0)
    kk, pp = method.dst_ratio, method.pool_ratio
    dst, _, _ = naive.partition(importance, int(h * w * method.ratio), kk, pp, key)
    for b in range(x.shape[0]):
        groups, unmerged = naive.plan(x[b], importance, method.ratio, kk, pp, key)
        merged, where = naive.merge(x[b], groups, unmerged)
        assert sel.index[b, len(unmerged) :].tolist() == dst
        assert sel.slot[b].tolist() == where
        torch.testing.assert_close(sel.apply(x)[b], merged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sel.unmerge(sel.apply(x))[b], naive.unmerge(merged, where), rtol=1e-5, atol=1e-5)


def test_prune_steps_keep_destinations_unaveraged():
    # steps between prune_from and merge_from: the reference's m_mode="none", on tomesd's cells (SD) or,
    # with prune_importance, on the importance partition (PixArt)
    grid = (6, 8)
    x = torch.randn(2, 48, 16, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, *grid, generator=torch.Generator().manual_seed(1))
    for prune_importance in (False, True):
        method = ImportanceToMe(ratio=0.5, prune_importance=prune_importance)
        memory = method.new_memory()
        memory.observe(eps, 0, grid)
        sel = method.plan(x, _ctx(grid, 1, memory))
        if prune_importance:
            importance = [v for row in naive.guidance_map(eps[0], eps[1]) for v in row]
            groups, unmerged = naive.plan(x[0], importance, 0.5, 0.25, 1.4, naive.hash_key(0, 3, 400.0))
            merged, where = naive.merge(x[0], groups, unmerged, average=False)
            assert sel.slot[0].tolist() == where
            assert torch.equal(sel.apply(x)[0], merged)
        else:
            cells = ToMeSD(ratio=0.5).plan(x, _ctx(grid, 1, None))
            assert torch.equal(sel.slot, cells.slot) and torch.equal(sel.index, cells.index)
        assert torch.equal(sel.apply(x), x[torch.arange(2)[:, None], sel.index])  # kept tokens, not means
        back = sel.unmerge(sel.apply(x))
        assert torch.equal(back, sel.apply(x)[torch.arange(2)[:, None], sel.slot])  # sources copy their destination


def test_steps_without_importance_fall_back_to_tomesd_cells():
    grid = (8, 8)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    cells = ToMeSD(ratio=0.7).plan(x, _ctx(grid, 0, None))
    method = ImportanceToMe(merge_from=0, prune_from=None)
    # the first step, and a step after a call without guidance (odd batch)
    odd = method.new_memory()
    odd.observe(torch.randn(1, 4, 8, 8), 0, grid)
    for step, memory in ((0, method.new_memory()), (1, odd), (0, None)):
        sel = method.plan(x, _ctx(grid, step, memory, t=400.0))
        assert torch.equal(sel.slot, cells.slot) and torch.equal(sel.index, cells.index)
    # default schedule, first step: prune on the cells
    sel = ImportanceToMe().plan(x, _ctx(grid, 0, method.new_memory()))
    assert torch.equal(sel.coeff, index_only(cells).coeff)
    assert ImportanceToMe(prune_from=1).plan(x, _ctx(grid, 0, method.new_memory())) is None
    assert ImportanceToMe(ratio=0.0).plan(x, _ctx(grid, 5, odd)) is None


def test_pool_partition_ties_and_threshold():
    # equal scores: the lower position joins the pool; a source tied with the pool's lowest is not below it
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0, 1.0, 3.0, 0.0, 2.0]])
    for key in range(20):
        src, dst, below = pool_partition(scores, 5, 2, key)
        assert set(dst[0].tolist()) <= {1, 2, 3, 5, 7} and dst[0].tolist() == sorted(dst[0].tolist())
        assert sorted(src[0].tolist() + dst[0].tolist()) == list(range(8)) and src[0].tolist() == sorted(src[0].tolist())
        assert below[0].tolist() == [s in (0, 6) for s in src[0].tolist()]
    draws = {tuple(pool_partition(scores, 5, 2, key)[1][0].tolist()) for key in range(20)}
    assert len(draws) > 5  # the key draws


def test_guidance_difference_layouts():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 8, 3, 5, generator=g)
    expected = (out[2:, :4] - out[:2, :4]).abs().mean(1)
    torch.testing.assert_close(guidance_difference([out], True, (3, 5)), expected)
    torch.testing.assert_close(guidance_difference([out[:2], out[2:]], True, (3, 5)), expected)
    packed = out[:, :4].flatten(2).transpose(1, 2)  # FLUX: [B, N, C]
    torch.testing.assert_close(guidance_difference([packed], False, (3, 5)), expected)
    video = torch.randn(2, 4, 3, 5, 6, generator=g)  # [B, C, F, H, W]: frames fold into the batch
    torch.testing.assert_close(guidance_difference([video], False, (5, 6)), (video[1] - video[0]).abs().mean(0))
    assert guidance_difference([out[:1]], False, (3, 5)) is None
    assert guidance_difference([out[:2]] * 3, False, (3, 5)) is None


def test_constant_tokens_pass_through():
    x = torch.ones(2, 64, 8) * torch.randn(8)
    method = ImportanceToMe()
    memory = method.new_memory()
    memory.observe(torch.randn(2, 4, 8, 8), 1, (8, 8))
    sel = method.plan(x, _ctx((8, 8), 2, memory))
    torch.testing.assert_close(sel.unmerge(sel.apply(x)), x, rtol=1e-6, atol=1e-6)  # means of up to 13 equal tokens


# -- a whole UNet call against the oracle wired in with plain hooks -------------------------------


def _naive_call(model, kw, importance, ratio, seed, t):
    """``model(**kw)`` with the oracle's merge around every full-resolution ``attn1``: plain torch hooks,
    blocks numbered in call order, both CFG rows on the one image's partition."""
    h, w = kw["sample"].shape[-2:]
    state = {"block": 0, "plans": None}

    def block_pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        key = naive.hash_key(seed, state["block"], t)
        state["block"] += 1
        acts = x.shape[1] == h * w
        state["plans"] = [naive.plan(row, importance, ratio, 0.25, 1.4, key) for row in x] if acts else None

    def attn_pre(module, args, kwargs):
        if state["plans"] is None:
            return None
        merged = [naive.merge(row, *plan) for row, plan in zip(args[0], state["plans"])]
        state["where"] = [where for _, where in merged]
        return (torch.stack([m for m, _ in merged]), *args[1:]), kwargs

    def attn_post(module, args, kwargs, out):
        if state["plans"] is None:
            return None
        return torch.stack([naive.unmerge(row, where) for row, where in zip(out, state["where"])])

    handles = []
    for module in model.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            handles.append(module.register_forward_pre_hook(block_pre, with_kwargs=True))
            handles.append(module.attn1.register_forward_pre_hook(attn_pre, with_kwargs=True))
            handles.append(module.attn1.register_forward_hook(attn_post, with_kwargs=True))
    try:
        return output(model, kw)
    finally:
        for handle in handles:
            handle.remove()


def test_unet_call_matches_naive_oracle():
    d = unet()
    first, second = d.inputs(h=16, w=24, t=500.0), d.inputs(seed=1, h=16, w=24, t=400.0)
    eps = output(d.model, first)  # the first step runs untouched (merge_from=1, no prune steps)
    importance = [v for row in naive.guidance_map(eps[0], eps[1]) for v in row]
    expected = _naive_call(d.model, second, importance, 0.6, 2, 400.0)
    with tokenreduce.applied(d.model, "importance_tome", ratio=0.6, merge_from=1, prune_from=None, seed=2):
        assert torch.equal(output(d.model, first), eps)
        got = output(d.model, second)
        rec = tokenreduce.record(d.model)
    assert rec.step == 1 and rec.reduced_blocks == 3
    assert (got - output(d.model, second)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- a Stable Diffusion pipeline: steps, batched and split CFG, generations -----------------------


@pytest.fixture(scope="module")
def sd():
    """A 4-step StableDiffusionPipeline on the tiny UNet and VAE (spec section 5.2), its embeddings and
    starting latents (32x32: 1024 tokens at the full-resolution blocks)."""
    pipe = sd_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    return pipe, embeds, torch.randn(1, 4, 32, 32, generator=g)


def _generate(sd, seen=None, **kw):
    """The pipeline's final latents; ``seen`` collects, after every step, the step the last UNet call
    counted, the importance map the next step will use, and the token counts its blocks left."""
    pipe, (positive, negative), latents = sd

    def after_step(p, i, t, tensors):
        rec = tokenreduce.record(p)
        seen.append((rec.step, _memory(p.unet).on_grid(i + 1, (32, 32)), {c.tokens_out for c in rec.calls}))
        return {}

    return pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        latents=latents,
        num_inference_steps=4,
        output_type="latent",
        **({} if seen is None else {"callback_on_step_end": after_step}),
        **kw,
    ).images


def _generate_split(sd, seen):
    """The pipeline's loop written out with split CFG: the UNet called for uncond, then cond, at each
    timestep; ``seen`` as in :func:`_generate`, plus the step each of the two calls counted."""
    pipe, (positive, negative), latents = sd
    scheduler = pipe.scheduler
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(latents, t)
            uncond = pipe.unet(x, t, encoder_hidden_states=negative).sample
            first = tokenreduce.record(pipe).step
            cond = pipe.unet(x, t, encoder_hidden_states=positive).sample
            assert first == tokenreduce.record(pipe).step
            latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
            seen.append((first, _memory(pipe.unet).on_grid(i + 1, (32, 32)), None))
    return latents


def test_pipeline_batched_and_split_cfg_agree(sd):
    pipe = sd[0]
    base = _generate(sd)
    tokenreduce.apply(pipe, "importance_tome")
    try:
        batched, split = [], []
        got = _generate(sd, batched)
        assert [step for step, _, _ in batched] == [0, 1, 2, 3]  # counted per timestep, not per call
        for _, importance, _ in batched:
            assert importance.shape == (1, 1024) and importance.max() > 0
        assert (got - base).abs().max() > 1e-4
        got_split = _generate_split(sd, split)
        assert [step for step, _, _ in split] == [0, 1, 2, 3]
        for (_, a, _), (_, b, _) in zip(batched, split):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        # the latents grow to ~75 on random weights; unpatched, batched and split calls differ by 2e-4 already
        torch.testing.assert_close(got_split, got, rtol=1e-5, atol=1e-3)
        # a second call starts a new generation (its timestep goes up): nothing carries over
        memory = _memory(pipe.unet)
        again = []
        assert torch.equal(_generate(sd, again), got)
        assert _memory(pipe.unet) is not memory
        assert [step for step, _, _ in again] == [0, 1, 2, 3]
    finally:
        tokenreduce.remove(pipe)
    assert torch.equal(_generate(sd), base)


def test_pipeline_first_step_and_schedule(sd):
    pipe = sd[0]
    merged = 1024 - int(1024 * 0.7)
    for config, acting in ((dict(merge_from=0, prune_from=None), [0, 1, 2, 3]), (dict(merge_from=3, prune_from=1), [1, 2, 3])):
        seen = []
        with tokenreduce.applied(pipe, "importance_tome", **config):
            _generate(sd, seen)
        # the first step has no map and merges on tomesd's cells; untouched steps say so
        assert [(step, counts) for step, _, counts in seen] == [(i, {merged} if i in acting else set()) for i in range(4)]


def test_pipeline_identity_and_without_guidance(sd):
    pipe = sd[0]
    base = _generate(sd)
    for config in (dict(ratio=0.0), dict(merge_from=4, prune_from=None)):
        with tokenreduce.applied(pipe, "importance_tome", **config):
            assert torch.equal(_generate(sd), base)
            assert tokenreduce.record(pipe).reduced_blocks == 0
    # guidance_scale 1: one call of one image per step, no importance ever; tomesd's cells instead
    plain = _generate(sd, guidance_scale=1.0)
    with tokenreduce.applied(pipe, "importance_tome"):
        got = _generate(sd, guidance_scale=1.0)
        assert _memory(pipe.unet).on_grid(4, (32, 32)) is None
        assert tokenreduce.record(pipe).reduced_blocks == 3
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 1e-4


# -- every architecture; per-image partitions ------------------------------------------------------


@pytest.mark.parametrize("name", ["unet_sdxl", "dit", "pixart", "sd3", "sd3_dual", "flux"])
def test_acts_on_every_architecture(name):
    d = BUILDERS[name]()
    t0, t1 = (0.9, 0.8) if name == "flux" else (500.0, 400.0)
    first, second = d.inputs(batch=2, t=t0), d.inputs(batch=2, seed=1, t=t1)
    base = output(d.model, second)
    config = dict(merge_from=1, prune_from=None, ratio=0.5, learned_sigma=name in ("dit", "pixart"))
    with tokenreduce.applied(d.model, "importance_tome", max_downsample=2 if name == "unet_sdxl" else 1, **config):
        output(d.model, first)
        got = output(d.model, second)
        rec = tokenreduce.record(d.model)
        importance = _memory(d.model).importance
    assert rec.step == 1 and rec.reduced_blocks > 0 and importance is not None and importance.shape[0] == 1
    assert got.shape == base.shape and torch.isfinite(got).all() and (got - base).abs().max() > 1e-4


def test_batch_equals_singles():
    # rows [uncond0, uncond1, cond0, cond1]: each image's partition comes from its own map
    d = unet()
    first, second = d.inputs(batch=4, h=16, w=16, t=500.0), d.inputs(batch=4, seed=1, h=16, w=16, t=400.0)
    with tokenreduce.applied(d.model, "importance_tome", merge_from=1, prune_from=None):
        output(d.model, first)
        both = output(d.model, second)
        for i in range(2):
            rows = torch.tensor([i, i + 2])
            pick = {k: v[rows] if v.dim() else v for k, v in first.items()}
            output(d.model, pick)  # the timestep goes up: a new generation
            pick = {k: v[rows] if v.dim() else v for k, v in second.items()}
            torch.testing.assert_close(output(d.model, pick), both[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(25, 33), (17, 16)])
def test_non_square_and_odd_latents(size):
    # attention at the 2x-downsampled level: the latent's map is area-interpolated to a 13x17 (9x8) grid
    d = unet(full_res=False)
    first, second = d.inputs(h=size[0], w=size[1], t=500.0), d.inputs(seed=1, h=size[0], w=size[1], t=400.0)
    base = output(d.model, second)
    with tokenreduce.applied(d.model, "importance_tome", merge_from=1, prune_from=None, max_downsample=2):
        output(d.model, first)
        got = output(d.model, second)
        grid = (-(-size[0] // 2), -(-size[1] // 2))
        assert _memory(d.model).pooled[grid].shape == (1, grid[0] * grid[1])
        assert tokenreduce.record(d.model).reduced_blocks > 0
    assert torch.isfinite(got).all() and (got - base).abs().max() > 1e-4


def test_keyword_and_positional_calls_agree():
    d = unet()
    runs = []
    with tokenreduce.applied(d.model, "importance_tome", merge_from=1, prune_from=None):
        for positional in (False, True):
            outs = []
            for seed, t in ((0, 500.0), (1, 400.0)):
                kw = d.inputs(h=16, w=16, seed=seed, t=t)
                with torch.no_grad():
                    if positional:
                        outs.append(d.model(kw["sample"], kw["timestep"], kw["encoder_hidden_states"]).sample)
                    else:
                        outs.append(output(d.model, kw))
            runs.append(outs)
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(
    "config,error,match",
    [
        (dict(ratio=0.8), ValueError, r"ratio must be in \[0, 0.75\] with dst_ratio=0.25 and pool_ratio=1.4"),
        (dict(ratio=0.6, pool_ratio=0.5), ValueError, r"ratio must be in \[0, 0.5\]"),
        (dict(dst_ratio=0), ValueError, r"dst_ratio must be a number in \(0, 1\)"),
        (dict(pool_ratio=-1), ValueError, r"pool_ratio must be a number > 0"),
        (dict(prune_from=3), ValueError, r"prune_from must be None or an integer in \[0, merge_from=2\], got 3"),
        (dict(merge_from=-1), ValueError, r"merge_from must be an integer >= 0"),
        (dict(max_downsample=0), ValueError, r"max_downsample must be an integer >= 1"),
        (dict(merge_attn=False), ValueError, r"at least one of merge_attn, merge_crossattn, merge_mlp"),
        (dict(learned_sigma=1), TypeError, r"learned_sigma must be True or False"),
    ],
)
def test_config_errors_name_the_argument(config, error, match):
    with pytest.raises(error, match=match):
        ImportanceToMe(**config)
