"""Ray Data, source rows -> Parquet shards + manifest: the work of the preprocess step (``steps/preprocess.py``).

Inputs:  ``data.source``, read by ``sources.py`` (an IDX folder, a folder of images, or Parquet).
Outputs: ``<out>/split=<train|val|test>/*.parquet`` with columns ``image`` (raw uint8 bytes of a
         (C, H, W) array: ``vaegan.imagerows``), ``label`` (int64, -1 when unknown) and ``key`` (int64, the
         row's stable id), and ``<out>/manifest.json`` (counts, image shape, fingerprint, per-channel statistics).

Rows stream through ``map_batches`` (decode, resize, channels, validate), so memory stays bounded by
Ray Data's streaming executor, not by the dataset's size. The split is a hash of each row's stable
key, so it does not depend on block layout or on the number of workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from vaegan.config import ModelConfig
from vaegan.imagerows import IMAGE_TYPES, decode_image, decode_rows, encode_rows

from .config import DataConfig
from .sources import (BLOCK_ROWS, PreprocessError, idx_keep, image_files, parquet_rows, path_keys, read_source,
                      source_format)

SPLITS = ("train", "val", "test")
MIN_SPLIT_ROWS = 4  # in val and test for tune, train and evaluate (see check_no_empty_split)


def split_counts(cfg: DataConfig) -> tuple[dict[str, int], bool]:
    """The rows each split will get and whether that is exact, from IDX headers, file names or Parquet
    footers alone: cheap enough for the driver to check a source before Ray starts. Exact for IDX and
    image folders, whose row keys are known up front; for Parquet, whose rows may be keyed by their
    content, the expected share. Raises what reading the source would."""
    fmt = source_format(cfg)
    if fmt == "idx":
        from vaegan import data as vdata  # torch and torchvision, so only where needed (see _fit)
        idx_dir, cache = cfg.find_idx(), Path(cfg.data_dir) / "idx-cache"
        train, test = (idx_keep(cfg, split, vdata.check_idx(idx_dir, split, cache)) for split in ("train", "test"))
        keys, is_test, exact = np.arange(train), np.zeros(train, bool), True
    elif fmt == "images":
        keys, is_test, test, exact = path_keys(cfg.source, image_files(cfg.source, cfg.limit)), None, 0, True
    else:
        rows = parquet_rows(cfg.source)
        rows = min(rows, cfg.limit) if cfg.limit else rows
        keys, is_test, test, exact = np.arange(rows), None, 0, False  # stand-in keys: the shares come out alike
    split = _split_of(keys, is_test, cfg)
    counts = {name: int((split == name).sum()) + (test if name == "test" else 0) for name in SPLITS}
    if exact:
        check_no_empty_split(counts, cfg)
    return counts, exact


def check_no_empty_split(counts: dict[str, int], cfg: DataConfig, minimum: int = 1) -> None:
    """Every split holds at least ``minimum`` rows: one for preprocess; MIN_SPLIT_ROWS for the steps that
    score val and test, whose precision/recall k-NN (k=3) needs more than k."""
    small = next((name for name in SPLITS if counts[name] < minimum), None)
    if small is not None:
        held = "is empty" if counts[small] == 0 else f"holds only {counts[small]} row{'s' * (counts[small] > 1)}"
        raise PreprocessError(f"split '{small}' {held} after preprocessing {cfg.source or 'Fashion-MNIST'} "
                              f"({sum(counts.values())} rows in all, data.limit={cfg.limit}); allowed: "
                              f"{f'at least {minimum} rows per split for training and evaluation: ' * (minimum > 1)}"
                              "more data (data.limit) or larger data.val_fraction / data.test_fraction")


# -- transforming ----------------------------------------------------------------------------------


def _decode(value: Any, where: str) -> np.ndarray:
    if isinstance(value, (bytes, bytearray)):
        try:
            return decode_image(value)
        except (OSError, ValueError) as err:
            raise PreprocessError(f"{where}: not a decodable image ({err}); allowed: {IMAGE_TYPES} image data") from err
    return np.asarray(value)


def _to_uint8(images: np.ndarray, places: list[str]) -> np.ndarray:
    """uint8 pixels; float sources in [0, 1] or [0, 255] are scaled, NaN/inf rejected."""
    if images.dtype == np.uint8:
        return images
    as_float = images.astype(np.float64)
    finite = np.isfinite(as_float).reshape(len(as_float), -1).all(axis=1)
    if not finite.all():
        raise PreprocessError(f"{places[int(np.argmin(finite))]}: image has NaN or infinite pixel values; allowed: "
                              "finite pixels, uint8 0..255 or floats in [0, 1] or [0, 255]")
    scale = 255.0 if as_float.max(initial=0) <= 1.0 else 1.0
    return np.clip(np.rint(as_float * scale), 0, 255).astype(np.uint8)


def _to_nchw(images: np.ndarray, places: list[str]) -> np.ndarray:
    """A stack of images (B, H, W), (B, H, W, C) or (B, C, H, W) as uint8 (B, C, H, W); ``places`` name
    the rows in messages."""
    if images.ndim == 3:
        images = images[:, None]  # (B, 1, H, W)
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)[:, :3]  # HWC -> CHW, alpha dropped
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise PreprocessError(f"{places[0]}: image of shape {images.shape[1:]}; allowed: (H, W), (H, W, C) or "
                              "(C, H, W) with 1 or 3 channels (or 4, alpha dropped)")
    return _to_uint8(images, places)


def _split_of(keys: np.ndarray, is_test: np.ndarray | None, cfg: DataConfig) -> np.ndarray:
    """Deterministic split from a hash of (seed, key): independent of block order and worker count."""
    u = np.array([zlib.crc32(f"{cfg.seed}:{k}".encode()) / 2**32 for k in keys])
    if is_test is not None:  # the source fixes the test part (IDX); val comes out of its train part
        return np.where(is_test, "test", np.where(u < cfg.val_fraction, "val", "train"))
    return np.where(u < cfg.test_fraction, "test", np.where(u < cfg.test_fraction + cfg.val_fraction, "val", "train"))


def _places(batch: dict[str, Any], source: str) -> list[str]:
    """How messages name each row: its file for an image folder, else the source and the row's key."""
    if "source_path" in batch:
        return [str(path) for path in batch["source_path"]]
    if "key" in batch:
        return [f"{source} (row key {key})" for key in batch["key"]]
    return [source] * len(batch["image"])


def _images_of(batch: dict[str, Any], size: int, channels: int, source: str) -> np.ndarray:
    """The batch's images as uint8 (B, C, size, size): one array op for uniform arrays; encoded or ragged rows
    are decoded one by one, then stacked by shape, so a folder of one image size also costs one op per batch."""
    column = batch["image"]
    places = _places(batch, source)
    out = np.empty((len(column), channels, size, size), np.uint8)
    if isinstance(column, np.ndarray) and column.dtype != object:
        out[:] = _fit(_to_nchw(column, places), size, channels)
        return out
    decoded = [_decode(value, place) for value, place in zip(column, places)]  # encoded bytes or ragged arrays
    by_shape: dict[tuple, list[int]] = {}
    for row, image in enumerate(decoded):
        by_shape.setdefault((image.shape, image.dtype.str), []).append(row)
    for rows in by_shape.values():
        group = _to_nchw(np.stack([decoded[row] for row in rows]), [places[row] for row in rows])
        out[rows] = _fit(group, size, channels)
    return out


def _fit(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (B, C, H, W) to uint8 (B, channels, size, size): channels converted, resized (bilinear, antialiased)
    and rounded. Images already that shape come back as they are, as the float round trip would be an identity.
    One call per group, not per row: on two torch threads one small ``round()`` took 4 to 8 ms here (torch 2.15)."""
    if images.shape[1:] == (channels, size, size):
        return images
    # Imported here, not at the top: torch and torchvision (through vaegan.data) take ~5 s to import, which every
    # Ray worker running this step would pay before its first batch, while images already of the model's shape
    # never need them.
    import torch

    from vaegan import data as vdata
    tensor = torch.from_numpy(np.array(images, copy=True))  # Arrow buffers are read-only
    fitted = vdata.resize_images(vdata.match_channels(tensor, channels).float(), size)
    return fitted.round().clamp(0, 255).to(torch.uint8).numpy()


def transform_batch(batch: dict[str, np.ndarray], data: dict, model: dict) -> dict[str, np.ndarray]:
    """Decode, convert channels, resize and validate; emits raw (C, H, W) uint8 bytes per row."""
    images = _images_of(batch, model["image_size"], model["channels"], data["source"] or "Fashion-MNIST")
    keys = np.asarray(batch["key"], np.int64) if "key" in batch else \
        np.array([zlib.crc32(img.tobytes()) for img in images], np.int64)  # content hash when the source has no ids
    labels = np.asarray(batch["label"], np.int64) if "label" in batch else np.full(len(images), -1, np.int64)
    return {"image": encode_rows(images), "label": labels, "key": keys,
            "split": _split_of(keys, batch.get("is_test"), DataConfig(**data))}


# -- the step --------------------------------------------------------------------------------------


def run(cfg: DataConfig, model: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Write the Parquet shards and manifest into ``out_dir`` (a temporary folder the caller renames)."""
    fmt = source_format(cfg)
    ds, classes = read_source(cfg, fmt)  # [1] read the source as a lazy Ray Dataset
    # A bad row then fails with its own PreprocessError naming the file: Ray's wrapper exception would keep
    # only its text once it crosses a process boundary.
    ds.context.raise_original_map_exception = True
    if fmt != "images":  # image-folder reads are bounded already (see sources.read_images)
        # Compressed sources can arrive as one block, which would make one task decode and buffer the whole
        # dataset before writing it; bounded blocks keep each task's memory independent of the dataset's size.
        ds = ds.repartition(target_num_rows_per_block=BLOCK_ROWS)
    else:
        # An image folder runs as one fused operator (read, decode, write), so Ray Data's per-operator
        # reservation has nothing to share out; it held half the CPUs back at the start, and turning it off
        # took the Data phase on 50,000 PNG files from 13.1 to 10.6 s on 2 cores (docs/benchmarks.md, section 3).
        ds.context.op_resource_reservation_enabled = False
    ds = ds.map_batches(transform_batch, batch_format="numpy", batch_size=1024,  # [2] decode/resize/validate
                        fn_kwargs={"data": dataclasses.asdict(cfg), "model": {"image_size": model.image_size,
                                                                    "channels": model.channels}})
    # [3] stream to Parquet, one folder per split
    ds.write_parquet(str(out_dir), partition_cols=["split"], max_rows_per_file=cfg.rows_per_file)
    manifest = build_manifest(out_dir, fmt, cfg, model, classes, parallel=True)  # [4] read back, per file
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def build_manifest(out_dir: Path, fmt: str, cfg: DataConfig, model: ModelConfig, classes: list[str],
                   parallel: bool = False) -> dict:
    """Counts, shape, fingerprint and per-channel statistics, read back file by file (bounded memory); with
    ``parallel``, one Ray task per file, so the read-back runs on every core, as the write did."""
    shape = [model.channels, model.image_size, model.image_size]
    files = {split: sorted((out_dir / f"split={split}").glob("*.parquet")) for split in SPLITS}
    if parallel:
        stats_of = ray.remote(_file_stats)
        refs = {split: [stats_of.remote(file, shape) for file in split_files] for split, split_files in files.items()}
        stats = {split: ray.get(split_refs) for split, split_refs in refs.items()}
    else:
        stats = {split: [_file_stats(file, shape) for file in split_files] for split, split_files in files.items()}
    counts, digests = {}, []
    total = np.zeros(model.channels, np.uint64)  # exact integer sums: no float copy of a whole file
    total_sq = np.zeros(model.channels, np.uint64)
    for split in SPLITS:
        counts[split] = sum(count for count, _, _, _ in stats[split])
        for _, file_total, file_total_sq, _ in stats[split]:
            total += file_total
            total_sq += file_total_sq
        row_hashes = [row for *_, file_rows in stats[split] for row in file_rows]
        digests.append(hashlib.sha256("\n".join(sorted(row_hashes)).encode()).hexdigest())
    check_no_empty_split(counts, cfg)
    n_pixels = sum(counts.values()) * model.image_size**2
    mean = total / 255.0 / n_pixels
    return {
        "format": fmt, "source": cfg.source or "fashion-mnist", "image_shape": shape, "counts": counts,
        "classes": classes, "fingerprint": hashlib.sha256("".join(digests).encode()).hexdigest()[:16],
        "channel_mean": mean.tolist(), "channel_std": np.sqrt(total_sq / 255.0**2 / n_pixels - mean**2).tolist(),
    }


def _file_stats(file: Path, shape: list[int]) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
    """One output file's rows, per-channel pixel sums and sums of squares (uint64), and "key:crc32" per row."""
    count, row_hashes = 0, []
    total, total_sq = np.zeros(shape[0], np.uint64), np.zeros(shape[0], np.uint64)
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024, columns=["image", "key"]):
        images = decode_rows(batch.column("image"), shape)
        count += len(images)
        total += images.sum(axis=(0, 2, 3), dtype=np.uint64)
        total_sq += np.square(images, dtype=np.uint32).sum(axis=(0, 2, 3), dtype=np.uint64)
        row_hashes += [f"{k}:{zlib.crc32(img.tobytes())}" for k, img in zip(batch.column("key").to_pylist(), images)]
    return count, total, total_sq, row_hashes

