"""What the preprocess step reads (``shards.py`` turns it into Parquet): the source's format, files and signature,
and one lazy Ray Dataset reader per format.

  idx      an IDX folder (Fashion-MNIST/MNIST; "" finds Fashion-MNIST): numpy blocks, no decoding
  images   a folder of images (one sub-folder per class, or flat): paths in blocks, each task reads its own
  parquet  Parquet with an ``image`` column (encoded PNG/JPEG bytes or uint8 arrays) and an optional ``label``

Each reader yields rows with ``image``, and where the source has them ``label``, ``key`` and ``is_test``
(IDX) or ``source_path`` (image folders), for ``shards.transform_batch``.

Image folders and Parquet may also live on object storage (``data.source: s3://bucket/prefix``): they are
listed and read through the pyarrow filesystem ``store.filesystem`` gives, by the Ray tasks themselves, so
nothing is copied to the driver first. IDX files are local (a Debian package or a torchvision download).
"""
from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.extensions import ArrowTensorArray
from ray.exceptions import UserCodeException

from vaegan.errors import UserError
from vaegan.imagerows import IMAGE_TYPES, is_image_file

from . import store
from .config import DataConfig

BLOCK_ROWS = 2048


class PreprocessError(UserError, ValueError, UserCodeException):
    """Source data that cannot be turned into the configured images; names the file or row. A
    UserCodeException, so Ray Data reports it as a fault in the data, without its internal traceback."""

    def __str__(self) -> str:
        # Ray Data appends its retry advice to a failed task's exception, after a line break; ours is one line.
        return str(self.args[0]).partition("\n")[0] if self.args else ""


def detect_format(source: str) -> str:
    if not source:
        return "idx"
    fs, root = store.filesystem(source)
    if fs.get_file_info(root).type == pafs.FileType.File or listed_files(source, ".parquet"):
        return "parquet"
    if any("-idx3-ubyte" in info.base_name for info in fs.get_file_info(pafs.FileSelector(root))):
        return "idx"
    return "images"


def source_format(cfg: DataConfig) -> str:
    return detect_format(cfg.source) if cfg.format == "auto" else cfg.format


def source_files(cfg: DataConfig) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The files preprocess reads from the source, sorted, and their filesystem: the IDX files (and their .gz),
    an image folder's files (hidden and "_" names skipped, as Ray's listing does), or the Parquet file(s)."""
    fmt = source_format(cfg)
    if fmt == "idx":
        from vaegan import data as vdata
        root = cfg.find_idx(download=False)
        names = [name for pair in vdata.IDX_FILES.values() for name in pair]
        paths = sorted(str(p) for name in names for p in (root / name, root / f"{name}.gz") if p.is_file())
        return pafs.LocalFileSystem(), pafs.LocalFileSystem().get_file_info(paths)
    fs, root = store.filesystem(cfg.source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [info]
    return fs, listed_files(cfg.source, ".parquet" if fmt == "parquet" else "")


def listed_files(source: str, suffix: str = "") -> list[pafs.FileInfo]:
    """The files under the folder or prefix ``source`` whose names end in ``suffix``, sorted by path, skipping
    any path with a part starting with "." or "_", as Ray's file listing does."""
    fs, root = store.filesystem(source)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                   and not any(part.startswith((".", "_")) for part in relative(root, i.path).parts)),
                  key=lambda i: i.path)


def relative(root: str, path: str) -> PurePosixPath:
    """``path`` inside the folder or prefix ``root`` (both as the filesystem names them)."""
    return PurePosixPath(path).relative_to(root)


def source_signature(cfg: DataConfig, samples: int = 32, edge: int = 65536) -> dict[str, Any]:
    """What the source's content is, cheaply: every file's name, size and mtime, and a hash of the first and
    last ``edge`` bytes of ``samples`` files spread over the list (an edit that keeps size and mtime is seen
    in those). Reads well under a second for 70,000 local image files."""
    fs, files = source_files(cfg)
    stats, content = hashlib.sha256(), hashlib.sha256()
    for info in files:
        stats.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    picked = files if len(files) <= samples else [files[i * (len(files) - 1) // (samples - 1)] for i in range(samples)]
    for info in picked:
        with fs.open_input_file(info.path) as handle:
            content.update(handle.read(edge))
            if info.size > 2 * edge:
                handle.seek(info.size - edge)
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


def image_files(source: str, limit: int = 0) -> list[str]:
    """The image folder's (or prefix's) files in sorted order, as its filesystem names them, the first
    ``limit`` of them if > 0. Paths with a part starting with "." or "_" are skipped, as Ray's file listing
    skips such names; any other file that is no image is an error, so a stray file is never read as data nor
    silently left out."""
    _, root = store.filesystem(source)
    files = [info.path for info in listed_files(source)]
    allowed = f"allowed: {IMAGE_TYPES} files, flat or one sub-folder per class"
    other = next((p for p in files if not is_image_file(PurePosixPath(p))), None)
    if other is not None:
        raise PreprocessError(f"image folder {source} holds {str(relative(root, other))!r}, which is not an "
                              f"image file; {allowed}")
    if not files:
        raise PreprocessError(f"image folder {source} holds no image files; {allowed}")
    return files[:limit] if limit else files


def path_keys(source: str, files: list[str]) -> np.ndarray:
    """A row's stable id in an image folder: a hash of its path inside the folder."""
    _, root = store.filesystem(source)
    return np.array([zlib.crc32(str(relative(root, f)).encode()) for f in files], np.int64)


def image_classes(source: str) -> list[str]:
    """An image folder's class names: its sub-folders, sorted (a label is an index into them)."""
    fs, root = store.filesystem(source)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory)


def read_images(cfg: DataConfig) -> tuple[ray.data.Dataset, list[str]]:
    source = cfg.source  # absolute (pipeline.with_absolute_paths) or a URI: Ray's workers run elsewhere
    classes = image_classes(source)
    files = image_files(source, cfg.limit)
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
                          fn_kwargs={"source": source, "classes": classes}), classes


def read_image_files(batch: dict[str, np.ndarray], source: str, classes: list[str]) -> dict[str, Any]:
    """Rows of an image folder from a ``path`` column (paths under the folder or prefix ``source``, as its
    filesystem names them): the file's encoded bytes as ``image`` (decoded in transform_batch, so a corrupt
    file fails there with its name), its ``label`` (the index of its class folder in ``classes``, -1 for a
    file at the top), ``key`` and ``source_path``."""
    fs, root = store.filesystem(source)
    files = [str(p) for p in batch["path"]]
    index = {name: i for i, name in enumerate(classes)}
    rel = [relative(root, f) for f in files]
    labels = np.array([index.get(r.parts[0], -1) if len(r.parts) > 1 else -1 for r in rel], np.int64)
    names = [store.join(source, str(r)) if store.is_remote(source) else f for r, f in zip(rel, files)]
    return {"image": [_read_file(fs, f, name) for f, name in zip(files, names)], "label": labels,
            "key": path_keys(source, files), "source_path": np.array(names)}


def _read_file(fs: pafs.FileSystem, path: str, name: str) -> bytes:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as err:
        raise PreprocessError(f"{name}: cannot be read ({getattr(err, 'strerror', None) or err}); "
                              "allowed: readable image files") from err


def parquet_rows(source: str) -> int:
    """The Parquet source's row count, its schema checked, from the files' footers alone."""
    fs, root = store.filesystem(source) if source else (None, "")
    found = fs.get_file_info(root).type if fs is not None else pafs.FileType.NotFound
    if found == pafs.FileType.File:
        files = [root]
    else:
        files = [] if found == pafs.FileType.NotFound else [info.path for info in listed_files(source, ".parquet")]
    if not files:
        raise PreprocessError(f"Parquet source {source or '(none)'} holds no .parquet file; allowed: a Parquet file "
                              "or a folder holding .parquet files (data.format=parquet)")
    try:
        schema = pq.read_schema(files[0], filesystem=fs)
        rows = sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)
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
    fs, root = store.filesystem(cfg.source)
    ds = ray.data.read_parquet(root, filesystem=fs)  # each read task fetches its own files from where they live
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    return ds, []
