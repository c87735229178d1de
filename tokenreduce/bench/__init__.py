"""Side-by-side benchmarks: throughput, latency, analytic FLOPs and peak memory per method."""

from tokenreduce.bench.flops import model_macs
from tokenreduce.bench.runner import BenchResult, MethodSpec, parse_specs, run_bench

__all__ = ["BenchResult", "MethodSpec", "model_macs", "parse_specs", "run_bench"]
