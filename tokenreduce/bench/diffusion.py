"""The diffusion bench: denoiser methods side by side on one diffusers denoiser (one call) or pipeline
(one whole generation), next to the tomesd package at the same settings in the same run.

For every variant: median latency over interleaved repeats, speedup over the unreduced model, FLOPs
counted by torch's ``FlopCounterMode`` and the speedup as a share of the FLOP-ideal one, peak memory,
the share of time spent matching and merging, and fidelity to the unreduced output at a fixed seed:
PSNR and SSIM of the decoded image, or of the latent where there is no VAE. Each tomesd row of ours is
paired with the package's row at the same ratio, and the largest difference between the two outputs
is reported (with ``use_rand=False`` both pick the same merges). All variants patch one shared model in
turn (the patch is installed and removed outside the timed calls), so real weights are held once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import tokenreduce
from tokenreduce.api import patch_of
from tokenreduce.bench.denoisers import (
    DenoiserCall,
    PipelineCall,
    denoiser_inputs,
    denoiser_kind,
    denoiser_of,
    is_pipeline,
    pipeline_inputs,
)
from tokenreduce.bench.fidelity import psnr, ssim
from tokenreduce.bench.flops import counted_macs
from tokenreduce.bench.memory import peak_memory_bytes
from tokenreduce.bench.runner import MethodSpec, interleaved_times, reduction_share, with_baseline
from tokenreduce.core import Selection
from tokenreduce.validate import as_int

# tomesd.apply_patch's arguments, as ToMeSD names them
TOMESD_ARGS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")


@dataclass
class DiffusionBenchResult:
    """One variant on the diffusion bench; ratios are against the ``none`` row of the same run."""

    method: str
    implementation: str  # "unreduced", "tokenreduce" or "tomesd <version>" (the package)
    params: dict[str, Any]
    latency_ms: float  # median of one denoiser call on the batch, or of one whole generation
    s_per_image: float | None  # pipelines: generation seconds per image
    gflops: float  # per call or generation, multiply-accumulates counted by torch (the literature's "GFLOPs")
    peak_memory_mib: float  # tensors allocated by one call beyond weights and inputs
    reduce_share: float  # fraction of the time spent matching, merging and unmerging
    reduced_blocks: int  # blocks that reduced in the last denoiser call
    tokens: list[list[int]]  # [image tokens in, tokens attention ran on] per reduced block
    psnr_db: float | None  # against the unreduced output; None where equal (infinite)
    ssim: float | None  # None for outputs with no image layout
    speedup: float = 1.0
    flops_speedup: float = 1.0
    vs_tomesd: float | None = None  # ours only: the tomesd package's latency over ours at the same settings
    max_abs_diff_tomesd: float | None = None  # ours only: max |ours - tomesd package| (use_rand=False)
    times_ms: list[float] = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the FLOP-ideal one."""
        return self.speedup / self.flops_speedup


@dataclass
class Variant:
    """One row: how to patch the shared model for it and take the patch off again."""

    label: str
    implementation: str
    params: dict[str, Any]
    install: Callable[[Any], None]
    uninstall: Callable[[Any], None]
    twin: int | None = None  # a tomesd package row: the index of our row at the same settings


def tomesd_version() -> str | None:
    """The installed tomesd package's version, ``None`` when it is not installed."""
    if importlib.util.find_spec("tomesd") is None:
        return None
    return importlib.metadata.version("tomesd")


def tomesd_note(model: Any, specs: Sequence[MethodSpec]) -> str | None:
    """Why the tomesd package gets no rows in this run, or ``None`` when it does."""
    if not any(s.name == "tomesd" for s in specs):
        return "no tomesd rows: --methods has no tomesd spec to compare with the package"
    if tomesd_version() is None:
        return "tomesd column skipped: the tomesd package is not installed (pip install tomesd)"
    kind = denoiser_kind(denoiser_of(model))
    if kind != "UNet2DConditionModel":
        why = {
            "DiTTransformer2DModel": "reads the latent's size as the token grid and merges nothing",
            "PixArtTransformer2DModel": "fails in its copy of the block's forward (no norm3 in ada_norm_single)",
        }.get(kind, "finds no BasicTransformerBlock to patch")
        return f"tomesd column skipped: the tomesd package patches Stable Diffusion UNets; on {kind} it {why}"
    return None


def _ours(spec: MethodSpec) -> Variant:
    method = tokenreduce.make_method(spec.name, **spec.config)
    if spec.name == "none":
        return Variant("none", "unreduced", {}, lambda m: None, lambda m: None)
    return Variant(spec.label, "tokenreduce", method.params(), lambda m: tokenreduce.apply(m, method), tokenreduce.remove)


def _package(spec: MethodSpec, twin: int, version: str) -> Variant:
    import tomesd

    params = tokenreduce.make_method(spec.name, **spec.config).params()
    args = {k: params[k] for k in TOMESD_ARGS}
    return Variant(f"{spec.label} [tomesd {version}]", f"tomesd {version}", args,
                   lambda m: tomesd.apply_patch(m, **args), tomesd.remove_patch, twin)  # fmt: skip


def variants(model: Any, specs: Sequence[MethodSpec]) -> tuple[list[Variant], list[str]]:
    """Our rows (``none`` first when missing), then a tomesd package row for each tomesd spec where the
    package applies; and notes on what was left out."""
    rows = [_ours(s) for s in with_baseline(specs)]
    note = tomesd_note(model, specs)
    if note is None:
        version = tomesd_version()
        rows += [_package(s, i, version) for i, s in enumerate(with_baseline(specs)) if s.name == "tomesd"]
    return rows, [note] if note else []


@contextmanager
def _installed(variant: Variant, model: Any) -> Iterator[None]:
    variant.install(model)
    try:
        yield
    finally:
        variant.uninstall(model)


@contextmanager
def _tomesd_blocks(blocks: list[list[int]], denoiser: nn.Module) -> Iterator[None]:
    """Notes ``[tokens in, tokens out]`` of every merge the tomesd package makes in the last call of
    ``denoiser`` meanwhile."""
    from tomesd import merge

    original = merge.bipartite_soft_matching_random2d
    hook = denoiser.register_forward_pre_hook(lambda module, args: blocks.clear())

    def matching(metric: Tensor, *args, **kwargs):
        m, u = original(metric, *args, **kwargs)
        entry = [metric.shape[1], metric.shape[1]]
        blocks.append(entry)

        def counted(x: Tensor, *a, **k) -> Tensor:
            out = m(x, *a, **k)
            entry[1] = out.shape[1]
            return out

        return counted, u

    merge.bipartite_soft_matching_random2d = matching
    try:
        yield
    finally:
        merge.bipartite_soft_matching_random2d = original
        hook.remove()


def _share(variant: Variant, model: Any, call: Callable[[], object], device: torch.device) -> float:
    """The share of one call spent in the variant's reduction: our method's plan and the selection's
    apply and unmerge, or the package's matching with the merge and unmerge functions it returns."""
    if variant.implementation == "unreduced":
        return 0.0
    if variant.twin is None:
        targets = [(patch_of(model).method, "plan"), (Selection, "apply"), (Selection, "unmerge")]
        return reduction_share(call, targets, device)
    from tomesd import merge

    def wrap(timed, original):
        return lambda *a, **k: tuple(timed(f) for f in timed(original)(*a, **k))

    return reduction_share(call, [(merge, "bipartite_soft_matching_random2d")], device, wrap)


def _as_image(out: Tensor, grid: tuple[int, int] | None) -> Tensor | None:
    """``[B, C, H, W]`` for SSIM: as it is, or packed ``[B, N, C]`` tokens laid on their grid."""
    if out.dim() == 4:
        return out
    if out.dim() == 3:
        side = math.isqrt(out.shape[1])
        grid = grid if grid and grid[0] * grid[1] == out.shape[1] else (side, side) if side * side == out.shape[1] else None
        if grid is not None:
            return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], *grid)
    return None


def fidelity(reference: Tensor, output: Tensor, decoded: bool, grid: tuple[int, int] | None) -> tuple[float | None, float | None]:
    """PSNR (``None`` when equal) and SSIM of ``output`` against ``reference``: decoded images in
    ``[0, 1]`` with range 1; latents with the reference's range (max - min)."""
    data_range = 1.0 if decoded else float(reference.max() - reference.min()) or 1.0
    value = psnr(reference, output, data_range)
    images = _as_image(reference, grid), _as_image(output, grid)
    structural = ssim(*images, data_range) if images[0] is not None else None
    return (None if math.isinf(value) else value), structural


def diffusion_steps(rows: int, reducing: int, repeats: int, warmup: int) -> int:
    """Calls ``run_diffusion_bench`` reports to ``progress`` for ``rows`` variants of which ``reducing``
    reduce: per variant the checked call, the counted call, warmup, timed repeats and the memory pass;
    the share pass for each reducing one."""
    return rows * (3 + max(warmup - 1, 0) + repeats) + reducing


def run_diffusion_bench(
    model: Any,
    specs: Sequence[MethodSpec],
    *,
    batch_size: int = 2,
    latent_size: int = 64,
    steps: int = 4,
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[DiffusionBenchResult], list[str]]:
    """Benchmark every spec (and the tomesd package beside each tomesd spec) on ``model``, a diffusers
    denoiser or pipeline, patching it in turn: it is moved to ``device`` and ``dtype`` and otherwise
    left as it was. A denoiser runs one call on
    ``batch_size`` rows (:func:`~tokenreduce.bench.denoisers.denoiser_inputs`), a pipeline one
    generation of ``batch_size`` images in ``steps`` steps; both at a ``latent_size`` square latent
    and a fixed ``seed``. Returns the rows and notes on what was left out."""
    batch_size, latent_size = as_int("batch_size", batch_size, 1), as_int("latent_size", latent_size, 1)
    steps, repeats, warmup = as_int("steps", steps, 1), as_int("repeats", repeats, 1), as_int("warmup", warmup, 0)
    device, tick = torch.device(device), progress or (lambda n: None)
    rows, notes = variants(model, specs)  # every config checked before anything runs
    pipeline = is_pipeline(model)
    if next(denoiser_of(model).parameters()).dtype != dtype:  # diffusers warns on every cast, even to the same dtype
        model = model.to(dtype=dtype)
    model = model.to(device)
    if pipeline:
        model.set_progress_bar_config(disable=True)
        inputs: DenoiserCall | PipelineCall = pipeline_inputs(model, batch_size, latent_size, steps, seed)
        decoded, grid = inputs.kwargs["output_type"] == "pt", None
    else:
        inputs = denoiser_inputs(model, batch_size, latent_size, seed).to(device, dtype)
        decoded, grid = False, inputs.grid

    def call() -> Tensor:
        return inputs(model)

    outputs, tokens, macs = [], [], []
    with torch.inference_mode():
        for row in rows:
            blocks: list[list[int]] = []
            with _installed(row, model), _tomesd_blocks(blocks, denoiser_of(model)) if row.twin is not None else nullcontext():
                outputs.append(call().float().cpu())
                tick(1)
                if row.implementation == "tokenreduce":
                    blocks = [[c.tokens_in, c.tokens_out] for c in tokenreduce.record(model).calls]
                tokens.append([b for b in blocks if b[1] < b[0]])
                macs.append(counted_macs(call))
                tick(1)
        for row in rows:
            with _installed(row, model):
                for _ in range(max(warmup - 1, 0)):
                    call()
                    tick(1)
        around = [lambda row=row: _installed(row, model) for row in rows]
        times = [t for (t,) in interleaved_times([[call] for _ in rows], repeats, device, tick, around)]
        peaks, shares = [], []
        for row in rows:
            with _installed(row, model):
                peaks.append(peak_memory_bytes(call, device))
                tick(1)
                if row.implementation != "unreduced":
                    shares.append(_share(row, model, call, device))
                    tick(1)
                else:
                    shares.append(0.0)

    base = rows.index(next(r for r in rows if r.implementation == "unreduced"))
    results = []
    for row, out, blocks, mac, t, peak, share in zip(rows, outputs, tokens, macs, times, peaks, shares):
        latency = statistics.median(t)
        value, structural = fidelity(outputs[base], out, decoded, grid)
        results.append(
            DiffusionBenchResult(
                method=row.label,
                implementation=row.implementation,
                params=row.params,
                latency_ms=latency * 1e3,
                s_per_image=latency / inputs.images if pipeline else None,
                gflops=mac / 1e9,
                peak_memory_mib=peak / 2**20,
                reduce_share=share,
                reduced_blocks=len(blocks),
                tokens=blocks,
                psnr_db=value,
                ssim=structural,
                times_ms=[s * 1e3 for s in t],
            )
        )
    for r in results:
        r.speedup = results[base].latency_ms / r.latency_ms
        r.flops_speedup = results[base].gflops / r.gflops
    for row, pkg in zip(rows, results):
        if row.twin is None:
            continue
        ours = results[row.twin]
        ours.vs_tomesd = pkg.latency_ms / ours.latency_ms
        if row.params["use_rand"]:
            notes.append(
                f"{ours.method}: use_rand=True draws other destinations than the package (its generator forks the "
                "global RNG, ours hashes the timestep), so the outputs are not compared; use use_rand=False"
            )
        else:
            ours.max_abs_diff_tomesd = float((outputs[rows.index(row)] - outputs[row.twin]).abs().max())
    return results, notes


def format_diffusion_table(results: Sequence[DiffusionBenchResult], pipeline: bool) -> str:
    """The rows as a text table: milliseconds per denoiser call, or seconds per image of a pipeline."""
    head = ["method", "tokens", "GFLOPs", "s/image" if pipeline else "ms/call", "speedup", "FLOP-ideal", "of ideal",
            "peak MiB", "reduce %", "PSNR dB", "SSIM", "vs tomesd", "max|Δ| tomesd"]  # fmt: skip

    def tokens(r: DiffusionBenchResult) -> str:
        if not r.tokens:
            return "-" if r.implementation != "unreduced" else "all"
        shown = sorted({f"{a}->{b}" for a, b in r.tokens}, key=lambda s: -int(s.split("->")[0]))
        return f"{len(r.tokens)}x " + ",".join(shown)

    rows = [
        [
            r.method,
            tokens(r),
            f"{r.gflops:.2f}",
            f"{r.s_per_image:.2f}" if pipeline else f"{r.latency_ms:.1f}",
            f"{r.speedup:.2f}x",
            f"{r.flops_speedup:.2f}x",
            f"{r.efficiency:.0%}",
            f"{r.peak_memory_mib:.1f}",
            f"{r.reduce_share:.1%}",
            "inf" if r.psnr_db is None else f"{r.psnr_db:.1f}",
            "-" if r.ssim is None else f"{r.ssim:.4f}",
            "-" if r.vs_tomesd is None else f"{r.vs_tomesd:.2f}x",
            "-" if r.max_abs_diff_tomesd is None else f"{r.max_abs_diff_tomesd:.1e}",
        ]
        for r in results
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
