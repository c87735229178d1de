"""One patched model serving many threads: each forward keeps its own tokens, sizes and record."""

from __future__ import annotations

import threading

import pytest
import torch

import tokenreduce
from conftest import build, images
from test_contract import REDUCING

THREADS, CALLS = 8, 5


def inputs(thread: int) -> list[torch.Tensor]:
    # Different image sizes give different token counts and schedules, different batch sizes different
    # record shapes, so any state crossing between threads shows in the outputs or the records.
    seeds = [thread * CALLS + c for c in range(CALLS)]
    return [images(batch=1 + s % 3, size=32 + 8 * (s // 2 % 3), seed=s) for s in seeds]


def snapshot(model, x):
    with torch.no_grad():
        out = model(x)
    rec = tokenreduce.record(model)
    return out, rec


def assert_same(got, want):
    (out, rec), (want_out, want_rec) = got, want
    assert torch.equal(out, want_out)
    assert rec.input_tokens == want_rec.input_tokens and rec.tokens_per_layer == want_rec.tokens_per_layer
    for a, b in ((rec.size, want_rec.size), (rec.owner, want_rec.owner)):
        assert (a is None and b is None) or torch.equal(a, b)


def run_threads(fn, count):
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_concurrent_forwards_equal_sequential_ones(method):
    model = build("vit", dynamic_img_size=True)
    tokenreduce.apply(model, method, **REDUCING[method])
    expected = [[snapshot(model, x) for x in inputs(t)] for t in range(THREADS)]
    got = run_threads(lambda t: [snapshot(model, x) for x in inputs(t)], THREADS)
    for thread_got, thread_expected in zip(got, expected):
        for g, e in zip(thread_got, thread_expected):
            assert_same(g, e)


def test_record_reports_the_calling_threads_last_forward():
    model = build("vit")
    tokenreduce.apply(model, "tome", r=4)
    snapshot(model, images(batch=3))
    worker_record = run_threads(lambda _: snapshot(model, images(batch=1))[1], 1)[0]
    assert worker_record.size.shape[0] == 1
    assert tokenreduce.record(model).size.shape[0] == 3  # the main thread's own last forward

    fresh = build("vit")
    tokenreduce.apply(fresh, "tome", r=4)
    snapshot(fresh, images())
    with pytest.raises(ValueError, match="has not run a forward in this thread yet"):
        run_threads(lambda _: tokenreduce.record(fresh), 1)


def test_compiled_model_serves_threads():
    model = build("dinov2_reg")
    tokenreduce.apply(model, "evit", keep_rate=0.5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xs = [images(batch=2, seed=s) for s in range(4)]
    expected = [snapshot(model, x) for x in xs]
    snapshot(compiled, xs[0])  # compile once before the threads start
    got = run_threads(lambda i: snapshot(compiled, xs[i]), 4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g[0], e[0], rtol=1e-5, atol=1e-5)
        assert g[1].tokens_per_layer == e[1].tokens_per_layer and torch.equal(g[1].owner, e[1].owner)
