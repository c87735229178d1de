"""Labeled images for the quality runs: the CIFAR-10 subset in ``../shared`` or class-subfolder trees."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class Images:
    """Images as ``uint8 [N, H, W, 3]`` arrays or file paths, their labels (or ``None``) and class names."""

    images: np.ndarray | list[Path]
    labels: np.ndarray | None
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, stop: int, size: int, mean, std) -> Tensor:
        """Images ``start:stop`` resized to ``size`` (bilinear; files: short side then centre crop) and
        normalised with ``mean``/``std``: ``[n, 3, size, size]`` float32."""
        if isinstance(self.images, np.ndarray):
            x = torch.from_numpy(self.images[start:stop]).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        else:
            from tokenreduce.viz.figure import load_image

            x = torch.stack([load_image(str(p), size) for p in self.images[start:stop]])
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def balanced(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class (all when ``None``), in order."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


def load_npz(path: str | Path, split: str, per_class: int | None = None) -> Images:
    """``x_<split>``/``y_<split>``/``classes`` of an ``.npz`` (the CIFAR-10 subset's layout)."""
    data = np.load(path)
    for key in (f"x_{split}", f"y_{split}"):
        if key not in data:
            raise ValueError(f"{path}: no array {key!r} (has {sorted(data.files)})")
    x, y = data[f"x_{split}"], data[f"y_{split}"]
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images in x_{split} but {len(y)} labels in y_{split}")
    keep = balanced(y, per_class)
    classes = [str(c) for c in data["classes"]] if "classes" in data else [str(c) for c in np.unique(y)]
    return Images(x[keep], y[keep].astype(np.int64), classes)


def load_folder(path: str | Path, labeled: bool = True, per_class: int | None = None) -> Images:
    """Images under ``path``: with ``labeled``, one subfolder per class (sorted names are the classes);
    else every image file found, unlabeled."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{path}: not a directory")
    if labeled:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in EXTENSIONS]
        if not classes or not files:
            raise ValueError(f"{path}: no images in class subfolders (expected {path}/<class>/<image>)")
        labels = np.array([i for _, i in files])
        keep = balanced(labels, per_class)
        return Images([files[i][0] for i in keep], labels[keep], classes)
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in EXTENSIONS)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(sorted(EXTENSIONS))})")
    return Images(files, None, [])
