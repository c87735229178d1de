"""ToDo (token downsampling of the self-attention's keys and values) against a naive implementation from
the spec, on the tiny UNet with attention at full resolution and the tiny DiT; sizes and call forms the
reference fails on; every supported architecture; torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusion_models import BUILDERS, dit, output, pixart, unet, unet_sdxl

import tokenreduce
from naive_todo import install, resize_tokens
from tokenreduce.core import grid_resize

MODES = ("nearest-exact", "nearest", "bilinear", "avg_pool")


def naive_output(model: torch.nn.Module, kw: dict, factors: dict[int, int], method: str) -> torch.Tensor:
    naive = copy.deepcopy(model)
    install(naive, factors, method)
    return output(naive, kw)


@pytest.mark.parametrize("mode", MODES)
def test_grid_resize_is_the_torch_op(mode):
    """Odd, non-square and tiny grids, factors 2 to 4: nearest modes pick exactly F.interpolate's tokens."""
    x = torch.randn(2, 40 * 40, 3)
    for h, w in [(8, 8), (24, 40), (25, 33), (7, 3), (1, 5), (3, 2), (40, 13)]:
        for f in (2, 3, 4):
            tokens = x[:, : h * w]
            got = grid_resize(2, (h, w), (max(1, h // f), max(1, w // f)), mode).apply(tokens)
            want = resize_tokens(tokens, (h, w), f, mode)
            if mode.startswith("nearest"):
                assert torch.equal(got, want), (h, w, f)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_grid_resize_refuses_maps_that_are_not_sparse():
    with pytest.raises(ValueError, match="mode must be one of"):
        grid_resize(1, (8, 8), (4, 4), "bicubic")
    with pytest.raises(ValueError, match="at most half"):
        grid_resize(1, (8, 8), (5, 5), "bilinear")
    with pytest.raises(ValueError, match="must shrink"):
        grid_resize(1, (8, 8), (9, 4), "nearest")
    with pytest.raises(ValueError, match="pools an axis of 10 to 5, not 4"):
        grid_resize(1, (10, 10), (4, 4), "avg_pool")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_matches_naive(name, mode):
    d = BUILDERS[name]()
    kw = d.inputs()
    base = output(d.model, kw)
    want = naive_output(d.model, kw, {1: 2}, mode)
    tokenreduce.apply(d.model, "todo", downsample_method=mode)
    got = output(d.model, kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    n = kw["sample" if name == "unet" else "hidden_states"].shape[-1] // (1 if name == "unet" else 2)
    assert {(c.tokens_in, c.tokens_out) for c in tokenreduce.record(d.model).calls} == {(n * n, n * n // 4)}


@pytest.mark.parametrize("size", [(24, 40), (25, 33), (9, 7)])
def test_non_square_and_odd_latents(size):
    """The reference takes floor sizes and one pooling kernel for both axes: these fail there."""
    d = unet()
    kw = d.inputs(h=size[0], w=size[1])
    rows, cols = -(-size[0] // 2), -(-size[1] // 2)  # level 2: ceil, as the UNet's strided convolution gives
    for mode in ("nearest-exact", "avg_pool"):
        want = naive_output(d.model, kw, {1: 3, 2: 3}, mode)
        tokenreduce.apply(d.model, "todo", downsample_factor=3, max_downsample=2, downsample_method=mode)
        torch.testing.assert_close(output(d.model, kw), want, rtol=0, atol=1e-5)
        level_2 = [c for c in tokenreduce.record(d.model).calls if c.level == 2]
        assert [(c.tokens_in, c.tokens_out) for c in level_2] == [(rows * cols, max(1, rows // 3) * max(1, cols // 3))]
        tokenreduce.remove(d.model)


def test_factor_one_and_remove_are_bit_exact_and_apply_twice_is_once():
    d = unet()
    kw = d.inputs()
    base = output(d.model, kw)
    tokenreduce.apply(d.model, "todo", downsample_factor=1)
    assert torch.equal(output(d.model, kw), base)
    assert tokenreduce.record(d.model).reduced_blocks == 0
    tokenreduce.apply(d.model, "todo")
    once = output(d.model, kw)
    tokenreduce.apply(d.model, "todo")
    assert torch.equal(output(d.model, kw), once)
    tokenreduce.remove(d.model)
    assert torch.equal(output(d.model, kw), base)


@pytest.mark.parametrize("name", ["unet", "dit", "pixart"])
def test_batch_equals_singles_and_is_deterministic(name):
    d = BUILDERS[name]()
    tokenreduce.apply(d.model, "todo")
    kw = d.inputs(batch=3)
    batched = output(d.model, kw)
    assert torch.equal(output(d.model, kw), batched)
    for row in range(3):
        single = {k: v[row : row + 1] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in kw.items()}
        torch.testing.assert_close(output(d.model, single), batched[row : row + 1], rtol=1e-5, atol=1e-5)


def test_changes_every_plain_self_attention_model():
    for build, config in [(pixart, {}), (unet, {"downsample_factor": 4}), (unet_sdxl, {"max_downsample": 2})]:
        d = build()
        kw = d.inputs()
        base = output(d.model, kw)
        tokenreduce.apply(d.model, "todo", **config)
        assert (output(d.model, kw) - base).abs().max() > 1e-3, d.name
        assert tokenreduce.record(d.model).reduced_blocks > 0


def test_sdxl_levels():
    """SDXL's finest level has no attention: the default raises (the reference silently does nothing);
    the reference's level-2 knob acts at level 2 alone."""
    d = unet_sdxl()
    with pytest.raises(ValueError, match="max_downsample"):
        tokenreduce.apply(d.model, "todo")
    tokenreduce.apply(d.model, "todo", downsample_factor_level_2=2)
    output(d.model, d.inputs())
    calls = tokenreduce.record(d.model).calls
    assert calls and {(c.level, c.tokens_in, c.tokens_out) for c in calls} == {(2, 256, 64)}


@pytest.mark.parametrize("name", ["sd3", "sd3_dual", "flux"])
def test_joint_attention_raises(name):
    d = BUILDERS[name]()
    with pytest.raises(TypeError, match="joint text-image attention"):
        tokenreduce.apply(d.model, "todo")
    assert not tokenreduce.is_patched(d.model)


def test_timestep_and_call_forms():
    """The reference reads the timestep as ``args[1].item()``: keyword calls and ``[B]`` timesteps fail."""
    d = unet()
    kw = d.inputs()
    tokenreduce.apply(d.model, "todo")
    want = output(d.model, kw)
    sample, text = kw["sample"], kw["encoder_hidden_states"]
    for t in (torch.tensor(500.0), torch.tensor([500.0]), torch.tensor([500.0, 500.0]), 500):
        assert torch.equal(output(d.model, {**kw, "timestep": t}), want)
    with torch.no_grad():
        assert torch.equal(d.model(sample, torch.tensor(500.0), text, return_dict=False)[0], want)
    d = dit()
    kw = d.inputs()
    tokenreduce.apply(d.model, "todo")
    with torch.no_grad():
        positional = d.model(kw["hidden_states"], kw["timestep"], kw["class_labels"], return_dict=False)[0]
    assert torch.equal(positional, output(d.model, kw))


def test_config_errors_name_the_argument():
    for config, match in [
        ({"downsample_factor": 0}, "downsample_factor must be an integer >= 1"),
        ({"downsample_method": "max_pool"}, "downsample_method must be one of"),
        ({"downsample_factor_level_2": 2, "max_downsample": 2}, "downsample_factor_level_2 must be 1"),
        ({"max_downsample": 0}, "max_downsample must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            tokenreduce.make_method("todo", **config)


def test_compiles_without_graph_breaks():
    d = dit()
    kw = d.inputs()
    tokenreduce.apply(d.model, "todo", downsample_method="bilinear")
    eager = output(d.model, kw)
    with torch.no_grad():
        explained = torch._dynamo.explain(d.model)(**kw, return_dict=False)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(d.model, backend="aot_eager", fullgraph=True)(**kw, return_dict=False)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert tokenreduce.record(d.model).reduced_blocks == 2


def test_keys_are_the_resized_normed_tokens():
    """What the self-attention projects: queries from all its input tokens, keys and values from their
    F.interpolate on the grid."""
    d = dit()
    kw = d.inputs()
    tokenreduce.apply(d.model, "todo")
    attn = d.model.transformer_blocks[0].attn1
    seen = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0])),
        attn.to_q.register_forward_pre_hook(lambda m, a: seen.setdefault("q", a[0])),
        attn.to_k.register_forward_pre_hook(lambda m, a: seen.setdefault("k", a[0])),
    ]
    output(d.model, kw)
    for hook in hooks:
        hook.remove()
    image = seen["x"].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    want = F.interpolate(image, size=(4, 4), mode="nearest-exact").permute(0, 2, 3, 1).reshape(2, 16, -1)
    assert torch.equal(seen["q"], seen["x"]) and torch.equal(seen["k"], want)


def test_a_self_attention_mask_is_refused_not_misapplied():
    # a mask over all keys cannot follow keys that were resized: the call raises, naming the method
    d = dit()
    tokenreduce.apply(d.model, "todo")
    attn = d.model.transformer_blocks[0].attn1
    x = torch.randn(2, 64, attn.to_q.in_features)
    output(d.model, d.inputs())  # a block called alone reads its grid from this thread's last call
    block = d.model.transformer_blocks[0]
    with pytest.raises(ValueError, match="'todo' shrinks the keys .* attention_mask"):
        block(x, attention_mask=torch.zeros(2, 1, 64), timestep=torch.full((2,), 10.0), class_labels=torch.arange(2))
    tokenreduce.remove(d.model)
