"""The denoiser stage on every supported diffusers architecture, with tomesd as the method: parity with the
tomesd package, the failure modes of existing tools (spec section 6) as tests, and the engine's contract."""

from __future__ import annotations

import math

import pytest
import torch
from diffusion_models import BUILDERS, dit, flux, output, pixart, sd_pipeline, unet, unet_sdxl

import tokenreduce
from tokenreduce.core import Selection, cell_partition, random_cell_choice
from tokenreduce.methods.denoiser import DenoiserContext
from tokenreduce.methods.tomesd import ToMeSD

torch.set_num_threads(1)
ARCHS = sorted(BUILDERS)


def _traces(model):
    return [(name, type(m), sorted(vars(m))) for name, m in model.named_modules()]


def _max_downsample(name: str) -> int:
    return 2 if name == "unet_sdxl" else 1


# -- naive tomesd, written from the spec (loops; shares no code with tokenreduce) --------------------


def naive_tomesd_merge(x: torch.Tensor, h: int, w: int, sx: int, sy: int, ratio: float):
    """One batch row ``x [N, C]``: destinations are the top-left token of every whole cell; each source
    goes to its most cosine-similar destination; the int(N * ratio) best-matched sources merge by mean.
    Returns (merged tokens in tomesd's order [unmerged sources by descending score, destinations], the
    list mapping every input token to its merged token)."""
    n = h * w
    dst = [(i * sy) * w + j * sx for i in range(h // sy) for j in range(w // sx)]
    src = [t for t in range(n) if t not in set(dst)]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = []
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        k = max(range(len(dst)), key=lambda i: sims[i])
        best.append((sims[k], s, k))
    order = sorted(best, key=lambda t: -t[0])  # distinct scores on random data: ties do not arise
    r = min(int(n * ratio), len(src))
    merged, unmerged = order[:r], order[r:]
    groups = {k: [dst[k]] for k in range(len(dst))}
    for _, s, k in merged:
        groups[k].append(s)
    out = [x[s] for _, s, _ in unmerged] + [torch.stack([x[t] for t in groups[k]]).mean(0) for k in range(len(dst))]
    where = [0] * n
    for i, (_, s, _) in enumerate(unmerged):
        where[s] = i
    for k in range(len(dst)):
        for t in groups[k]:
            where[t] = len(unmerged) + k
    return torch.stack(out), where


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (6, 9)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_plan_matches_naive_merge(grid, ratio):
    h, w = grid
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * w))
    method = ToMeSD(ratio=ratio, use_rand=False)
    sel = method.plan(x, DenoiserContext(0, 1, 1, grid, None))
    for b in range(2):
        merged, where = naive_tomesd_merge(x[b], h, w, 2, 2, ratio)
        torch.testing.assert_close(sel.apply(x)[b], merged, rtol=1e-5, atol=1e-6)
        assert sel.slot[b].tolist() == where


def test_grid_without_a_whole_cell_is_left_alone():
    x = torch.randn(2, 8, 4)
    assert ToMeSD(ratio=0.5).plan(x, DenoiserContext(0, 1, 1, (1, 8), torch.tensor(1.0))) is None


def test_constant_tokens_pass_through():
    x = torch.ones(1, 64, 8) * torch.randn(8)
    sel = ToMeSD(ratio=0.5).plan(x, DenoiserContext(0, 1, 1, (8, 8), torch.tensor(10.0)))
    torch.testing.assert_close(sel.unmerge(sel.apply(x)), x, rtol=1e-6, atol=1e-6)  # means of equal tokens


def test_cell_partition_covers_grid_with_one_destination_per_cell():
    for h, w in [(8, 8), (7, 5), (1, 9)]:
        choice = random_cell_choice((h // 2, w // 2), 4, 123)
        src, dst = cell_partition((h, w), 2, 2, choice)
        assert sorted(src.tolist() + dst.tolist()) == list(range(h * w))
        assert len(dst) == (h // 2) * (w // 2)
        cells = {((int(d) // w) // 2, (int(d) % w) // 2) for d in dst}
        assert len(cells) == len(dst)


def test_random_destinations_depend_on_timestep_and_block_only():
    x = torch.randn(1, 64, 8)
    method = ToMeSD(ratio=0.5)
    plan = lambda block, t: method.plan(x, DenoiserContext(block, 2, 1, (8, 8), torch.tensor(t))).index  # noqa: E731
    assert torch.equal(plan(0, 500.0), plan(0, 500.0))
    assert not torch.equal(plan(0, 500.0), plan(0, 480.0))
    assert not torch.equal(plan(0, 500.0), plan(1, 500.0))
    rng = torch.get_rng_state()
    plan(0, 1.0)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is never consumed


# -- parity with the tomesd package ----------------------------------------------------------------


def _positional(model, kw):
    # tomesd's size hook reads args[0]: it needs positional calls
    with torch.no_grad():
        return model(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], return_dict=False)[0]


@pytest.mark.parametrize("full_res", [True, False])
@pytest.mark.parametrize(
    "config",
    [
        dict(ratio=0.5),
        dict(ratio=0.3, merge_crossattn=True),
        dict(ratio=0.75, merge_mlp=True),
        dict(ratio=0.5, sx=4, sy=2),
    ],
)
def test_parity_with_tomesd_package(full_res, config):
    tomesd = pytest.importorskip("tomesd")
    d = unet(full_res=full_res)
    kw = d.inputs()
    config = dict(config, max_downsample=1 if full_res else 2, use_rand=False)
    base = _positional(d.model, kw)
    tomesd.apply_patch(d.model, **config)
    try:
        expected = _positional(d.model, kw)
    finally:
        tomesd.remove_patch(d.model)
    assert (expected - base).abs().max() > 1e-3
    with tokenreduce.applied(d.model, "tomesd", **config):
        got = _positional(d.model, kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- the engine on every architecture --------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_reduces_and_restores_every_architecture(name):
    d = BUILDERS[name]()
    kw = d.inputs()
    base, before = output(d.model, kw), _traces(d.model)
    tokenreduce.apply(d.model, "tomesd", ratio=0.5, max_downsample=_max_downsample(name))
    got = output(d.model, kw)
    assert got.shape == base.shape and torch.isfinite(got).all()
    assert (got - base).abs().max() > 1e-4  # tomesd did nothing on SDXL, DiT and SD3
    rec = tokenreduce.record(d.model)
    assert rec.reduced_blocks > 0
    for call in rec.calls:
        assert call.tokens_out == call.tokens_in - int(call.tokens_in * 0.5)
    tokenreduce.remove(d.model)
    assert torch.equal(output(d.model, kw), base)
    assert _traces(d.model) == before


@pytest.mark.parametrize("name", ARCHS)
def test_ratio_zero_is_bit_exact(name):
    d = BUILDERS[name]()
    kw = d.inputs()
    base = output(d.model, kw)
    with tokenreduce.applied(d.model, "tomesd", ratio=0.0, max_downsample=_max_downsample(name)):
        assert torch.equal(output(d.model, kw), base)
        assert tokenreduce.record(d.model).reduced_blocks == 0  # says it did nothing


def test_apply_remove_cycles_are_bit_exact():
    d = dit()
    kw = d.inputs()
    base = output(d.model, kw)
    tokenreduce.apply(d.model, "tomesd", ratio=0.5)
    once = output(d.model, kw)
    tokenreduce.apply(d.model, "tomesd", ratio=0.5)  # replaces, does not stack
    assert torch.equal(output(d.model, kw), once)
    for _ in range(2):
        tokenreduce.remove(d.model)
        assert torch.equal(output(d.model, kw), base)
        tokenreduce.apply(d.model, "tomesd", ratio=0.5)
        assert torch.equal(output(d.model, kw), once)
    tokenreduce.remove(d.model)


@pytest.mark.parametrize("name", ["unet", "dit", "sd3", "flux"])
def test_batch_equals_singles(name):
    # destinations are shared by every row and call at one timestep (cond and uncond, batched or split)
    d = BUILDERS[name]()
    kw = d.inputs(batch=2)
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5):
        both = output(d.model, kw)
        for b in range(2):
            single = {k: v if k.endswith("_ids") else _row(v, b, 2) for k, v in kw.items()}
            torch.testing.assert_close(output(d.model, single), both[b : b + 1], rtol=1e-5, atol=1e-5)


def _row(value, b, batch):
    """Row ``b`` of a batched input (position ids and 0-d timesteps are shared by the rows)."""
    if isinstance(value, dict):
        return {k: _row(v, b, batch) for k, v in value.items()}
    return value[b : b + 1] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch else value


@pytest.mark.parametrize("size", [(24, 40), (25, 33), (17, 16)])
def test_non_square_and_odd_latents(size):
    d = unet(full_res=False)
    kw = d.inputs(h=size[0], w=size[1])
    base = output(d.model, kw)
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5, max_downsample=2):
        got = output(d.model, kw)
        rec = tokenreduce.record(d.model)
    assert got.shape == base.shape and (got - base).abs().max() > 1e-4
    h, w = math.ceil(size[0] / 2), math.ceil(size[1] / 2)
    assert {c.tokens_in for c in rec.calls} == {h * w}


def test_non_square_pixart_and_flux():
    d = pixart()  # diffusers' DiT un-patchifies square grids only
    kw = d.inputs(h=16, w=24)
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5):
        output(d.model, kw)
        assert tokenreduce.record(d.model).grid == (8, 12)
    f = flux()
    kw = f.inputs(h=12, w=20)
    with tokenreduce.applied(f.model, "tomesd", ratio=0.5):
        output(f.model, kw)
        assert tokenreduce.record(f.model).grid == (12, 20)


def test_keyword_and_positional_calls_agree():
    d = unet()
    kw = d.inputs()
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5):
        torch.testing.assert_close(_positional(d.model, kw), output(d.model, kw), rtol=0, atol=0)


def test_flux_rotary_rows_follow_merges_per_image():
    # FLUX's rotary table has no batch dimension: two different images run one by one and each must
    # equal its own single-image call
    f = flux()
    kw = f.inputs(batch=2)
    with tokenreduce.applied(f.model, "tomesd", ratio=0.5):
        both = output(f.model, kw)
        for b in range(2):
            single = {k: v if k.endswith("_ids") else _row(v, b, 2) for k, v in kw.items()}
            torch.testing.assert_close(output(f.model, single), both[b : b + 1], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_positional_block_calls():
    # SD3 and FLUX call their blocks positionally under gradient checkpointing
    f = flux()
    kw = f.inputs()
    tokenreduce.apply(f.model, "tomesd", ratio=0.5)
    expected = output(f.model, kw)
    f.model.enable_gradient_checkpointing()
    f.model.train()
    got = f.model(**kw, return_dict=False)[0]
    got.sum().backward()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
    assert tokenreduce.record(f.model).reduced_blocks == 2
    tokenreduce.remove(f.model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    d = dit()
    kw = d.inputs()
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5):
        full = output(d.model, kw)
        d.model.to(dtype)
        half = output(d.model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()})
        d.model.float()
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full, rtol=0.1, atol=0.1)


def test_compile_has_no_graph_breaks():
    d = dit()
    kw = d.inputs()
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5):
        expected = output(d.model, kw)
        compiled = torch.compile(d.model, fullgraph=True)  # raises on any graph break
        with torch.no_grad():
            torch.testing.assert_close(compiled(**kw, return_dict=False)[0], expected, rtol=1e-5, atol=1e-5)


# -- failure modes of existing tools, each a test ---------------------------------------------------


def test_sdxl_default_raises_instead_of_silent_no_op():
    d = unet_sdxl()
    with pytest.raises(ValueError, match=r"max_downsample.*levels \[2\]"):
        tokenreduce.apply(d.model, "tomesd", ratio=0.5)
    assert not tokenreduce.is_patched(d.model)


def test_ratio_above_cap_raises_unless_clip():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.75\].*clip=True"):
        ToMeSD(ratio=0.8)
    d = dit()
    kw = d.inputs()
    with tokenreduce.applied(d.model, "tomesd", ratio=0.9, clip=True):
        output(d.model, kw)
        # 8x8 grid: 16 destinations, every one of the 48 sources merged
        assert {c.tokens_out for c in tokenreduce.record(d.model).calls} == {16}


@pytest.mark.parametrize("bad", [dict(ratio=-0.1), dict(ratio=1.0, clip=True), dict(sx=0), dict(max_downsample=0)])
def test_bad_config_names_the_argument(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ToMeSD(**bad)


def test_model_without_token_blocks_raises():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    with pytest.raises(TypeError, match="no token block"):
        tokenreduce.apply(model, "tomesd")


def test_describe_says_what_is_reduced():
    d = unet(full_res=False)
    tokenreduce.apply(d.model, "tomesd", ratio=0.5, max_downsample=2)
    text = tokenreduce.describe(d.model)
    tokenreduce.remove(d.model)
    assert "reduces" in text and "levels [2]" in text


def test_timestep_forms():
    d = unet()
    kw = d.inputs()
    with tokenreduce.applied(d.model, "tomesd", ratio=0.5):
        outs = [output(d.model, dict(kw, timestep=t)) for t in (torch.tensor(500.0), torch.tensor([500.0]), 500, 500.0)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


def test_animatediff_spatial_blocks_only():
    diffusers = pytest.importorskip("diffusers")
    base_unet = unet(full_res=True, size=16).model
    adapter = diffusers.MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=32,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )
    model = diffusers.UNetMotionModel.from_unet2d(base_unet, adapter).eval()
    g = torch.Generator().manual_seed(0)
    kw = {
        "sample": torch.randn(1, 4, 4, 16, 16, generator=g),
        "timestep": torch.tensor(10.0),
        "encoder_hidden_states": torch.randn(4, 7, 32, generator=g),
    }
    base = output(model, kw)
    tokenreduce.apply(model, "tomesd", ratio=0.5)
    assert "temporal" in tokenreduce.describe(model)
    got = output(model, kw)
    rec = tokenreduce.record(model)
    tokenreduce.remove(model)
    assert got.shape == base.shape and (got - base).abs().max() > 1e-4
    assert rec.calls and {c.tokens_in for c in rec.calls} == {256}  # frames' spatial grids, never time


def test_pipeline_is_patched_through_its_denoiser():
    pipe = sd_pipeline()
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def generate():
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        ).images

    base = generate()
    tokenreduce.apply(pipe, "tomesd", ratio=0.5)
    assert tokenreduce.is_patched(pipe) and "'unet'" in tokenreduce.describe(pipe)
    got = generate()
    assert (got - base).abs().max() > 1e-4
    assert tokenreduce.record(pipe).reduced_blocks == 3
    tokenreduce.remove(pipe)
    assert torch.equal(generate(), base)


def test_concurrent_threads_keep_their_own_state():
    import threading

    d = dit()
    tokenreduce.apply(d.model, "tomesd", ratio=0.5)
    inputs = [d.inputs(seed=s) for s in range(4)]
    expected = [output(d.model, kw) for kw in inputs]
    got: dict[int, torch.Tensor] = {}

    def work(i):
        for _ in range(3):
            got[i] = output(d.model, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokenreduce.remove(d.model)
    for i in range(4):
        assert torch.equal(got[i], expected[i])


def test_selection_row_split_matches_batch():
    # the per-image path of rotary models cuts selections by row
    x = torch.randn(3, 64, 8)
    sel = ToMeSD(ratio=0.5).plan(x, DenoiserContext(0, 1, 1, (8, 8), torch.tensor(3.0)))
    for b in range(3):
        one = sel.row(b)
        assert isinstance(one, Selection)
        torch.testing.assert_close(one.apply(x[b : b + 1]), sel.apply(x)[b : b + 1])


@pytest.mark.parametrize("cache", ["FirstBlockCacheConfig", "TaylorSeerCacheConfig"])
def test_stacks_with_diffusers_caches_in_either_order(cache):
    # diffusers' cache hooks replace forward on the instance and look classes up in registries: the
    # reduction must run inside them whichever is applied first, and removal must restore both
    hooks = pytest.importorskip("diffusers.hooks")
    config = getattr(hooks, cache)(threshold=0.05) if cache == "FirstBlockCacheConfig" else None
    if config is None:
        config = hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)
    f = flux()
    steps = [f.inputs(t=t) for t in (0.9, 0.8, 0.7, 0.6)]

    def generate():
        outs = []
        for kw in steps:
            with f.model.cache_context("cond"):
                outs.append(output(f.model, kw))
        f.model._reset_stateful_cache()
        return outs

    f.model.enable_cache(config)
    cached = generate()
    tokenreduce.apply(f.model, "tomesd", ratio=0.5)
    after = generate()
    assert tokenreduce.record(f.model).reduced_blocks == 2
    tokenreduce.remove(f.model)
    assert all(torch.equal(a, b) for a, b in zip(generate(), cached))
    f.model.disable_cache()
    tokenreduce.apply(f.model, "tomesd", ratio=0.5)
    f.model.enable_cache(config)
    before = generate()
    f.model.disable_cache()
    tokenreduce.remove(f.model)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(after, cached))
