"""Side-by-side benchmarks: throughput, latency, analytic FLOPs and peak memory per method; diffusion
denoisers and pipelines with fidelity, beside the tomesd package."""

from tokenreduce.bench.diffusion import DiffusionBenchResult, run_diffusion_bench
from tokenreduce.bench.flops import model_macs
from tokenreduce.bench.runner import BenchResult, MethodSpec, parse_specs, run_bench

__all__ = ["BenchResult", "DiffusionBenchResult", "MethodSpec", "model_macs", "parse_specs", "run_bench", "run_diffusion_bench"]
