"""The Ray Data preprocess step on each kind of source, on a real local Ray."""
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from ray.data.dataset import MaterializedDataset

from pipelines import shards, sources
from pipelines.config import DataConfig
from vaegan.config import ModelConfig
from vaegan.data import SHAPE_NAMES, make_shapes
from vaegan.imagerows import read_split


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_with_class_subfolders_and_mixed_sizes(tmp_path):
    images, labels = make_shapes(90, 48, channels=3, seed=1)
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        folder = tmp_path / "src" / SHAPE_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(image.transpose(1, 2, 0))
        (pil if i % 2 else pil.resize((40, 40))).save(folder / f"{i}.png")  # two sizes in one folder
    cfg = DataConfig(source=str(tmp_path / "src"), val_fraction=0.2, test_fraction=0.2, rows_per_file=20)
    manifest = shards.run(cfg, ModelConfig(image_size=32, channels=3), tmp_path / "out")
    assert manifest["format"] == "images" and manifest["image_shape"] == [3, 32, 32]
    assert sum(manifest["counts"].values()) == 90 and min(manifest["counts"].values()) > 0
    assert manifest["classes"] == sorted(SHAPE_NAMES)
    train, train_labels = read_split(tmp_path / "out" / "split=train", [3, 32, 32])
    assert train.shape[1:] == (3, 32, 32) and set(train_labels.tolist()) == {0, 1, 2}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]


def test_parquet_of_encoded_images_to_grey_28px_is_deterministic(tmp_path):
    images, labels = make_shapes(60, 64, channels=3, seed=2)
    table = pa.table({"image": [png_bytes(img) for img in images.numpy()], "label": labels.numpy()})
    pq.write_table(table, tmp_path / "source.parquet")
    cfg = DataConfig(source=str(tmp_path / "source.parquet"), val_fraction=0.2, test_fraction=0.2)
    first = shards.run(cfg, ModelConfig(image_size=28, channels=1), tmp_path / "a")
    second = shards.run(cfg, ModelConfig(image_size=28, channels=1), tmp_path / "b")
    assert first["format"] == "parquet" and first["image_shape"] == [1, 28, 28]
    assert first["counts"] == second["counts"] and first["fingerprint"] == second["fingerprint"]
    assert 0 < first["channel_mean"][0] < 1 and first["channel_std"][0] > 0


def test_nan_pixels_name_the_row():
    images = np.zeros((3, 28, 28), np.float32)
    images[1, 5, 5] = np.inf
    batch = {"image": images, "key": np.array([10, 11, 12])}
    with pytest.raises(sources.PreprocessError, match=r"^src\.parquet \(row key 11\): image has NaN or infinite "
                       r"pixel values; allowed: finite pixels"):
        shards.transform_batch(batch, dataclasses.asdict(DataConfig(source="src.parquet")),
                                   {"image_size": 28, "channels": 1})


def test_an_empty_split_is_a_clear_error(tmp_path):
    cfg = DataConfig(limit=14, val_fraction=0.01)  # 12 train images: the val part comes out empty
    with pytest.raises(sources.PreprocessError, match="split 'val' is empty"):
        shards.run(cfg, ModelConfig(), tmp_path / "out")


def test_split_is_a_deterministic_hash_of_the_row_key():
    cfg = DataConfig(val_fraction=0.1, test_fraction=0.2, seed=3)
    keys = np.arange(20000)
    split = shards._split_of(keys, None, cfg)
    assert np.array_equal(split, shards._split_of(keys, None, cfg))
    assert abs((split == "test").mean() - 0.2) < 0.02 and abs((split == "val").mean() - 0.1) < 0.02
    shuffled = np.random.default_rng(0).permutation(keys)  # block order does not matter
    assert np.array_equal(shards._split_of(shuffled, None, cfg), split[shuffled])
    other_seed = shards._split_of(keys, None, DataConfig(val_fraction=0.1, test_fraction=0.2, seed=4))
    assert not np.array_equal(split, other_seed)
    fixed = shards._split_of(keys[:10], np.array([True] * 5 + [False] * 5), cfg)
    assert (fixed[:5] == "test").all() and "test" not in fixed[5:]  # a source's own test file is kept


def write_train_split(folder: Path, parts) -> Path:
    """``folder/split=train`` as the preprocess step writes it: one Parquet file of image rows per part."""
    from vaegan.imagerows import encode_rows
    split = folder / "split=train"
    split.mkdir()
    for i, part in enumerate(parts):
        pq.write_table(pa.table({"image": encode_rows(part), "label": np.zeros(len(part), np.int64)}),
                       split / f"part-{i}.parquet")
    return split


@pytest.mark.parametrize("limit", [0, 9])
def test_the_train_split_is_the_same_rows_held_in_memory_streamed_or_materialized(tmp_path, monkeypatch, limit):
    """pipelines.training's three ways to the Train workers: a small split held as one array (for the object
    store); a large one streamed from Parquet; a large one read up front when the workers hold every CPU."""
    from pipelines import training
    from pipelines.config import load_config
    from vaegan.imagerows import decode_rows
    images = np.random.default_rng(0).integers(0, 256, (12, 1, 4, 4), dtype=np.uint8)
    split = write_train_split(tmp_path, (images[:7], images[7:]))
    cfg = load_config("pipelines/configs/smoke.yaml")  # 1 worker of 1 CPU: this Ray's other CPU is free
    hogging = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=2))

    def rows(dataset) -> np.ndarray:
        return decode_rows([row["image"] for row in dataset.take_all()], (1, 4, 4))

    # Held rows keep the files' order, so a limit takes the first rows.
    assert np.array_equal(training.held_train_split(split, [1, 4, 4], limit), images[:limit or len(images)])
    monkeypatch.setattr(training, "IN_MEMORY_SPLIT_BYTES", (limit or len(images)) * 16 - 1)  # a byte too small
    assert training.held_train_split(split, [1, 4, 4], limit) is None
    streamed = training.streamed_train_split(cfg, split, limit)
    materialized = training.streamed_train_split(hogging, split, limit)
    assert [type(d) for d in (streamed, materialized)] == [ray.data.Dataset, MaterializedDataset]
    # Ray Data's streamed blocks arrive in no fixed order (preserve_order is off): a limit takes as many rows,
    # from any file.
    every = {image.tobytes() for image in images}
    for dataset in (streamed, materialized):
        got = [image.tobytes() for image in rows(dataset)]
        assert len(got) == len(set(got)) == (limit or len(images)) and set(got) <= every


def test_a_streamed_split_comes_in_a_new_order_every_epoch(tmp_path):
    """The streamed path (a train split too large to hold) shuffles every epoch, as the held one does: blocks
    in a new order per execution, rows mixed in each worker's buffer, seeded per epoch."""
    import torch

    from pipelines import training, worker
    from pipelines.config import load_config
    images = np.random.default_rng(1).integers(0, 256, (64, 1, 4, 4), dtype=np.uint8)
    split = write_train_split(tmp_path, np.split(images, 4))
    shard = training.streamed_train_split(load_config("pipelines/configs/smoke.yaml"), split).iterator()

    def epoch(seed: int) -> list[bytes]:
        batches = worker.streamed_epoch(shard, [1, 4, 4], 8, torch.device("cpu"), seed=seed)
        return [(row * 255).round().to(torch.uint8).numpy().tobytes() for batch in batches for row in batch]

    first, second = epoch(0), epoch(1)
    as_stored = [image.tobytes() for image in images]
    assert sorted(first) == sorted(second) == sorted(as_stored), "every row once per epoch"
    assert first != second and as_stored not in (first, second)
