"""Datasets for the VAE-GAN: IDX files (Fashion-MNIST, MNIST), procedural coloured shapes,
and small tensor helpers used by the preprocessing step.

Plain torch / torchvision / numpy only, so it can run inside any worker process.

IDX parsing is torchvision's (``torchvision.datasets.mnist.read_image_file`` /
``read_label_file``). Those functions only read *uncompressed* files (their docstring says
"compressed filename" but they call plain ``open``), check the header with ``assert`` (gone
under ``python -O``) and raise bare ``AssertionError`` / ``RuntimeError`` / ``ValueError`` on
bad input. So :func:`load_idx` decompresses ``.gz`` files with torchvision's
``extract_archive``, checks the header itself first and wraps anything torchvision raises into
:class:`DatasetError` naming the file.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import socket
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import torch

# torchvision is imported inside the functions that use it: importing it costs 3.5 s on a 2-core box (its
# package imports torch._dynamo), and every Ray worker that trains imports this module for ``to_float``.
# torch too (2.3 s): the pipeline's driver finds and checks IDX files (find_idx_dir, check_idx), which
# needs numpy alone.

DEFAULT_IDX_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

# Same names for MNIST and Fashion-MNIST; each may also be present with a ".gz" suffix.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic: 0x00 0x00 <type 0x08 = uint8> <number of dimensions>.
_IMAGE_MAGIC = 0x00000803
_LABEL_MAGIC = 0x00000801

_HOW_TO_GET = (
    "To get Fashion-MNIST: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs "
    "the files in /usr/share/datasets/fashion-mnist), or pass a folder holding the four IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, each optionally .gz) as the source, or allow the torchvision "
    "download (needs internet access)."
)


class DatasetError(UserError, ValueError):
    """A dataset file exists but cannot be used (truncated, corrupt, wrong format); names the file."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset files are nowhere to be found; the message says how to get them."""


# ----------------------------------------------------------------------------- IDX files


def _idx_file(idx_dir: Path, name: str) -> Path | None:
    """The uncompressed file if present, else the .gz, else None."""
    for candidate in (idx_dir / name, idx_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(idx_dir: Path) -> list[str]:
    return [name for pair in IDX_FILES.values() for name in pair if _idx_file(idx_dir, name) is None]


def find_idx_dir(
    source: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    *,
    search_dirs: Sequence[str | os.PathLike] = DEFAULT_IDX_DIRS,
    allow_download: bool = True,
    download_timeout_s: float | None = None,
) -> Path:
    """Return a directory holding the four Fashion-MNIST/MNIST IDX files (gzipped or not).

    ``source`` is an explicit directory: it is used as is, or :class:`DatasetNotFoundError` is
    raised listing what it lacks (no fallback, so a typo never silently trains on other data).
    With ``source=None`` the ``search_dirs`` (default :data:`DEFAULT_IDX_DIRS`) are tried, then
    ``<data_dir>/FashionMNIST/raw``, then - if ``allow_download`` - torchvision's download into
    ``data_dir``. torchvision's ``urlopen`` has no timeout: offline with DNS failing it errors in
    about a second, but on a network that silently drops packets it can hang, hence the switch and
    ``download_timeout_s``, the longest the download waits on one connection or read.
    """
    if source is not None:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise DatasetNotFoundError(f"IDX source directory {src} does not exist. {_HOW_TO_GET}")
        missing = _missing_files(src)
        if missing:
            raise DatasetNotFoundError(
                f"IDX source directory {src} lacks {', '.join(missing)} (nor .gz). {_HOW_TO_GET}")
        return src

    raw_dir = Path(data_dir).expanduser() / "FashionMNIST" / "raw"
    candidates = [Path(d) for d in search_dirs] + [raw_dir]
    for candidate in candidates:
        if candidate.is_dir() and not _missing_files(candidate):
            return candidate

    tried = ", ".join(str(c) for c in candidates)
    if not allow_download:
        raise DatasetNotFoundError(f"Fashion-MNIST not found in {tried}; download disabled. {_HOW_TO_GET}")
    previous = socket.getdefaulttimeout()
    # torchvision passes no timeout to urlopen, whose sockets then take the process's default one.
    socket.setdefaulttimeout(download_timeout_s)
    try:
        import torchvision
        torchvision.datasets.FashionMNIST(str(Path(data_dir).expanduser()), train=True, download=True)
    except Exception as exc:  # offline: RuntimeError wrapping URLError; silent: TimeoutError; disk full: OSError
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {tried}, and the torchvision download failed "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}). {_HOW_TO_GET}") from exc
    finally:
        socket.setdefaulttimeout(previous)
    if _missing_files(raw_dir):
        raise DatasetNotFoundError(
            f"torchvision's download finished but {raw_dir} lacks {', '.join(_missing_files(raw_dir))}. {_HOW_TO_GET}")
    return raw_dir


def _decompressed(path: Path, cache_dir: Path | None, scratch: Path) -> Path:
    """Path of an uncompressed copy of ``path`` (itself when it is not .gz).

    With ``cache_dir`` the copy is kept under a key of the source's path, size and mtime, and
    written to a temporary name then renamed, so concurrent workers never see half a file.
    """
    if path.suffix != ".gz":
        return path
    if cache_dir is None:
        target_dir = scratch
    else:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target_dir = Path(cache_dir) / key
        cached = target_dir / path.stem
        if cached.is_file():
            return cached
        target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".extract-") as tmp:
        try:
            from torchvision.datasets.utils import extract_archive
            extracted = Path(extract_archive(path, tmp))
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DatasetError(
                f"{path}: cannot decompress ({type(exc).__name__}: {exc}); the file is truncated or "
                f"corrupt - fetch it again") from exc
        final = target_dir / path.stem
        os.replace(extracted, final)
    return final


def _check_header(path: Path, shown: Path, magic: int, what: str) -> int:
    """Check an uncompressed IDX header and the file length; return the item count.

    ``shown`` is the path named in messages (the .gz the user knows, not the cache copy).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise DatasetError(f"{shown}: truncated IDX {what} file ({size} bytes, not even a header)")
        got = int.from_bytes(head, "big")
        if got != magic:
            raise DatasetError(
                f"{shown}: wrong magic number 0x{got:08x}, expected 0x{magic:08x} for an IDX {what} file "
                f"(uint8, {magic & 0xFF} dimension(s)); is this the right file?")
        ndim = magic & 0xFF
        dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DatasetError(f"{shown}: truncated IDX {what} file ({size} bytes, header incomplete)")
    dims = [int.from_bytes(dims_raw[4 * i: 4 * i + 4], "big") for i in range(ndim)]
    expected = 4 * (ndim + 1) + int(np.prod(dims))
    if size != expected:
        state = "truncated" if size < expected else "has trailing data"
        raise DatasetError(
            f"{shown}: {state}: header says shape {tuple(dims)} = {expected} bytes, file has {size} bytes")
    return dims[0]


def _read(shown: Path, raw: Path, what: str) -> torch.Tensor:
    from torchvision.datasets.mnist import read_image_file, read_label_file
    reader = read_image_file if what == "images" else read_label_file
    try:
        return reader(str(raw))
    except (AssertionError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise DatasetError(f"{shown}: not a valid IDX {what} file ({type(exc).__name__}: {exc})") from exc


def _checked_split(idx_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None,
                   scratch: Path) -> tuple[list[tuple[Path, Path]], int]:
    """One split's images and labels files, each as (the file named, its uncompressed copy), and the
    item count; each header and length checked, and the two counts against each other."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be one of {sorted(IDX_FILES)}, got {split!r}")
    idx_dir = Path(idx_dir).expanduser()
    cache = None if cache_dir is None else Path(cache_dir).expanduser()
    files, counts = [], []
    for name, magic, what in zip(IDX_FILES[split], (_IMAGE_MAGIC, _LABEL_MAGIC), ("images", "labels")):
        path = _idx_file(idx_dir, name)
        if path is None:
            raise DatasetNotFoundError(f"missing IDX file {idx_dir / name} (nor {name}.gz). {_HOW_TO_GET}")
        files.append((path, _decompressed(path, cache, scratch)))
        counts.append(_check_header(files[-1][1], path, magic, what))
    if counts[0] != counts[1]:
        raise DatasetError(f"{files[0][0]} has {counts[0]} images but {files[1][0]} has {counts[1]} labels; "
                           "allowed: one label per image")
    return files, counts[0]


def check_idx(idx_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> int:
    """The number of images in one split of an IDX dataset, from the headers alone; raises what
    :func:`load_idx` would for a missing, truncated or corrupt file, without parsing the pixels."""
    with tempfile.TemporaryDirectory(prefix="vaegan-idx-") as scratch:
        return _checked_split(idx_dir, split, cache_dir, Path(scratch))[1]


def load_idx(
    idx_dir: str | os.PathLike,
    split: str,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of an IDX dataset: ``(images uint8 (N, 1, H, W), labels int64 (N,))``.

    ``split`` is "train" or "test". ``.gz`` files are decompressed into ``cache_dir`` (reused
    next time) or, without one, into a temporary directory removed afterwards. Raises
    :class:`DatasetNotFoundError` for a missing file and :class:`DatasetError` for a truncated
    or corrupt file, a wrong magic number or mismatched image/label counts - each naming the file.
    """
    with tempfile.TemporaryDirectory(prefix="vaegan-idx-") as scratch:
        (image_file, label_file), _ = _checked_split(idx_dir, split, cache_dir, Path(scratch))
        images = _read(*image_file, "images")
        labels = _read(*label_file, "labels")
    return images.unsqueeze(1), labels


# ----------------------------------------------------------------------------- procedural shapes

SHAPE_NAMES = ("circle", "square", "triangle")


def make_shapes(n: int, image_size: int, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images, one filled shape each, on a dark background: ``(uint8 (n, C, S, S), int64 (n,))``.

    Labels index :data:`SHAPE_NAMES` (0 circle, 1 square, 2 triangle) and are balanced to within
    one. Position, size, rotation (squares, triangles) and colour are random - a random grey level
    for ``channels=1`` - and everything is a function of ``seed`` alone (numpy's PCG64).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_NAMES))
    s = image_size
    radius = rng.uniform(0.18, 0.38, n) * s  # every vertex lies within this of the centre, so shapes stay inside
    cx = rng.uniform(radius, s - radius)
    cy = rng.uniform(radius, s - radius)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    if channels == 3:
        colour = rng.integers(40, 256, (n, 3))
        colour[np.arange(n), rng.integers(0, 3, n)] = rng.integers(160, 256, n)  # keep it bright
    else:
        colour = rng.integers(110, 256, (n, 1))
    background = rng.integers(0, 40, n)

    out = np.empty((n, channels, s, s), dtype=np.uint8)
    centres = np.arange(s, dtype=np.float32) + 0.5
    chunk = max(1, 2**22 // (s * s))  # bounds the float temporaries to a few tens of MB
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = centres[None, None, :] - cx[a:b, None, None].astype(np.float32)
        y = centres[None, :, None] - cy[a:b, None, None].astype(np.float32)
        r = radius[a:b, None, None].astype(np.float32)
        cos = np.cos(angle[a:b, None, None]).astype(np.float32)
        sin = np.sin(angle[a:b, None, None]).astype(np.float32)
        xr, yr = x * cos + y * sin, y * cos - x * sin
        circle = x * x + y * y <= r * r
        square = (np.abs(xr) <= 0.7 * r) & (np.abs(yr) <= 0.7 * r)  # corners at 0.99 r
        triangle = (yr >= -r) & (yr <= 0.6 * r) & (np.abs(xr) <= (yr + r) * 0.5)  # vertices at 1.0 r
        lab = labels[a:b, None, None]
        mask = np.where(lab == 0, circle, np.where(lab == 1, square, triangle))
        out[a:b] = np.where(mask[:, None], colour[a:b, :, None, None], background[a:b, None, None, None])
    import torch
    return torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- tensor helpers


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]. Refuses other dtypes so nothing is scaled twice."""
    import torch
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images to ``size`` x ``size`` (bilinear, antialiased); no-op if already that size."""
    if images.ndim != 4:
        raise ValueError(f"resize_images expects (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF
    return TF.resize(images, [size, size], antialias=True)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert ``(N, C, H, W)`` images to ``channels`` (1 or 3): grey -> RGB by repeating,
    RGB -> grey with the ITU-R 601 luma weights (torchvision's ``rgb_to_grayscale``; keeps the dtype)."""
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)  # a real copy, not torchvision's stride-0 expand
    if have == 3 and channels == 1:
        from torchvision.transforms.v2 import functional as TF
        return TF.rgb_to_grayscale(images, num_output_channels=1)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")
