"""Run methods side by side on one model: the same input, interleaved repeats, medians."""

from __future__ import annotations

import ast
import copy
import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import tokenreduce
from tokenreduce.adapters import locate
from tokenreduce.api import patch_of
from tokenreduce.bench.flops import model_macs
from tokenreduce.bench.memory import peak_memory_bytes
from tokenreduce.validate import as_int


@dataclass(frozen=True)
class MethodSpec:
    """A method and its config as written on the command line, e.g. ``tome:r=16:clip=True``."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.config.items())])

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, *pairs = text.strip().split(":")
        config = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"method spec {text!r}: expected name:key=value[:key=value...], got {pair!r}")
            try:
                config[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                config[key] = raw
        return cls(name, config)


def parse_specs(text: str) -> list[MethodSpec]:
    """Split ``"none,tome:r=8,tome:r=[4,4,8]"`` on the commas outside brackets and parse each spec."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    specs = [MethodSpec.parse(p) for p in parts if p.strip()]
    if not specs:
        raise ValueError("methods must name at least one method")
    return specs


@dataclass
class BenchResult:
    """One method's measurements; ratios are against the ``none`` row of the same run."""

    method: str
    params: dict[str, Any]
    images_per_s: float
    latency_ms: float  # median wall time of one batch
    gflops: float  # per image, multiply-accumulates (the literature's "GFLOPs")
    peak_memory_mib: float  # tensors allocated by one forward, beyond weights and input
    reduce_share: float  # fraction of the forward spent scoring, matching and merging
    tokens_per_layer: list[int]
    input_tokens: int
    speedup: float = 1.0
    flops_speedup: float = 1.0
    times_ms: list[float] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the FLOP-ideal one."""
        return self.speedup / self.flops_speedup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduction_share(
    call: Callable[[], object],
    targets: Sequence[tuple[object, str]],
    device: torch.device,
    wrap: Callable[[Callable, Callable], Callable] | None = None,
) -> float:
    """Share of one instrumented ``call()`` spent inside the methods ``(object, name)`` of ``targets``
    (the reduction's hook points: scoring, selecting, applying). A target called from inside another
    counts once. ``wrap(timer, original)`` makes each target's stand-in from ``timer`` (which turns a
    function into a timed one): by default ``timer(original)``; a target that returns the merge and
    unmerge functions can have those timed too."""
    spent, depth = 0.0, 0

    def timer(original):
        def timed(*args, **kwargs):
            nonlocal spent, depth
            if depth:
                return original(*args, **kwargs)
            depth += 1
            _sync(device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync(device)
                spent += time.perf_counter() - start
                depth -= 1

        return timed

    own = [vars(obj).get(name) for obj, name in targets]  # a module's functions, or instance attributes
    wrap = wrap or (lambda timed, original: timed(original))
    for obj, name in targets:  # instance attributes shadow the class methods for this pass only
        setattr(obj, name, wrap(timer, getattr(obj, name)))
    try:
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        total = time.perf_counter() - start
    finally:
        for (obj, name), original in zip(targets, own):
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)
    return spent / total


def interleaved_times(
    calls: Sequence[Sequence[Callable[[], object]]],
    repeats: int,
    device: torch.device,
    tick: Callable[[int], None],
    around: Sequence[Callable[[], AbstractContextManager]] | None = None,
) -> list[list[list[float]]]:
    """Wall times ``[model][call][repeat]`` of ``calls[model]``, run ``repeats`` times with the models
    taking turns, their order rotated every repeat so that drift spreads over all of them. With
    ``around``, each model's turn runs inside ``around[model]()``, untimed (e.g. patching one shared
    model for the turn)."""
    times = [[[] for _ in row] for row in calls]
    for rep in range(repeats):
        order = list(range(len(calls)))
        for i in order[rep % len(order) :] + order[: rep % len(order)]:
            with around[i]() if around is not None else nullcontext():
                for j, call in enumerate(calls[i]):
                    _sync(device)
                    start = time.perf_counter()
                    call()
                    _sync(device)
                    times[i][j].append(time.perf_counter() - start)
                    tick(1)
    return times


def with_baseline(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """``specs`` with a ``none`` baseline in front when they lack one."""
    specs = list(specs)
    return specs if any(s.name == "none" for s in specs) else [MethodSpec("none"), *specs]


def run_bench(
    model: nn.Module,
    specs: Sequence[MethodSpec],
    *,
    batch_size: int = 32,
    img_size: int = 224,
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> list[BenchResult]:
    """Benchmark every spec on private copies of ``model`` (which is left as it was), interleaving the
    timed repeats.

    Runs :func:`with_baseline` ``(specs)``; the ``none`` row is the unpatched model. ``progress``
    is called with 1 after every forward, ``steps(specs, repeats, warmup)`` times in total.
    """
    batch_size, img_size = as_int("batch_size", batch_size, 1), as_int("img_size", img_size, 1)
    repeats, warmup = as_int("repeats", repeats, 1), as_int("warmup", warmup, 0)
    specs = with_baseline(specs)
    device = torch.device(device)
    tick = progress or (lambda n: None)
    base = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    _, target, adapter = locate(base)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)

    models, records, params, hooks = [], [], [], []
    with torch.inference_mode():
        for spec in specs:  # build and validate every method before timing anything
            m = tokenreduce.apply(copy.deepcopy(base), spec.name, **spec.config)
            m(x)
            tick(1)
            records.append(tokenreduce.record(m))
            params.append(patch_of(m).method.params())
            hooks.append(patch_of(m).method.hook)
            if spec.name == "none":
                tokenreduce.remove(m)  # the baseline is the untouched model
            models.append(m)
        for _ in range(max(warmup - 1, 0)):
            for m in models:
                m(x)
                tick(1)
        times = [t for (t,) in interleaved_times([[lambda m=m: m(x)] for m in models], repeats, device, tick)]
        peaks, shares = [], []
        for m in models:
            peaks.append(peak_memory_bytes(lambda m=m: m(x), device))
            tick(1)
        for m in models:
            if not tokenreduce.is_patched(m):  # the baseline spends nothing on reduction
                shares.append(0.0)
                continue
            shares.append(reduction_share(lambda m=m: m(x), [(patch_of(m), "reduce")], device))
            tick(1)

    results = []
    for spec, rec, param, hook, t, peak, share in zip(specs, records, params, hooks, times, peaks, shares):
        latency = statistics.median(t)
        macs = model_macs(adapter, target, rec.input_tokens, rec.tokens_per_layer, hook)
        results.append(
            BenchResult(
                method=spec.label,
                params=param,
                images_per_s=batch_size / latency,
                latency_ms=latency * 1e3,
                gflops=macs / 1e9,
                peak_memory_mib=peak / 2**20,
                reduce_share=share,
                tokens_per_layer=list(rec.tokens_per_layer),
                input_tokens=rec.input_tokens,
                times_ms=[s * 1e3 for s in t],
            )
        )
    baseline = next(r for r, s in zip(results, specs) if s.name == "none")
    for r in results:
        r.speedup = r.images_per_s / baseline.images_per_s
        r.flops_speedup = baseline.gflops / r.gflops
    return results


def steps(specs: Sequence[MethodSpec], repeats: int, warmup: int) -> int:
    """Forwards ``run_bench`` reports to ``progress`` for ``specs`` (with the baseline it adds): the
    checked first forward, warmup, timed repeats, the memory pass, and the reduce-share pass of
    every patched model."""
    specs = with_baseline(specs)
    patched = sum(s.name != "none" for s in specs)
    return len(specs) * (1 + max(warmup - 1, 0) + repeats + 1) + patched


def format_table(results: Sequence[BenchResult]) -> str:
    head = ["method", "tokens", "GFLOPs", "img/s", "latency ms", "speedup", "FLOP-ideal", "of ideal", "peak MiB", "reduce %"]
    rows = [
        [
            r.method,
            f"{r.input_tokens}->{r.tokens_per_layer[-1]}",
            f"{r.gflops:.2f}",
            f"{r.images_per_s:.1f}",
            f"{r.latency_ms:.1f}",
            f"{r.speedup:.2f}x",
            f"{r.flops_speedup:.2f}x",
            f"{r.efficiency:.0%}",
            f"{r.peak_memory_mib:.1f}",
            f"{r.reduce_share:.1%}",
        ]
        for r in results
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_warning(before: Sequence[float], after: Sequence[float], threads: int, cores: int) -> str | None:
    """A warning when other work competed for the cores during a run, from the 1-minute load averages
    taken before and after it: before the run, other work left fewer than ``threads`` cores free, or
    after it the load exceeded the cores, each by more than half a core. ``None`` when the machine
    looked free."""
    slack = 0.5  # load averages carry background noise; half a core of it is tolerated
    if before[0] + threads <= cores + slack and after[0] <= cores + slack:
        return None
    return (
        f"machine busy: 1-minute load average {before[0]:.2f} before and {after[0]:.2f} after the run on {cores} cores, "
        f"with {threads} benchmark threads; timings are unreliable when the load exceeds the cores "
        "(rerun on an idle machine, or with fewer --threads)"
    )


def environment(device: str | torch.device, dtype: torch.dtype, batch_size: int, **extra: Any) -> dict[str, Any]:
    """Everything a reader needs to know where and how the numbers were taken."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenreduce": tokenreduce.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size,
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    return {**env, **extra}


def to_json(results: Sequence[BenchResult], env: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for r in results:
        row = asdict(r)
        if hasattr(r, "efficiency"):
            row["efficiency"] = r.efficiency
        rows.append(row)
    return {"environment": env, "results": rows}


TIMM_COLUMNS = ("model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "param_count", "infer_gmacs", "img_size")


def write_timm_csv(
    results: Sequence[BenchResult], path: str, model: str, batch_size: int, img_size: int, param_count: int
) -> None:
    """The encoder bench as timm's ``benchmark.py`` names its columns (samples/s, ms per batch step,
    batch size, parameters in millions, GMACs per sample, image size), then the method, its config, the
    tokens leaving the last block, the speedup over ``none`` and the FLOP-ideal one."""
    names = [*TIMM_COLUMNS, "method", "config", "tokens_out", "speedup", "flops_speedup"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for r in results:
            tokens_out = r.tokens_per_layer[-1] if r.tokens_per_layer else r.input_tokens
            writer.writerow(
                [model, round(r.images_per_s, 2), round(r.latency_ms, 3), batch_size, round(param_count / 1e6, 2)]
                + [round(r.gflops, 3), img_size, r.method, json.dumps(r.params), tokens_out, r.speedup, r.flops_speedup]
            )


def write_csv(results: Sequence[Any], path: str) -> None:
    """One row per result, its fields as columns (lists and dicts as JSON)."""
    rows = to_json(results, {})["results"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
