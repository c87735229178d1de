"""The engine's hook points (block start, after attention, block end), the values it hands a method,
and the dense and composed forms of a selection."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import tokenreduce
from conftest import build, images, output
from tokenreduce.api import patch_of
from tokenreduce.core import Selection, attention_probs, choose_rows, keep, mix
from tokenreduce.methods.base import EncoderMethod, Hook, LayerContext


@dataclass
class Spy(EncoderMethod):
    """Keeps the first ``num_out`` tokens at one layer and remembers what it was shown."""

    name = "spy"
    at: int = 1
    drop: int = 4

    def __post_init__(self) -> None:
        self.seen: list[tuple[Tensor, LayerContext]] = []

    def schedule(self, num_tokens, num_prefix, depth):
        return [num_tokens - (self.drop if i >= self.at else 0) for i in range(depth)]

    def select(self, x, ctx):
        self.seen.append((x.detach().clone(), ctx))
        n = x.shape[1]
        if n == ctx.num_out:
            return None
        return keep(torch.arange(ctx.num_out).expand(x.shape[0], -1), n)


def spy(hook: Hook, start_qkv: bool = False, **kw) -> Spy:
    cls = type(f"Spy{hook}{start_qkv}", (Spy,), {"hook": hook, "start_qkv": start_qkv})
    return dataclass(cls)(**kw)


def block_inputs(model, x):
    """The input of every block and the q/k/v its attention computes, from forward hooks."""
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].detach().clone()), with_kwargs=True) for b in model.blocks
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("model_name", ["vit", "respost", "hf_clip", "hf_dinov2"])
def test_values_are_those_attention_used(model_name):
    model, x = build(model_name), images()
    method = spy(Hook.ATTN, at=99)
    tokenreduce.apply(model, method)
    output(model, x)
    _, ctx = method.seen[2]
    # v from the captured projection equals v from projecting the block input the way attention does
    layers = (
        model.blocks
        if hasattr(model, "blocks")
        else (model.encoder.layers if hasattr(model.encoder, "layers") else model.encoder.layer)
    )
    layout = layers[2]._tokenreduce_layout
    inputs = []
    h = layers[2].register_forward_pre_hook(
        lambda m, a, kw: inputs.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    output(model, x)
    h.remove()
    with torch.no_grad():
        q, k, v = layout.project_input(layers[2], inputs[0])
    torch.testing.assert_close(ctx.q, q)
    torch.testing.assert_close(ctx.k, k)
    torch.testing.assert_close(ctx.v, v)
    assert ctx.hook is Hook.ATTN and ctx.v.shape == ctx.k.shape


@pytest.mark.parametrize("hook", list(Hook))
def test_each_hook_sees_the_tokens_at_its_point(hook):
    model, x = build("vit"), images()
    inputs = block_inputs(model, x)
    method = spy(hook, start_qkv=hook is Hook.START, at=1)
    tokenreduce.apply(model, method)
    with torch.no_grad():
        reduced = model(x)
    tokens = [t for t, _ in method.seen]
    if hook is Hook.START:
        torch.testing.assert_close(tokens[0], inputs[0])
        torch.testing.assert_close(tokens[1], inputs[1])  # block 1's input, before it ran
    elif hook is Hook.END:
        torch.testing.assert_close(tokens[0], inputs[1])  # block 0's output is block 1's input
    else:
        assert not torch.allclose(tokens[1], inputs[1]) and not torch.allclose(tokens[1], inputs[2])
    assert tokenreduce.record(model).tokens_per_layer == (65, 61, 61, 61)
    tokenreduce.remove(model)
    # reducing at the start of block 1 equals reducing at the end of block 0
    if hook is Hook.START:
        end = spy(Hook.END, at=0)
        tokenreduce.apply(model, end)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reduced)


def test_start_projection_gives_this_blocks_qkv_where_it_reduces_and_otherwise_the_previous_ones():
    model, x = build("qknorm_avg"), images()
    with_qkv, without = spy(Hook.START, start_qkv=True, at=2), spy(Hook.START, at=99)
    tokenreduce.apply(model, with_qkv)
    output(model, x)
    tokenreduce.apply(model, without)
    output(model, x)
    spot = spy(Hook.ATTN, at=99)
    tokenreduce.apply(model, spot)
    output(model, x)
    assert without.seen[0][1].q is None
    # projected only in the block that reduces (block 2); elsewhere the previous block's attention's
    torch.testing.assert_close(with_qkv.seen[1][1].k, spot.seen[0][1].k)
    assert with_qkv.seen[3][1].k.shape[2] == 61  # block 2's keys, of the tokens left after its reduction
    mine, previous = with_qkv.seen[2][1], without.seen[2][1]
    assert mine.q.shape == previous.q.shape and not torch.allclose(mine.q, previous.q)
    torch.testing.assert_close(mine.k, spot.seen[2][1].k)  # no reduction before block 2: the same tokens
    torch.testing.assert_close(mine.v, spot.seen[2][1].v)
    for layer in range(1, 4):
        torch.testing.assert_close(without.seen[layer][1].v, spot.seen[layer - 1][1].v)


def test_attention_probs_rows_match_cls_attention():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 4, generator=gen), torch.randn(2, 3, 9, 4, generator=gen)
    bias = torch.randn(2, 1, 1, 9, generator=gen)
    probs = attention_probs(q, k, 0.5, bias)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 9))
    want = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(-1)
    torch.testing.assert_close(probs, want)


def test_dense_selection_applies_its_matrix_and_shares_sizes():
    matrix = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 1.0, 0.0]]])
    sel = mix(matrix)
    x = torch.arange(8.0).view(1, 4, 2)
    torch.testing.assert_close(sel.apply(x), matrix @ x)
    assert sel.slot.tolist() == [[0, 0, 1, -1]]  # input 1 feeds output 0 most; input 3 feeds none
    assert sel.index.tolist() == [[0, 2]]
    size = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    # input 1's size 2 splits 2:1 between the outputs (|0.5| vs |0.25|); input 3 is dropped
    torch.testing.assert_close(sel.sizes(size), torch.tensor([[[1 + 4 / 3], [2 / 3 + 3]]]))
    assert sel.owners(torch.arange(4)[None]).tolist() == [[0, 0, 1, -1]]
    torch.testing.assert_close(mix(matrix, size_matrix=matrix).sizes(size), matrix @ size)
    assert torch.equal(sel.dense(), matrix)


def test_then_composes_two_selections_into_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=gen)
    first = Selection(
        torch.tensor([[0, 1, -1, 1, 2, 3, 3]] * 2), torch.tensor([[0, 1, 4, 5]] * 2), torch.rand(2, 7, generator=gen)
    )
    second = keep(torch.tensor([[3, 0, 1], [1, 2, 0]]), 4)
    both = first.then(second)
    torch.testing.assert_close(both.apply(x), second.apply(first.apply(x)))
    size = torch.rand(2, 7, 1, generator=gen)
    torch.testing.assert_close(both.sizes(size), second.sizes(first.sizes(size)))
    owner = torch.arange(7).expand(2, -1)
    assert torch.equal(both.owners(owner), second.owners(first.owners(owner)))
    dense = mix(torch.rand(2, 3, 4, generator=gen))
    torch.testing.assert_close(first.then(dense).apply(x), dense.apply(first.apply(x)))


def test_choose_rows_picks_each_rows_rule():
    x = torch.arange(12.0).view(2, 6, 1)
    pruned = keep(torch.tensor([[0, 5, 4], [0, 1, 2]]), 6)
    merged = Selection(
        torch.tensor([[0, 1, 1, 2, 2, 2]] * 2), torch.tensor([[0, 1, 3]] * 2), torch.tensor([[1, 0.5, 0.5, 1, 1, 1]] * 2)
    )
    both = choose_rows(torch.tensor([True, False]), pruned, merged)
    got = both.apply(x)
    torch.testing.assert_close(got[0], pruned.apply(x)[0])
    torch.testing.assert_close(got[1], merged.apply(x)[1])
    with pytest.raises(ValueError, match="same count"):
        choose_rows(torch.tensor([True, False]), pruned, keep(torch.tensor([[0, 1]] * 2), 6))


@dataclass
class Uniform(EncoderMethod):
    """Edits every block's attention: the block's own map, or a uniform one from block ``at`` on;
    counts the blocks it saw in its carried value."""

    name = "uniform"
    edits_attention = True
    at: int = 99

    def schedule(self, num_tokens, num_prefix, depth):
        return [num_tokens] * depth

    def select(self, x, ctx):
        return None

    def attend(self, ctx):
        ctx.carry = (ctx.carry or 0) + 1
        probs = ctx.attention()
        return torch.full_like(probs, 1 / probs.shape[-1]) if ctx.layer >= self.at else probs


@pytest.mark.parametrize("model_name", ["vit", "qknorm_avg", "respost", "hf_clip", "hf_dinov2", "hf_siglip", "hf_vit"])
def test_edited_attention_runs_the_blocks_own_map_or_the_given_one(model_name):
    model, x = build(model_name), images()
    want = output(model, x)
    method = Uniform()
    tokenreduce.apply(model, method)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)  # eager vs fused
    assert patch_of(model).latest().carry == 4  # the carried value went through every block
    assert "attention runs eagerly in every block" in tokenreduce.describe(model)
    tokenreduce.apply(model, Uniform(at=3))
    edited = output(model, x)
    tokenreduce.remove(model)
    assert not torch.allclose(edited, want, atol=1e-3)
    if hasattr(model, "blocks"):
        # timm's eager attention hands its map to attn_drop: make the last block's uniform there
        attn = model.blocks[3].attn
        attn.fused_attn = False
        hook = attn.attn_drop.register_forward_hook(lambda m, a, out: torch.full_like(out, 1 / out.shape[-1]))
        try:
            torch.testing.assert_close(edited, output(model, x), rtol=1e-4, atol=1e-4)
        finally:
            hook.remove()


def test_every_hook_sees_the_tokens_that_entered_its_block():
    model, x = build("vit"), images()
    inputs = block_inputs(model, x)
    for hook in Hook:
        method = spy(hook, at=1)
        tokenreduce.apply(model, method)
        output(model, x)
        for layer, (_, ctx) in enumerate(method.seen[:2]):
            torch.testing.assert_close(ctx.block_input, inputs[layer])
        tokenreduce.remove(model)
