"""``tokenreduce`` command line: ``methods``, ``bench`` and ``viz``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

import tokenreduce

DEFAULT_MODEL = "vit_small_patch16_224"
# r=16 needs clip=True on a 197-token ViT-S: its last block has 20 mergeable tokens left, half is 10.
DEFAULT_METHODS = "none,tome:r=8,tome:r=16:clip=True,evit:keep_rate=0.7"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def create_timm_model(name: str, pretrained: bool, img_size: int) -> torch.nn.Module:
    """A timm model by name: random weights, or the hub's pretrained ones (needs network access)."""
    try:
        import timm
    except ImportError:
        raise SystemExit("tokenreduce bench --model needs timm: pip install 'tokenreduce[timm]'") from None
    if name not in timm.list_models():
        raise SystemExit(f"unknown timm model {name!r}; see timm.list_models()")
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            # not a ViT-style model: build it anyway so that apply() can say why it is unsupported
            return timm.create_model(name, pretrained=pretrained)
    except Exception as err:
        if not pretrained:
            raise
        raise SystemExit(f"could not load pretrained weights for {name!r} from the hub ({type(err).__name__}: {err})") from err


def cmd_methods(args: argparse.Namespace) -> int:
    for name in tokenreduce.list_methods():
        method = tokenreduce.make_method(name)
        print(f"{name:8s} {method}  {method.paper}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tokenreduce.bench.runner import environment, format_table, parse_specs, run_bench, steps, to_json, with_baseline

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    specs = with_baseline(parse_specs(args.methods))
    model = create_timm_model(args.model, args.pretrained, args.img_size)
    total = steps(len(specs), args.repeats, args.warmup)
    with tqdm(total=total, desc=f"bench {args.model}", unit="fwd", disable=args.quiet, file=sys.stderr) as bar:
        results = run_bench(
            model,
            specs,
            batch_size=args.batch_size,
            img_size=args.img_size,
            repeats=args.repeats,
            warmup=args.warmup,
            device=args.device,
            dtype=DTYPES[args.dtype],
            progress=bar.update,
        )
    env = environment(
        args.device,
        DTYPES[args.dtype],
        args.batch_size,
        args.img_size,
        model=args.model,
        pretrained=args.pretrained,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(
        f"{args.model} | batch {args.batch_size} | {args.img_size}px | {env['dtype']} | {env['machine']} | "
        f"{env['threads']} threads | median of {args.repeats}"
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(results, env), f, indent=2)
        print(f"wrote {args.json}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from timm.data import resolve_model_data_config

    from tokenreduce.bench.runner import parse_specs
    from tokenreduce.viz.figure import compose, load_image, method_panels

    specs = parse_specs(args.methods)
    model = create_timm_model(args.model, args.pretrained, args.img_size).eval()
    config = resolve_model_data_config(model)
    grid = tuple(model.patch_embed.grid_size)
    rows = []
    for path in args.images:
        image = load_image(path, args.img_size)
        rows.append([image, *method_panels(model, image, specs, config["mean"], config["std"], grid)])
    compose(rows, ["input", *(s.label for s in specs)]).save(args.out)
    weights = "pretrained" if args.pretrained else "random weights: merges follow pixel similarity only"
    print(f"wrote {args.out} ({len(rows)} image(s) x {len(specs)} method(s), {args.model}, {weights})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description="Training-free token reduction for vision transformers.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("methods", help="list the registered methods and their defaults").set_defaults(fn=cmd_methods)

    bench = sub.add_parser("bench", help="compare methods side by side: speed, FLOPs, memory")
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    bench.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated name[:key=value...] specs (default {DEFAULT_METHODS})"
    )
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--img-size", type=int, default=224)
    bench.add_argument("--repeats", type=int, default=5, help="timed forwards per method; the median is reported")
    bench.add_argument("--warmup", type=int, default=1, help="untimed forwards per method before timing")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--pretrained", action="store_true", help="load hub weights (needs network); default random")
    bench.add_argument("--json", help="write the results and the environment to this file")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(fn=cmd_bench)

    viz = sub.add_parser("viz", help="draw which patches each method kept and merged on your images")
    viz.add_argument("images", nargs="+", help="image files")
    viz.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    viz.add_argument("--methods", default="tome:r=16:clip=True,evit:keep_rate=0.7")
    viz.add_argument("--img-size", type=int, default=224)
    viz.add_argument("--pretrained", action="store_true", help="load hub weights (needs network); default random")
    viz.add_argument("--out", default="tokenreduce-viz.png", help="PNG to write")
    viz.set_defaults(fn=cmd_viz)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except (ValueError, TypeError) as err:
        parser.exit(2, f"tokenreduce {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
