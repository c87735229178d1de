"""Checks shared by the model-family test files (open_clip, timm Eva, timm attention-pool heads, Hugging Face
video ViTs): every registered encoder method on one tiny model of a family, and compile/export of one method.
``inputs(batch=, seed=)`` makes a family's inputs (default: images). :class:`FamilyTests` runs the checks
every family shares on the variants a family's test class names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.export import Dim

import naive_families
import tokenreduce
from conftest import images, layout
from test_contract import DATA_DEPENDENT_COUNTS, IDENTITY, REDUCING, traces
from tokenreduce.core import keep
from tokenreduce.methods.base import EncoderMethod, Hook, LayerContext

METHODS = sorted(REDUCING)


def first(out):
    """The main output: open_clip returns ``(pooled, tokens)`` with ``output_tokens``; a Hugging Face model
    output's first field (``logits``, ``last_hidden_state``)."""
    return out[0] if isinstance(out, tuple) or hasattr(out, "to_tuple") else out


def run(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return first(model(x))


def check_method(
    model,
    method: str,
    has_cls_token: bool = True,
    batch: int = 4,
    inputs: Callable = images,
    identity: dict | None = None,
    reducing: dict | None = None,
) -> None:
    """The contract's core on one model: the identity config equals the unpatched model; the reducing config
    changes the output, leaves the schedule's token counts, gives each image of a batch what it gives the
    image alone; removing restores the model bit for bit and leaves no trace. ``identity`` and ``reducing``
    replace the contract's configs where a family's layout needs others."""
    identity = IDENTITY[method] if identity is None else identity
    reducing = REDUCING[method] if reducing is None else reducing
    if tokenreduce.make_method(method, **reducing).needs_cls_token and not has_cls_token:
        pytest.skip(f"{method} needs a class token")
    x = inputs(batch=batch)
    expected, before = run(model, x), traces(model)
    with tokenreduce.applied(model, method, **identity):
        torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)
    tokenreduce.apply(model, method, **reducing)
    batched = run(model, x)
    rec = tokenreduce.record(model)
    depth, prefix = layout(model)
    if method not in DATA_DEPENDENT_COUNTS:
        plan = tokenreduce.make_method(method, **reducing).schedule(rec.input_tokens, prefix, depth)
        assert list(rec.tokens_per_layer) == plan
    singles = torch.cat([run(model, x[i : i + 1]) for i in range(batch)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    tokenreduce.remove(model)
    assert torch.equal(run(model, x), expected)
    assert traces(model) == before
    if method != "none":
        assert not torch.allclose(batched, expected, atol=1e-4), "the reducing config changed nothing"


def check_compile_and_export(model, method: str = "tome", compile: bool = True, inputs: Callable = images) -> None:
    """``torch.export`` (dynamic batch) and, with ``compile``, ``torch.compile(fullgraph=True)`` reproduce the
    eager outputs, on other images than the exported example (about 15 s each on two cores)."""
    tokenreduce.apply(model, method, **REDUCING[method])
    example, check = inputs(batch=2, seed=1), inputs(batch=3, seed=7)
    eager = run(model, check)
    if compile:
        with torch.no_grad():
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(first(compiled(check)), eager, rtol=1e-5, atol=1e-5)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},))
    with torch.no_grad():
        torch.testing.assert_close(first(program.module()(check)), eager, rtol=1e-5, atol=1e-5)


def check_defaults_plan(model, unplannable: tuple[str, ...] = ()) -> None:
    """A full-size model built on the meta device patches, and every encoder method's defaults (those that
    need a class token only where there is one) plan a schedule on it at its native input size (patched
    once: checking a full-size block costs a second), except that the defaults of the ``unplannable``
    methods refuse it with a ``ValueError`` (they need a config for it)."""
    from tokenreduce.adapters import locate
    from tokenreduce.registry import method_classes
    from tokenreduce.stages import Stage

    tokenreduce.apply(model, "tome")
    assert "tokens per block at the native input size" in tokenreduce.describe(model)
    _, target, adapter = locate(model)
    for name in tokenreduce.list_methods():
        cls = method_classes(name).get(Stage.ENCODER)
        if name in unplannable:
            with pytest.raises(ValueError):
                adapter.validate(target, cls())
        elif cls is not None and (adapter.has_cls_token(target) or not cls.needs_cls_token):
            adapter.validate(target, cls())  # plans the schedule; raises if it cannot
            assert adapter.plan(target, cls()), name
    tokenreduce.remove(model)


def check_macs(model, method: str, inputs: Callable = images, **config) -> None:
    """The analytic MAC count (``bench.model_macs`` from the adapter's block costs) agrees with torch's
    counter on one image (scoring and matching, in torch's count only, stay under 1.5%)."""
    from tokenreduce.adapters import locate
    from tokenreduce.bench import model_macs
    from tokenreduce.bench.flops import counted_macs

    tokenreduce.apply(model, method, **config)
    counted = counted_macs(lambda: run(model, inputs(batch=1)))
    rec = tokenreduce.record(model)
    assert counted == pytest.approx(model_macs(locate(model)[2], model, rec.input_tokens, rec.tokens_per_layer), rel=0.015)


def check_tome_matches(model, naive_forward, prop_attn: bool = True, inputs: Callable = images) -> None:
    """ToMe (``r`` per block 5, 8, 3, 6) gives what ``naive_forward`` (see :mod:`naive_families`) gives."""
    x, r, prefix = inputs(batch=3), [5, 8, 3, 6], layout(model)[1]
    want = naive_forward(model, x, naive_families.tome_step(r, prefix), prop_attn=prop_attn)
    tokenreduce.apply(model, "tome", r=r, prop_attn=prop_attn)
    torch.testing.assert_close(run(model, x), want, rtol=1e-4, atol=1e-4)


def check_cls_pruning_matches(model, naive_forward, method: str, inputs: Callable = images) -> None:
    """EViT or Top-K (keep rate 0.55 at the default layers of a 6-block model: 1, 3, 4) gives what
    ``naive_forward`` gives."""
    x, prefix = inputs(batch=3), layout(model)[1]
    want = naive_forward(model, x, naive_families.evit_step((1, 3, 4), 0.55, prefix, fuse=method == "evit"), prop_attn=False)
    tokenreduce.apply(model, method, keep_rate=0.55)
    torch.testing.assert_close(run(model, x), want, rtol=1e-4, atol=1e-4)


@dataclass
class Probe(EncoderMethod):
    """Drops the first ``drop`` tokens after the prefix at block ``at`` (its rotary rows must shift) and
    remembers every context it was shown."""

    name = "probe"
    at: int = 1
    drop: int = 4

    def __post_init__(self) -> None:
        self.seen: list[LayerContext] = []

    def schedule(self, num_tokens, num_prefix, depth):
        return [num_tokens - (self.drop if i >= self.at else 0) for i in range(depth)]

    def select(self, x, ctx):
        self.seen.append(ctx)
        n, p = x.shape[1], ctx.num_prefix
        if n == ctx.num_out:
            return None
        return keep(torch.cat([torch.arange(p), torch.arange(p + self.drop, n)]).expand(x.shape[0], -1), n)


def probe(hook: Hook, start_qkv: bool = False, edits_attention: bool = False, **config) -> Probe:
    namespace = {"hook": hook, "start_qkv": start_qkv, "edits_attention": edits_attention}
    return dataclass(type(f"Probe{hook}{start_qkv}{edits_attention}", (Probe,), namespace))(**config)


def check_hook_points(model, inputs: Callable = images) -> None:
    """Where tokenreduce runs the attention itself: a method at the block start sees the q/k/v that block's
    attention uses; reducing at the start of block 1 equals reducing at the end of block 0; a method that
    edits the attention map (here: leaves it as it is) gives the model's own outputs, reduced or not."""
    x = inputs()
    expected = run(model, x)
    start, attn = probe(Hook.START, start_qkv=True, at=2), probe(Hook.ATTN, at=99)  # projected where it reduces
    for method in (start, attn):
        tokenreduce.apply(model, method)
        run(model, x)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(getattr(start.seen[2], name), getattr(attn.seen[2], name), rtol=1e-5, atol=1e-5)
    tokenreduce.apply(model, probe(Hook.START, start_qkv=True, at=1))
    at_start = run(model, x)
    tokenreduce.apply(model, probe(Hook.END, at=0))
    torch.testing.assert_close(run(model, x), at_start, rtol=1e-5, atol=1e-5)
    tokenreduce.apply(model, probe(Hook.ATTN, edits_attention=True, at=99))
    torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)
    tokenreduce.apply(model, probe(Hook.ATTN, at=1))
    reduced = run(model, x)
    tokenreduce.apply(model, probe(Hook.ATTN, edits_attention=True, at=1))
    torch.testing.assert_close(run(model, x), reduced, rtol=1e-5, atol=1e-5)
    tokenreduce.remove(model)


def check_save_load_and_half(model, tmp_path, inputs: Callable = images) -> None:
    """A patched model survives ``torch.save``/``load`` (tokenreduce's own classes and functions are all
    allowed for ``weights_only`` loading) and runs in float16 and bfloat16 close to float32."""
    x = inputs()
    tokenreduce.apply(model, "tome", r=5)
    reduced = run(model, x)
    torch.save(model, tmp_path / "model.pt")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "model.pt")
    assert not [g for g in unsafe if g.startswith("tokenreduce")], "tokenreduce must allow its own classes"
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(run(loaded, x), reduced)
    for dtype, bound in ((torch.float16, 0.99), (torch.bfloat16, 0.9)):  # as the contract's half-precision test
        out = run(tokenreduce.apply(loaded.to(dtype), "tome", r=5), x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert torch.nn.functional.cosine_similarity(out.float(), reduced, dim=-1).min() > bound


class FamilyTests:
    """The tests every encoder family runs, inherited by one test class per family (``class TestEva(FamilyTests)``)
    whose attributes name the variants each test runs on; adding a family is its builders, these lists and its own
    special tests. A variant is a name the family's ``build`` takes; every list must be non-empty. Functions are
    class attributes as ``staticmethod(f)``, so that ``self.build(...)`` is ``f(...)``."""

    build: Callable[..., torch.nn.Module]  # staticmethod: build(variant, **overrides), a tiny model in eval mode
    naive_forward: Callable  # staticmethod: the family's forward in naive_families
    inputs = staticmethod(images)  # inputs(batch=, seed=)
    every_method: tuple[str, ...]  # the variants every registered method runs on ...
    without_cls_token: tuple[str, ...] = ()  # ... those of them without a class token
    identity: dict = IDENTITY  # method -> its identity config (the contract's unless a layout needs others)
    reducing: dict = REDUCING  # method -> its reducing config
    tome_matches: tuple[tuple[str, bool], ...]  # (variant, prop_attn) on which ToMe matches naive_forward
    cls_pruning: tuple[tuple[str, str], ...]  # (variant, "evit" or "topk") matching naive_forward with six blocks
    six_blocks: dict  # the overrides that give a variant six blocks
    hook_points: tuple[str, ...]
    save_load: tuple[str, ...]  # variants saved, loaded and run in half precision
    macs: tuple[str, ...]  # variants whose analytic MACs are checked ...
    macs_overrides: dict = {}  # ... with these overrides
    export: str  # the variant compiled and exported ...
    compile: bool = True  # ... or only exported

    def encoder(self, variant: str, **overrides) -> torch.nn.Module:
        """The model the naive forwards, hook points and MAC counts run on: ``build``'s, unless that adds a head."""
        return self.build(variant, **overrides)

    def skip(self, variant: str, method: str) -> str | None:
        """Why ``method`` does not run on ``variant`` in :meth:`test_every_method`, or ``None``."""
        return None

    def pytest_generate_tests(self, metafunc) -> None:
        """pytest's hook, called for each test of the class: parametrizes it from the family's lists."""
        every = [
            pytest.param(v, m, marks=[pytest.mark.skip(reason=why)] if (why := self.skip(v, m)) else [])
            for v in self.every_method
            for m in METHODS
        ]
        macs = [pytest.param(v, m, c, id=f"{v}-{m}") for v in self.macs for m, c in (("none", {}), ("tome", dict(r=6)))]
        cases = {
            "test_every_method": ("variant,method", every),
            "test_tome_matches_naive_forward": ("variant,prop_attn", self.tome_matches),
            "test_cls_attention_pruning_matches_naive_forward": ("variant,method", self.cls_pruning),
            "test_hook_points": ("variant", self.hook_points),
            "test_save_load_and_half_precision": ("variant", self.save_load),
            "test_analytic_macs_match_counted_macs": ("variant,method,config", macs),
            "test_compile_and_export": ("variant", [self.export]),
        }
        if metafunc.function.__name__ in cases:
            names, values = cases[metafunc.function.__name__]
            assert values, f"{type(self).__name__} runs {metafunc.function.__name__} on no variant"
            metafunc.parametrize(names, values)

    def test_every_method(self, variant, method):
        has_cls = variant not in self.without_cls_token
        model = self.build(variant)
        check_method(model, method, has_cls, inputs=self.inputs, identity=self.identity[method], reducing=self.reducing[method])

    def test_tome_matches_naive_forward(self, variant, prop_attn):
        check_tome_matches(self.encoder(variant), self.naive_forward, prop_attn, inputs=self.inputs)

    def test_cls_attention_pruning_matches_naive_forward(self, variant, method):
        model = self.encoder(variant, **self.six_blocks)
        check_cls_pruning_matches(model, self.naive_forward, method, inputs=self.inputs)

    def test_hook_points(self, variant):
        check_hook_points(self.encoder(variant), inputs=self.inputs)

    def test_save_load_and_half_precision(self, variant, tmp_path):
        check_save_load_and_half(self.build(variant), tmp_path, inputs=self.inputs)

    def test_analytic_macs_match_counted_macs(self, variant, method, config):
        check_macs(self.encoder(variant, **self.macs_overrides), method, inputs=self.inputs, **config)

    def test_compile_and_export(self, variant):
        check_compile_and_export(self.build(variant), compile=self.compile, inputs=self.inputs)
