"""The Ray Data recipe (tokenreduce/integrations/ray_data.py) on a local Ray: a folder of PNGs embedded by a
ToMe-patched timm ViT that each actor builds and patches itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tokenreduce

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[data]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed")
import pyarrow.parquet as pq  # noqa: E402
import timm  # noqa: E402
from PIL import Image  # noqa: E402

from tokenreduce.integrations.ray_data import ImageEmbedder, embed_folder  # noqa: E402

ROOT = Path(tokenreduce.__file__).parents[1]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 48), (64, 64), (50, 30), (70, 90)]):  # any size: the transform resizes
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_embeddings_under_ray_data_equal_the_patched_model_run_directly(image_folder, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "test_vit.pt"
    torch.save(timm.create_model("test_vit").state_dict(), checkpoint)  # every actor loads these weights
    out = tmp_path / "embeddings"
    # workers import the tokenreduce under test, not another installed copy
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        embed_folder(str(image_folder), str(out), "test_vit", "tome", {"r": 8}, checkpoint=str(checkpoint), batch_size=2)
    finally:
        ray.shutdown()

    # any Parquet reader will do (embeddings are lists of floats): no second Ray job to start
    table = pq.read_table(out).to_pydict()
    rows = sorted(zip(table["path"], table["embedding"]), key=lambda row: Path(row[0]).name)
    paths = sorted(image_folder.glob("*.png"))
    assert [Path(path).name for path, _ in rows] == [p.name for p in paths]
    got = np.array([embedding for _, embedding in rows], dtype=np.float32)
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    direct = ImageEmbedder("test_vit", "tome", {"r": 8}, checkpoint=str(checkpoint))
    expected = direct.embed(pixels)
    assert tokenreduce.record(direct.model).tokens_per_layer[-1] < 101  # ToMe merged: 100 patches + CLS at 160 px
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    unreduced = ImageEmbedder("test_vit", None, checkpoint=str(checkpoint)).embed(pixels)
    assert not np.allclose(got, unreduced, atol=1e-3)  # the actors' models were patched


def test_missing_image_column_names_the_columns():
    embedder = ImageEmbedder("test_vit", "tome", {"r": 8}, image_column="img")
    with pytest.raises(KeyError, match=r"image_column 'img' is not in the batch; it has \['image', 'path'\]"):
        embedder({"image": np.zeros((1, 8, 8, 3), np.uint8), "path": np.array(["a.png"])})
