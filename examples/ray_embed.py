"""Embed an image folder with a ToMe-patched timm ViT under Ray Data, writing Parquet (columns path, embedding).

    python examples/ray_embed.py IMAGES OUT --model vit_base_patch16_224 --pretrained --method tome --config r=8 \\
        --concurrency 4 --num-gpus 1

Each Ray actor builds the model and calls ``tokenreduce.apply`` in its ``__init__``
(``tokenreduce.integrations.ray_data.ImageEmbedder``); ``--address auto`` joins a running cluster, the default
starts a local one.
"""

from __future__ import annotations

import argparse
import ast

from tokenreduce.integrations.ray_data import embed_folder


def _config(items: list[str]) -> dict:
    """``["r=8", "prop_attn=False"]`` -> ``{"r": 8, "prop_attn": False}`` (values read as Python literals)."""
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config takes KEY=VALUE, got {item!r}")
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            config[key] = value
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", help="folder (or glob, or cloud URI) of images")
    parser.add_argument("output", help="folder for the Parquet files")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--pretrained", action="store_true", help="the hub's weights (else --checkpoint)")
    parser.add_argument("--checkpoint", help="a state_dict file every worker can read")
    parser.add_argument("--method", default="tome", help="tokenreduce method ('none': no reduction, the reference run)")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="method config, e.g. r=8")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=1, help="number of actors")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    parser.add_argument("--address", help="Ray cluster address ('auto' joins a running one)")
    args = parser.parse_args()

    import ray

    ray.init(address=args.address)
    embed_folder(
        args.images,
        args.output,
        args.model,
        args.method,
        _config(args.config),
        model_kwargs={"pretrained": args.pretrained},
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )


if __name__ == "__main__":
    main()
