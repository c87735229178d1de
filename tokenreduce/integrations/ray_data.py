"""Embed images with a token-reduced timm ViT under Ray Data.

:class:`ImageEmbedder` is a callable class for ``Dataset.map_batches``: Ray builds one per actor, so the timm
model is created and patched with ``tokenreduce.apply`` inside the worker (the patched model is never pickled;
the driver only needs ``import tokenreduce``, which imports no model library). :func:`embed_folder` is the
whole job: ``read_images`` -> ``map_batches(ImageEmbedder)`` -> ``write_parquet``.

    ray.init()
    embed_folder("s3://bucket/images/", "s3://bucket/embeddings/", "vit_base_patch16_224",
                 method="tome", method_config={"r": 8}, model_kwargs={"pretrained": True}, concurrency=4, num_gpus=1)

Every actor must build the same weights: pass ``pretrained=True`` (the hub's) or ``checkpoint`` (a local
``state_dict`` file every worker can read); a randomly initialised model differs from actor to actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import tokenreduce


class ImageEmbedder:
    """``map_batches`` callable class: a batch ``{"image": [H, W, 3] uint8 arrays, ...}`` in, the same batch with
    ``"embedding" [B, D]`` (the model's pooled features, its classifier removed) in place of the images out.

    ``model``: a timm model name; ``model_kwargs`` go to ``timm.create_model`` (``pretrained``, ``img_size`` ...);
    ``checkpoint``: a ``state_dict`` file loaded with ``weights_only=True``; ``method`` / ``method_config``: what
    ``tokenreduce.apply`` gets (``None``: the unreduced model, the reference row). Images go through timm's
    evaluation transform for the model (resize, center crop, normalise).
    """

    def __init__(
        self,
        model: str,
        method: str | None = "tome",
        method_config: dict[str, Any] | None = None,
        *,
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        image_column: str = "image",
    ) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = timm.create_model(model, **(model_kwargs or {}))
        if checkpoint is not None:
            self.model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        self.model.reset_classifier(0)  # the pooled features are the embedding
        self.model.eval().to(self.device)
        if method is not None:
            tokenreduce.apply(self.model, method, **(method_config or {}))
        self.transform = create_transform(**resolve_data_config({}, model=self.model))
        self.image_column = image_column

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """``[B, D]`` float32 embeddings of ``images`` (each ``[H, W, 3]`` uint8, any size)."""
        from PIL import Image

        batch = torch.stack([self.transform(Image.fromarray(np.asarray(image))) for image in images])
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.image_column not in batch:
            raise KeyError(f"image_column {self.image_column!r} is not in the batch; it has {sorted(batch)}")
        out = {k: v for k, v in batch.items() if k != self.image_column}
        out["embedding"] = self.embed(list(batch[self.image_column]))
        return out


def embed_folder(
    images: str | list[str],
    output: str,
    model: str,
    method: str | None = "tome",
    method_config: dict[str, Any] | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    batch_size: int = 32,
    concurrency: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> None:
    """Embed every image under ``images`` into Parquet files under ``output`` (columns ``path``, ``embedding``),
    with ``concurrency`` actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs each."""
    import ray.data

    ds = ray.data.read_images(images, include_paths=True, mode="RGB")
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_args=(model, method, method_config),
        fn_constructor_kwargs={"model_kwargs": model_kwargs, "checkpoint": checkpoint},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    ds.write_parquet(output)
