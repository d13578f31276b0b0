"""Tests for vaegan.data: real Fashion-MNIST IDX files (Debian's dataset-fashion-mnist), broken copies
of them, procedural shapes, tensor helpers and the deterministic split."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from vaegan.data import (
    DEFAULT_IDX_DIRS,
    IDX_FILES,
    DatasetError,
    DatasetNotFoundError,
    find_idx_dir,
    load_idx,
    make_shapes,
    match_channels,
    resize_images,
    to_float,
)

FASHION = Path(DEFAULT_IDX_DIRS[0])
# Not skipped when absent: CI installs dataset-fashion-mnist, and a missing package must fail loudly.


def _copy_split(dst: Path, split: str = "test") -> tuple[Path, Path]:
    """Copy one split's two .gz files into ``dst``; return (images, labels) paths."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for name in IDX_FILES[split]:
        out.append(Path(shutil.copy(FASHION / f"{name}.gz", dst / f"{name}.gz")))
    return out[0], out[1]


def _raw_bytes(name: str) -> bytes:
    return gzip.decompress((FASHION / f"{name}.gz").read_bytes())


@pytest.fixture(scope="module")
def fashion_test():
    return load_idx(find_idx_dir(None, "unused-data-dir", allow_download=False), "test")


# ----------------------------------------------------------------------------- real Fashion-MNIST


def test_default_dir_is_found():
    assert find_idx_dir(None, "unused-data-dir", allow_download=False) == FASHION


def test_real_test_split(fashion_test):
    images, labels = fashion_test
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10  # Fashion-MNIST's test split is balanced
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert 60 < images.float().mean().item() < 90  # published mean pixel ~73
    assert images.max().item() == 255 and images.min().item() == 0


def test_real_train_split_loads_whole_and_caches(tmp_path):
    """The full 60k split, every class balanced (how fast it loads is benchmarks/preprocess.py's business)."""
    images, labels = load_idx(FASHION, "train", cache_dir=tmp_path)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10
    # A second load comes from the decompressed cache and gives the same tensors.
    cached = sorted(p.name for p in tmp_path.rglob("*-ubyte"))
    assert cached == sorted(IDX_FILES["train"])
    images2, labels2 = load_idx(FASHION, "train", cache_dir=tmp_path)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)


def test_uncompressed_files_load_the_same(tmp_path, fashion_test):
    for name in IDX_FILES["test"]:
        (tmp_path / name).write_bytes(_raw_bytes(name))
    images, labels = load_idx(tmp_path, "test")
    assert torch.equal(images, fashion_test[0]) and torch.equal(labels, fashion_test[1])


def test_data_dir_raw_layout_is_found(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in IDX_FILES:
        for name in IDX_FILES[split]:
            (raw / f"{name}.gz").symlink_to(FASHION / f"{name}.gz")
    assert find_idx_dir(None, tmp_path, search_dirs=(), allow_download=False) == raw


# ----------------------------------------------------------------------------- broken / missing files


def test_truncated_gz_names_the_file(tmp_path):
    images, _ = _copy_split(tmp_path)
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        load_idx(tmp_path, "test")
    assert str(images) in str(info.value)


def test_truncated_uncompressed_idx_names_the_file(tmp_path):
    _copy_split(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"  # the uncompressed file is preferred over the .gz
    labels.write_bytes(_raw_bytes(labels.name)[:5000])
    with pytest.raises(DatasetError, match="truncated") as info:
        load_idx(tmp_path, "test")
    assert str(labels) in str(info.value)
    labels.write_bytes(b"\x00\x00")  # not even a header
    with pytest.raises(DatasetError, match="truncated"):
        load_idx(tmp_path, "test")


def test_wrong_magic_names_the_file(tmp_path):
    images, labels = _copy_split(tmp_path)
    shutil.copy(labels, images)  # a label file where the images should be
    with pytest.raises(DatasetError, match="wrong magic number 0x00000801, expected 0x00000803") as info:
        load_idx(tmp_path, "test")
    assert str(images) in str(info.value)


def test_not_gzip_names_the_file(tmp_path):
    images, _ = _copy_split(tmp_path)
    images.write_bytes(b"this is not gzip data at all" * 10)
    with pytest.raises(DatasetError, match="cannot decompress") as info:
        load_idx(tmp_path, "test")
    assert str(images) in str(info.value)


def test_mismatched_counts(tmp_path):
    _copy_split(tmp_path)
    shutil.copy(FASHION / "train-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match="10000 images but .* 60000 labels"):
        load_idx(tmp_path, "test")


def test_missing_file_names_it(tmp_path):
    _, labels = _copy_split(tmp_path)
    labels.unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_idx(tmp_path, "test")
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_idx(FASHION, "validation")


def test_explicit_source_without_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        find_idx_dir(tmp_path, tmp_path / "data")
    assert "t10k-images-idx3-ubyte" in str(info.value)  # says what is missing
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        find_idx_dir(tmp_path / "nope", tmp_path / "data")
    _copy_split(tmp_path / "half")  # only the test split: still not a usable source
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        find_idx_dir(tmp_path / "half", tmp_path / "data")
    assert isinstance(info.value, FileNotFoundError)


def test_nothing_found_without_download(tmp_path, monkeypatch):
    """allow_download=False fails at once, without trying torchvision's download (which can hang offline)."""
    downloads = []
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", lambda *args, **kwargs: downloads.append(args))
    with pytest.raises(DatasetNotFoundError, match="download disabled") as info:
        find_idx_dir(None, tmp_path, search_dirs=(tmp_path / "empty",), allow_download=False)
    assert downloads == [] and not list(tmp_path.iterdir())  # nothing fetched, nothing written into data_dir
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message  # lists where it looked


@pytest.fixture
def silent_mirror(monkeypatch):
    """torchvision's Fashion-MNIST mirrors pointed at a server that accepts connections and never answers,
    and nothing found on this machine: the download is the only way left, and it must give up in time."""
    import socket

    import torchvision
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        silent = f"http://127.0.0.1:{server.getsockname()[1]}/"
        monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [silent])
        monkeypatch.setattr("vaegan.data.DEFAULT_IDX_DIRS", ())
        yield


def test_a_download_that_gets_no_answer_gives_up_naming_the_keys(tmp_path, silent_mirror):
    import socket

    from concurrent.futures import ThreadPoolExecutor

    from pipelines.config import DataConfig
    # It used to wait for as long as the server kept silent; the 60 s bound only keeps a regression from
    # hanging the suite (the TimeoutError in the message is what shows the 0.5 s timeout acted).
    with ThreadPoolExecutor(1) as pool:
        attempt = pool.submit(DataConfig(data_dir=str(tmp_path), download_timeout_s=0.5).find_idx)
        with pytest.raises(DatasetNotFoundError) as info:
            attempt.result(timeout=60)
    message = str(info.value)
    assert "\n" not in message and "TimeoutError" in message, message
    assert message.startswith("with config keys data.download=true, data.download_timeout_s=0.5: "), message
    assert socket.getdefaulttimeout() is None  # the process's default is restored
    with pytest.raises(DatasetNotFoundError, match=r"^with config keys data.download=false: .*download disabled"):
        DataConfig(data_dir=str(tmp_path), download=False).find_idx()


# ----------------------------------------------------------------------------- procedural shapes


@pytest.mark.parametrize("size", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_shape_and_content(size, channels):
    images, labels = make_shapes(30, size, channels, seed=1)
    assert images.shape == (30, channels, size, size) and images.dtype == torch.uint8
    assert labels.shape == (30,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=3).tolist() == [10, 10, 10]
    flat = images.reshape(30, -1).int()
    background = flat.min(dim=1).values
    assert (background < 40).all()  # dark background
    foreground = (images.int().amax(dim=1) > background[:, None, None] + 50).float().mean(dim=(1, 2))
    assert (foreground > 0.02).all() and (foreground < 0.6).all(), foreground


def test_shapes_match_their_labels():
    # A triangle fills at most half of its bounding box, a disc pi/4, a (rotated) square at least half.
    images, labels = make_shapes(60, 128, 3, seed=5)
    fg = images.int().amax(dim=1) > images.int().reshape(60, -1).min(dim=1).values[:, None, None] + 50
    fill = []
    for mask in fg:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill.append(mask.sum().item() / box.item())
    fill = torch.tensor(fill)
    assert ((fill[labels == 0] > 0.72) & (fill[labels == 0] < 0.85)).all()
    assert (fill[labels == 1] > 0.45).all()
    assert (fill[labels == 2] < 0.56).all()


def test_shapes_deterministic():
    a, la = make_shapes(20, 32, 3, seed=7)
    b, lb = make_shapes(20, 32, 3, seed=7)
    c, _ = make_shapes(20, 32, 3, seed=8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    grey = make_shapes(20, 32, 1, seed=7)[0]
    assert grey.shape[1] == 1 and len(torch.unique(grey)) > 2


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        make_shapes(4, 28, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(4, 4)


# ----------------------------------------------------------------------------- tensor helpers


def test_to_float_resize_match_channels(fashion_test):
    images = fashion_test[0][:16]
    x = to_float(images)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() == 1.0
    with pytest.raises(TypeError):
        to_float(x)
    big = resize_images(x, 64)
    assert big.shape == (16, 1, 64, 64) and big.min() >= 0 and big.max() <= 1
    assert resize_images(x, 28) is x
    rgb = match_channels(big, 3)
    assert rgb.shape == (16, 3, 64, 64) and torch.equal(rgb[:, 0], rgb[:, 2]) and rgb.is_contiguous()
    assert torch.allclose(match_channels(rgb, 1), big, atol=1e-3)  # luma weights sum to ~1
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert match_channels(red, 1).flatten()[0].item() == pytest.approx(0.299, abs=1e-3)  # ITU-R 601
    assert match_channels(x, 1) is x
