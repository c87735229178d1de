"""End-to-end check of the vLLM plugin on CPU with a tiny random LLaVA-1.5 (no hub, 2 to 3 minutes per engine
start on 2 shared cores).

    bash benchmarks/vllm_cpu_env.sh /work/venv-vllm    # once
    /work/venv-vllm/bin/python benchmarks/vllm_plugin_check.py --reference-python /work/venv/bin/python

For each configuration (plain LLaVA, then the plugin's class with each method) it starts a
``vllm.LLM`` in a child process, generates greedily from one image prompt and checks that:

* the plugin's ``register()`` ran in every vLLM process (each writes its pid to ``TOKENREDUCE_VLLM_TRACE``);
* the prompt vLLM built holds ``method.num_kept(64, (8, 8))`` image placeholders (64 without the plugin);
* the tokens generated equal those of the transformers model patched by ``tokenreduce.apply`` with the
  same method (greedy, float32): the same selection reached the same LLM;
* a method keeping every token (``keep_ratio=1``) generates what plain LLaVA does, with the same
  log-probabilities, and each pruning method moves them (the kept tokens reach the LLM).

Not part of the pytest suite: vLLM needs its own venv (vllm-cpu pins torch 2.13.0+cpu) and minutes per
engine start. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vllm_tiny

MAX_TOKENS = 8
CONFIGS: list[dict | None] = [
    None,  # plain LlavaForConditionalGeneration
    {"method": "random", "keep_ratio": 1.0},
    {"method": "divprune", "keep_ratio": 0.25},
    {"method": "pool", "stride": 2},
]


def run_engine(folder: Path, tokenreduce: dict | None) -> dict:
    """In this process: start vLLM, generate from one image prompt, return what the checks need."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**vllm_tiny.engine_args(folder, tokenreduce))
    started = time.perf_counter() - start
    image_token = llm.get_tokenizer().convert_tokens_to_ids("<image>")
    request = {"prompt": vllm_tiny.PROMPT, "multi_modal_data": {"image": vllm_tiny.images(1)[0]}}
    out = llm.generate([request], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1))[0]
    llm.llm_engine.engine_core.shutdown()
    return {
        "placeholders": sum(t == image_token for t in out.prompt_token_ids),
        "prompt_tokens": len(out.prompt_token_ids),
        "generated": list(out.outputs[0].token_ids),
        "logprobs": [step[t].logprob for step, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)],
        "start_s": round(started, 1),
        "pid": os.getpid(),
    }


def reference(folder: Path, tokenreduce: dict | None) -> dict:
    """The placeholders kept and the greedy tokens of the transformers model, patched by tokenreduce when asked."""
    import torch
    import transformers as T

    import tokenreduce as tr

    processor = T.AutoProcessor.from_pretrained(folder)
    model = T.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    keep = vllm_tiny.TOKENS_PER_IMAGE
    if tokenreduce is not None:
        config = dict(tokenreduce)
        method = tr.make_method(config.pop("method"), stage="pre_llm", **config)
        side = vllm_tiny.IMAGE_SIZE // vllm_tiny.PATCH
        keep = method.num_kept(keep, (side, side))
        tr.apply(model, method)
    inputs = processor(text=vllm_tiny.PROMPT, images=vllm_tiny.images(1), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    return {"placeholders": keep, "generated": ids[0, inputs["input_ids"].shape[1] :].tolist()}


def child(cmd: list[str], env: dict | None, what: str) -> dict:
    """Run this script's internal mode ``cmd`` in a new process and return the JSON it prints."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
        check(False, f"{what} ran (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def check(condition: bool, what: str) -> None:
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where the tiny model is (written there when absent)")
    parser.add_argument(
        "--reference-python",
        default=sys.executable,
        help="the Python of a venv with the transformers tokenreduce supports, for the reference run "
        "(vllm-cpu 0.32 pins transformers<5.20; tokenreduce's HF adapter follows the latest)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one engine, print its JSON result
    parser.add_argument("--reference", help=argparse.SUPPRESS)  # internal: run the transformers reference
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_engine(args.folder, json.loads(args.one))), flush=True)
        return
    if args.reference is not None:
        print("RESULT " + json.dumps(reference(args.folder, json.loads(args.reference))), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="tokenreduce-vllm-"))
    folder = args.folder or work / "tiny-llava"
    if not (folder / "config.json").exists():
        vllm_tiny.write_tiny_llava(folder)
    results = {}
    for config in CONFIGS:
        name = "llava" if config is None else json.dumps(config)
        trace = work / f"trace-{len(results)}"
        trace.mkdir()
        env = dict(os.environ, TOKENREDUCE_VLLM_TRACE=str(trace))
        got = child([sys.executable, __file__, "--folder", str(folder), "--one", json.dumps(config)], env, f"{name}: vLLM")
        pids = sorted(int(p.name) for p in trace.iterdir())
        ref = child([args.reference_python, __file__, "--folder", str(folder), "--reference", json.dumps(config)], None, name)
        keep, tokens = ref["placeholders"], ref["generated"]
        print(f"{name}: {got['placeholders']} placeholders, generated {got['generated']}, engine start {got['start_s']} s")
        check(got["pid"] in pids and len(pids) >= 2, f"{name}: register() ran in every vLLM process (pids {pids})")
        check(got["placeholders"] == keep, f"{name}: {got['placeholders']} image placeholders == num_kept {keep}")
        check(len(got["generated"]) == MAX_TOKENS, f"{name}: the engine generated {MAX_TOKENS} tokens")
        check(got["generated"] == tokens, f"{name}: vLLM's tokens equal transformers + tokenreduce.apply's {tokens}")
        results[name] = got
    # The random model's greedy tokens hardly depend on the image; the log-probabilities of those tokens do.
    base = results["llava"]["logprobs"]
    full = results[json.dumps(CONFIGS[1])]
    gap = max(abs(a - b) for a, b in zip(full["logprobs"], base))
    same = full["generated"] == results["llava"]["generated"] and gap < 1e-4
    check(same, f"keep_ratio=1 equals plain LLaVA (logprob gap {gap:.1e})")
    for config in CONFIGS[2:]:
        gap = max(abs(a - b) for a, b in zip(results[json.dumps(config)]["logprobs"], base))
        check(gap > 1e-3, f"{json.dumps(config)}: the kept tokens reach the LLM (logprobs move by {gap:.3f} from plain LLaVA)")
    print("all checks passed")


if __name__ == "__main__":
    main()
