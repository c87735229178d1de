"""A comparison figure: one row per image, the input and then one panel per method."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import tokenreduce
from tokenreduce.adapters.hf_vlm import VLMRecord
from tokenreduce.bench.runner import MethodSpec
from tokenreduce.state import Record
from tokenreduce.viz.sources import patch_assignment, render_merges

LABEL_HEIGHT = 18


def load_image(path: str, size: int) -> Tensor:
    """An RGB file resized (short side) and centre-cropped to ``size``, as ``[3, size, size]`` in [0, 1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3).permute(2, 0, 1) / 255


def method_panels(
    model: nn.Module,
    image: Tensor,
    specs: Sequence[MethodSpec],
    mean: Sequence[float],
    std: Sequence[float],
    grid: tuple[int, int],
    run: Callable[[Tensor], object] | None = None,
) -> list[Tensor]:
    """Run ``model`` on ``image`` with each method and render what it kept and merged. ``run`` calls the
    model on the normalised ``[1, 3, H, W]`` image (default ``model(x)``; a VLM needs a prompt)."""
    x = ((image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]
    panels = []
    for spec in specs:
        with tokenreduce.applied(model, spec.name, **spec.config), torch.no_grad():
            (run or model)(x)
            owner, prefix = first_image_owner(tokenreduce.record(model))
        panels.append(render_merges(image, patch_assignment(owner, prefix, grid)))
    return panels


def first_image_owner(record: Record | VLMRecord) -> tuple[Tensor, int]:
    """``(owner, leading non-patch tokens)`` of the first image of an encoder's or a VLM's record."""
    if isinstance(record, VLMRecord):
        return record.images[0].owner, 0
    return record.owner[0], record.num_prefix


def compose(rows: Sequence[Sequence[Tensor]], labels: Sequence[str]):
    """Tile ``rows`` of equally sized ``[3, H, W]`` panels under a label strip into a PIL image."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[1:]
    canvas = Image.new("RGB", (w * len(labels), LABEL_HEIGHT + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(labels):
        draw.text((col * w + 4, 3), label, fill="black")
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            pixels = (panel.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
            canvas.paste(Image.frombytes("RGB", (w, h), pixels.numpy().tobytes()), (c * w, LABEL_HEIGHT + r * h))
    return canvas
