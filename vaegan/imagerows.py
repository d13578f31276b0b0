"""Images as the pipeline stores them and as users hand them in: the one codec for Parquet image rows and for
image files, and the one list of image file types accepted anywhere.

A Parquet image row, as preprocess writes it and training, evaluation and the pull verbs read it, holds one
image as the raw bytes of a uint8 (C, H, W) array: C*H*W bytes, no header (the shape is the model's, kept in the
split's ``manifest.json``). No Ray tensor extension, so any Parquet reader can open the splits.

Image files (and encoded image bytes in a Parquet source) are decoded by Pillow; IMAGE_EXTENSIONS are the file
endings that count as images, in preprocess's image folders and in the pull verbs' inputs alike.

Only numpy is imported here: Pillow, torch and pyarrow are imported by the functions that use them, so a Ray Data
worker that only moves bytes never pays torch's import (seconds).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")
IMAGE_TYPES = ", ".join(IMAGE_EXTENSIONS)  # how messages list them


def is_image_file(path: Path) -> bool:
    """Whether ``path``'s ending (any case) is one of IMAGE_EXTENSIONS."""
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def decode_image(source: bytes | bytearray | Path, mode: str | None = None) -> np.ndarray:
    """An encoded image, as bytes or a file, as uint8 (H, W) or (H, W, C).

    ``mode`` "L" or "RGB" converts to it; None keeps L and RGB images as they are and converts any other mode
    (palette, alpha, 16-bit, 1-bit) to RGB. Transparent pixels (RGBA, LA, PA, a palette's transparency) are
    composited on white first, as a viewer shows them, not dropped to the colour they happen to hold.
    Raises OSError (``UnidentifiedImageError`` for bytes that are no image, truncation) or ValueError (also
    for an image over Pillow's decompression-bomb limit, whose own error is neither).
    """
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{err} (Pillow's Image.MAX_IMAGE_PIXELS)") from err
    with img:
        if img.mode in ("L", "RGB") and mode in (None, img.mode):
            return np.asarray(img)  # as it is: convert() to the same mode would copy every pixel once more
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(img.convert(mode or "RGB"))


def encode_rows(images: np.ndarray) -> np.ndarray:
    """uint8 (B, C, H, W) images -> (B,) object array of Parquet image rows, C*H*W raw bytes each."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image rows hold uint8 (B, C, H, W) images, got {images.dtype} {images.shape}")
    return np.array([image.tobytes() for image in images], dtype=object)


def _joined(rows: Any) -> bytes:
    """The rows' bytes end to end; ``rows`` is a sequence of bytes-like values or a pyarrow (Chunked)Array."""
    if hasattr(rows, "to_pylist"):  # pyarrow
        rows = rows.to_pylist()
    return b"".join(rows)


def decode_rows(rows: Any, shape: Sequence[int]) -> np.ndarray:
    """Parquet image rows -> uint8 (N, C, H, W) with ``shape`` = (C, H, W); a read-only view of the joined
    bytes (copy it before writing). ``rows``: bytes-like values, or a pyarrow column of them."""
    return np.frombuffer(_joined(rows), np.uint8).reshape(-1, *shape)


def decode_rows_float(rows: Any, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Parquet image rows -> float32 (N, C, H, W) in [0, 1] on ``device``. The uint8 pixels cross to the device
    and become floats there: a quarter of the bytes to copy."""
    import torch
    images = torch.from_numpy(np.frombuffer(bytearray(_joined(rows)), np.uint8).reshape(-1, *shape))  # writable
    return images.to(device, non_blocking=True).float().div_(255.0)


def first_bad_row(rows: Sequence[bytes], shape: Sequence[int]) -> int | None:
    """The index of the first row that is not one image of ``shape`` (C, H, W) (a null row is none), or None
    when all are."""
    size = int(np.prod(shape))
    return next((i for i, row in enumerate(rows) if row is None or len(row) != size), None)


def read_split(split_dir: Path, shape: Sequence[int], limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A split folder of the pipeline's Parquet files as in-memory arrays, uint8 (N, C, H, W) and int64 labels
    (N,), for evaluation-sized reads; ``limit`` > 0 keeps the first that many rows."""
    import pyarrow.parquet as pq
    images, labels, n = [], [], 0
    for file in sorted(split_dir.glob("*.parquet")):
        table = pq.read_table(file, columns=["image", "label"])
        images.append(decode_rows(table.column("image"), shape))
        labels.append(table.column("label").to_numpy())
        n += len(labels[-1])
        if limit and n >= limit:
            break
    images_arr, labels_arr = np.concatenate(images), np.concatenate(labels)
    return (images_arr[:limit], labels_arr[:limit]) if limit else (images_arr, labels_arr)
