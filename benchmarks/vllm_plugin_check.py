"""End-to-end check of the vLLM plugin on CPU with a tiny random LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision
(no hub, 2 to 3 minutes per engine start on 2 shared cores).

    bash benchmarks/vllm_cpu_env.sh /work/venv-vllm    # once
    /work/venv-vllm/bin/python benchmarks/vllm_plugin_check.py --reference-python /work/venv/bin/python \
        [--family llava|llava_next|llava_onevision]

For each configuration (plain vLLM model, then the plugin's class with each method) it starts a
``vllm.LLM`` in a child process, generates greedily from one image prompt per image size (LLaVA-1.5:
64 x 64; NeXT and OneVision: 64 x 40 and 40 x 64, so that their AnyRes crops are unpadded) and checks that:

* the plugin's ``register()`` ran in every vLLM process (each writes its pid to ``TOKENREDUCE_VLLM_TRACE``);
* the prompt vLLM built holds as many image placeholders as the transformers model patched by
  ``tokenreduce.apply`` with the same method sent to its LLM for that image (``tokenreduce.record``;
  LLaVA-1.5: ``method.num_kept(64, (8, 8))``);
* the tokens generated and their log-probabilities equal those of that transformers model (greedy,
  float32; log-probabilities within 1e-3): the same selection reached the same LLM;
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
CONFIGS: dict[str, list[dict | None]] = {
    "llava": [
        None,  # plain LlavaForConditionalGeneration
        {"method": "random", "keep_ratio": 1.0},
        {"method": "divprune", "keep_ratio": 0.25},
        {"method": "pool", "stride": 2},
    ],
    # pool needs a patch grid, which a packed AnyRes span (base image, unpadded crops, newlines) has not.
    "llava_next": [None, {"method": "random", "keep_ratio": 1.0}, {"method": "divprune", "keep_ratio": 0.25}],
    "llava_onevision": [None, {"method": "random", "keep_ratio": 1.0}, {"method": "divprune", "keep_ratio": 0.25}],
}
ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
SIZES = {  # (width, height) of each request's image
    "llava": [(vllm_tiny.IMAGE_SIZE, vllm_tiny.IMAGE_SIZE)],
    "llava_next": [(64, 40), (40, 64)],
    "llava_onevision": [(64, 40), (40, 64)],
}


def prompt_images(family: str) -> list:
    """One image per request, of each size in :data:`SIZES`."""
    return [vllm_tiny.images(1, seed=i, size=w, height=h)[0] for i, (w, h) in enumerate(SIZES[family])]


def run_engine(folder: Path, family: str, tokenreduce: dict | None) -> dict:
    """In this process: start vLLM, generate from one image prompt per size, return what the checks need."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**vllm_tiny.engine_args(folder, tokenreduce, architecture=ARCHITECTURES[family]))
    started = time.perf_counter() - start
    image_token = llm.get_tokenizer().convert_tokens_to_ids("<image>")
    requests = [{"prompt": vllm_tiny.PROMPT, "multi_modal_data": {"image": image}} for image in prompt_images(family)]
    outs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1))
    llm.llm_engine.engine_core.shutdown()
    return {
        "placeholders": [sum(t == image_token for t in out.prompt_token_ids) for out in outs],
        "generated": [list(out.outputs[0].token_ids) for out in outs],
        "logprobs": [[s[t].logprob for s, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)] for out in outs],
        "start_s": round(started, 1),
        "pid": os.getpid(),
    }


def reference(folder: Path, family: str, tokenreduce: dict | None) -> dict:
    """Per request, the visual tokens the transformers model sent to its LLM and its greedy tokens,
    patched by tokenreduce when asked."""
    import torch
    import transformers as T

    import tokenreduce as tr

    processor = T.AutoProcessor.from_pretrained(folder)
    model = getattr(T, ARCHITECTURES[family]).from_pretrained(folder, dtype=torch.float32).eval()
    if tokenreduce is not None:
        config = dict(tokenreduce)
        tr.apply(model, tr.make_method(config.pop("method"), stage="pre_llm", **config))
    image_token = model.config.image_token_id
    placeholders, generated, logprobs = [], [], []
    for image in prompt_images(family):
        inputs = processor(text=vllm_tiny.PROMPT, images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        kept = int((inputs["input_ids"] == image_token).sum()) if tokenreduce is None else tr.record(model).images[0].kept
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :]
        placeholders.append(kept)
        generated.append(tokens.tolist())
        logprobs.append([float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.logits, tokens)])
    return {"placeholders": placeholders, "generated": generated, "logprobs": logprobs}


def logprob_gap(a: dict, b: dict) -> float:
    """The largest difference between the log-probabilities of the generated tokens of two runs."""
    return max(abs(x - y) for ra, rb in zip(a["logprobs"], b["logprobs"]) for x, y in zip(ra, rb))


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
    parser.add_argument("--family", choices=sorted(CONFIGS), default="llava")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one engine, print its JSON result
    parser.add_argument("--reference", help=argparse.SUPPRESS)  # internal: run the transformers reference
    args = parser.parse_args()
    family = args.family
    if args.one is not None:
        print("RESULT " + json.dumps(run_engine(args.folder, family, json.loads(args.one))), flush=True)
        return
    if args.reference is not None:
        print("RESULT " + json.dumps(reference(args.folder, family, json.loads(args.reference))), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="tokenreduce-vllm-"))
    folder = args.folder or work / f"tiny-{family}"
    if not (folder / "config.json").exists():
        vllm_tiny.write_tiny_llava(folder) if family == "llava" else vllm_tiny.write_tiny_anyres(folder, family)
    configs = CONFIGS[family]
    results = {}
    for config in configs:
        name = family if config is None else json.dumps(config)
        trace = work / f"trace-{len(results)}"
        trace.mkdir()
        env = dict(os.environ, TOKENREDUCE_VLLM_TRACE=str(trace))
        common = [__file__, "--folder", str(folder), "--family", family]
        got = child([sys.executable, *common, "--one", json.dumps(config)], env, f"{name}: vLLM")
        pids = sorted(int(p.name) for p in trace.iterdir())
        ref = child([args.reference_python, *common, "--reference", json.dumps(config)], None, name)
        keep, tokens = ref["placeholders"], ref["generated"]
        print(f"{name}: {got['placeholders']} placeholders, generated {got['generated']}, engine start {got['start_s']} s")
        check(got["pid"] in pids and len(pids) >= 2, f"{name}: register() ran in every vLLM process (pids {pids})")
        check(
            got["placeholders"] == keep,
            f"{name}: {got['placeholders']} image placeholders == the transformers path's visual tokens {keep}",
        )
        check(all(len(g) == MAX_TOKENS for g in got["generated"]), f"{name}: the engine generated {MAX_TOKENS} tokens")
        check(got["generated"] == tokens, f"{name}: vLLM's tokens equal transformers + tokenreduce.apply's {tokens}")
        # Greedy tokens of a random model hardly depend on the image; their log-probabilities do.
        gap = logprob_gap(got, ref)
        check(gap < 1e-3, f"{name}: vLLM's log-probabilities equal transformers + tokenreduce.apply's (gap {gap:.1e})")
        results[name] = got

    base, full = results[family], results[json.dumps(configs[1])]
    gap = logprob_gap(full, base)
    check(full["generated"] == base["generated"] and gap < 1e-4, f"keep_ratio=1 equals plain {family} (logprob gap {gap:.1e})")
    for config in configs[2:]:
        gap = logprob_gap(results[json.dumps(config)], base)
        check(gap > 1e-3, f"{json.dumps(config)}: the kept tokens reach the LLM (logprobs move by {gap:.3f} from plain {family})")
    print("all checks passed")


if __name__ == "__main__":
    main()
