"""What the preprocess step reads (``shards.py`` turns it into Parquet): the source's format, files and signature,
and one lazy Ray Dataset reader per format.

  idx      an IDX folder (Fashion-MNIST/MNIST; "" finds Fashion-MNIST): numpy blocks, no decoding
  images   a folder of images (one sub-folder per class, or flat): paths in blocks, each task reads its own
  parquet  Parquet with an ``image`` column (encoded PNG/JPEG bytes or uint8 arrays) and an optional ``label``

Each reader yields rows with ``image``, and where the source has them ``label``, ``key`` and ``is_test``
(IDX) or ``source_path`` (image folders), for ``shards.transform_batch``.
"""
from __future__ import annotations

import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.extensions import ArrowTensorArray
from ray.exceptions import UserCodeException

from vaegan.errors import UserError
from vaegan.imagerows import IMAGE_TYPES, is_image_file

from .config import DataConfig

BLOCK_ROWS = 2048


class PreprocessError(UserError, ValueError, UserCodeException):
    """Source data that cannot be turned into the configured images; names the file or row. A
    UserCodeException, so Ray Data reports it as a fault in the data, without its internal traceback."""

    def __str__(self) -> str:
        # Ray Data appends its retry advice to a failed task's exception, after a line break; ours is one line.
        return str(self.args[0]).partition("\n")[0] if self.args else ""


def detect_format(source: str) -> str:
    path = Path(source)
    if not source:
        return "idx"
    if path.is_file() or any(path.rglob("*.parquet")):
        return "parquet"
    if any(path.glob("*-idx3-ubyte*")):
        return "idx"
    return "images"


def source_format(cfg: DataConfig) -> str:
    return detect_format(cfg.source) if cfg.format == "auto" else cfg.format


def source_files(cfg: DataConfig) -> list[Path]:
    """The files preprocess reads from the source, sorted: the IDX files (and their .gz), an image folder's
    files (hidden and "_" names skipped, as Ray's listing does), or the Parquet file(s)."""
    fmt = source_format(cfg)
    if fmt == "idx":
        from vaegan import data as vdata
        root = cfg.find_idx(download=False)
        names = [name for pair in vdata.IDX_FILES.values() for name in pair]
        return sorted(p for name in names for p in (root / name, root / f"{name}.gz") if p.is_file())
    root = Path(cfg.source)
    if root.is_file():
        return [root]
    return listed_files(root, "*.parquet" if fmt == "parquet" else "*")


def listed_files(root: Path, pattern: str) -> list[Path]:
    """The files under ``root`` matching ``pattern``, sorted, skipping any path with a part starting with "."
    or "_", as Ray's file listing does."""
    return sorted(p for p in root.rglob(pattern)
                  if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def source_signature(cfg: DataConfig, samples: int = 32, edge: int = 65536) -> dict[str, Any]:
    """What the source's content is, cheaply: every file's name, size and mtime, and a hash of the first and
    last ``edge`` bytes of ``samples`` files spread over the list (an edit that keeps size and mtime is seen
    in those). Reads well under a second for 70,000 image files."""
    files = source_files(cfg)
    stats, content = hashlib.sha256(), hashlib.sha256()
    for path in files:
        info = path.stat()
        stats.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    picked = files if len(files) <= samples else [files[i * (len(files) - 1) // (samples - 1)] for i in range(samples)]
    for path in picked:
        with open(path, "rb") as handle:
            content.update(handle.read(edge))
            if path.stat().st_size > 2 * edge:
                handle.seek(-edge, os.SEEK_END)
                content.update(handle.read(edge))
    return {"files": len(files), "stats": stats.hexdigest()[:16], "sampled": content.hexdigest()[:16]}


def read_source(cfg: DataConfig, fmt: str) -> tuple[ray.data.Dataset, list[str]]:
    """The source, of format ``fmt`` (``source_format``), as a lazy Ray Dataset, and its class names."""
    return {"idx": read_idx, "images": read_images, "parquet": read_parquet}[fmt](cfg)


def idx_blocks(cfg: DataConfig) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """The IDX source as 5000-row blocks of numpy columns: ``image`` uint8 (B, 1, H, W), ``label``,
    ``key`` and ``is_test``; and the class names. Plain numpy, so a benchmark can run it without Ray."""
    from vaegan import data as vdata
    idx_dir = cfg.find_idx()
    blocks = []
    for split, offset in (("train", 0), ("test", 10**9)):  # offsets keep the two files' keys apart
        images, labels = vdata.load_idx(idx_dir, split, cache_dir=Path(cfg.data_dir) / "idx-cache")
        keep = idx_keep(cfg, split, len(labels))
        images, labels = images[:keep], labels[:keep]
        keys = np.arange(keep, dtype=np.int64) + offset
        for start in range(0, len(keys), 5000):  # several blocks, so map_batches can run in parallel
            rows = slice(start, start + 5000)
            blocks.append({"image": images[rows].numpy(), "label": labels[rows].numpy(), "key": keys[rows],
                           "is_test": np.full(len(keys[rows]), split == "test")})
    return blocks, [str(c) for c in range(10)]


def idx_keep(cfg: DataConfig, split: str, rows: int) -> int:
    """Rows kept of an IDX split: all, or data.limit's share in the source's train:test proportion
    (6:1 for Fashion-MNIST)."""
    if not cfg.limit:
        return rows
    train = round(cfg.limit * 6 / 7)
    return min(rows, train if split == "train" else cfg.limit - train)


def read_idx(cfg: DataConfig) -> tuple[ray.data.Dataset, list[str]]:
    blocks, classes = idx_blocks(cfg)
    tables = [pa.table({**block, "image": ArrowTensorArray.from_numpy(block["image"])}) for block in blocks]
    return ray.data.from_arrow(tables), classes


def image_files(root: Path, limit: int = 0) -> list[Path]:
    """The image folder's files in sorted order, the first ``limit`` of them if > 0. Paths with a part
    starting with "." or "_" are skipped, as Ray's file listing skips such names; any other file that is
    no image is an error, so a stray file is never read as data nor silently left out."""
    files = listed_files(root, "*")
    allowed = f"allowed: {IMAGE_TYPES} files, flat or one sub-folder per class"
    other = next((p for p in files if not is_image_file(p)), None)
    if other is not None:
        raise PreprocessError(f"image folder {root} holds {str(other.relative_to(root))!r}, which is not an "
                              f"image file; {allowed}")
    if not files:
        raise PreprocessError(f"image folder {root} holds no image files; {allowed}")
    return files[:limit] if limit else files


def path_keys(root: Path, files: list[Path]) -> np.ndarray:
    """A row's stable id in an image folder: a hash of its path inside the folder."""
    return np.array([zlib.crc32(str(f.relative_to(root)).encode()) for f in files], np.int64)


def image_classes(root: Path) -> list[str]:
    """An image folder's class names: its sub-folders, sorted (a label is an index into them)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def read_images(cfg: DataConfig) -> tuple[ray.data.Dataset, list[str]]:
    root = Path(cfg.source).resolve()  # absolute paths: Ray's workers need not share the driver's directory
    classes = image_classes(root)
    files = [str(f) for f in image_files(root, cfg.limit)]
    # Only the paths go into the dataset, in blocks of at most BLOCK_ROWS, a multiple of the cluster's CPUs of
    # them (the last round keeps every core busy). Each task then reads, decodes and writes its own block (Ray
    # fuses the chain into one task): every core decodes, no encoded bytes cross the object store, and a task's
    # memory is bounded without a repartition. Ray's read_binary_files took 0.6 ms a file here, 25x a plain
    # read, and ran as its own operator, beside the decode, on a core of its own.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1
    blocks = math.ceil(math.ceil(len(files) / BLOCK_ROWS) / cpus) * cpus
    step = math.ceil(len(files) / blocks)
    ds = ray.data.from_arrow([pa.table({"path": files[i:i + step]}) for i in range(0, len(files), step)])
    return ds.map_batches(read_image_files, batch_format="numpy",
                          fn_kwargs={"root": str(root), "classes": classes}), classes


def read_image_files(batch: dict[str, np.ndarray], root: str, classes: list[str]) -> dict[str, Any]:
    """Rows of an image folder from a ``path`` column (paths under ``root``): the file's encoded bytes as
    ``image`` (decoded in transform_batch, so a corrupt file fails there with its name), its ``label`` (the
    index of its class folder in ``classes``, -1 for a file at the top), ``key`` and ``source_path``."""
    files = [Path(p) for p in batch["path"]]
    index = {name: i for i, name in enumerate(classes)}
    rel = [f.relative_to(root) for f in files]
    labels = np.array([index.get(r.parts[0], -1) if len(r.parts) > 1 else -1 for r in rel], np.int64)
    return {"image": [_read_file(f) for f in files], "label": labels, "key": path_keys(Path(root), files),
            "source_path": np.array([str(f) for f in files])}


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PreprocessError(f"{path}: cannot be read ({err.strerror or err}); allowed: readable image files") from err


def parquet_rows(source: str) -> int:
    """The Parquet source's row count, its schema checked, from the files' footers alone."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise PreprocessError(f"Parquet source {source or '(none)'} holds no .parquet file; allowed: a Parquet file "
                              "or a folder holding .parquet files (data.format=parquet)")
    try:
        schema, rows = pq.read_schema(files[0]), sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (OSError, pa.ArrowException) as err:
        raise PreprocessError(f"Parquet source {source} cannot be read: {err}; allowed: a Parquet file or folder "
                              "(data.format=parquet), an IDX folder or an image folder") from err
    image, label = (schema.field(name).type if name in schema.names else None for name in ("image", "label"))
    image_ok = image is not None and (isinstance(image, pa.ExtensionType) or pa.types.is_binary(image)
                                      or pa.types.is_large_binary(image) or pa.types.is_list(image)
                                      or pa.types.is_large_list(image) or pa.types.is_fixed_size_list(image))
    if not image_ok or not (label is None or pa.types.is_integer(label)):
        columns = ", ".join(f"{field.name}: {field.type}" for field in schema)
        raise PreprocessError(f"Parquet source {source} has columns ({columns}); allowed: an 'image' column of "
                              "encoded PNG/JPEG bytes or uint8 arrays, and optionally an integer 'label' column")
    if rows == 0:
        raise PreprocessError(f"Parquet source {source} holds no rows; allowed: at least one image per split")
    return rows


def read_parquet(cfg: DataConfig) -> tuple[ray.data.Dataset, list[str]]:
    parquet_rows(cfg.source)
    ds = ray.data.read_parquet(cfg.source)
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds, []
