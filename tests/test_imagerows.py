"""The one codec for Parquet image rows and image files (vaegan/imagerows.py), and the one user-error base."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vaegan import imagerows

REPO = Path(__file__).resolve().parents[1]


def test_rows_round_trip_as_uint8_and_as_floats_in_unit_range():
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 6), np.uint8)
    rows = imagerows.encode_rows(images)
    assert rows.dtype == object and all(len(row) == 3 * 4 * 6 for row in rows)
    np.testing.assert_array_equal(imagerows.decode_rows(rows, (3, 4, 6)), images)
    # a pyarrow column decodes alike: Parquet files are read back as such
    column = pq.read_table(pa.BufferReader(_parquet_bytes(rows))).column("image")
    np.testing.assert_array_equal(imagerows.decode_rows(column, (3, 4, 6)), images)
    floats = imagerows.decode_rows_float(rows, (3, 4, 6))
    assert floats.dtype == torch.float32 and floats.shape == (5, 3, 4, 6)
    assert torch.equal(floats, torch.from_numpy(images.astype(np.float32) / 255))
    assert imagerows.decode_rows_float([], (1, 2, 2)).shape == (0, 1, 2, 2)
    assert imagerows.first_bad_row(rows, (3, 4, 6)) is None
    assert imagerows.first_bad_row([*rows, b"\x00" * 7], (3, 4, 6)) == 5
    with pytest.raises(ValueError, match="uint8"):
        imagerows.encode_rows(images.astype(np.float32))


def _parquet_bytes(rows: np.ndarray) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": list(rows)}), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("suffix", ["png", "webp", "TIF"])
def test_image_files_of_every_listed_type_decode(tmp_path, suffix):
    assert suffix.lower() in imagerows.IMAGE_EXTENSIONS and imagerows.is_image_file(tmp_path / f"a.{suffix}")
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    path = tmp_path / f"a.{suffix}"
    Image.fromarray(pixels).save(path, **({"lossless": True} if suffix == "webp" else {}))
    np.testing.assert_array_equal(imagerows.decode_image(path), pixels)
    np.testing.assert_array_equal(imagerows.decode_image(path.read_bytes()), pixels)
    assert imagerows.decode_image(path, "L").shape == (4, 4)
    assert not imagerows.is_image_file(tmp_path / "notes.txt")


def test_palette_and_alpha_images_come_back_as_rgb(tmp_path):
    Image.new("RGBA", (3, 2), (10, 20, 30, 40)).save(tmp_path / "alpha.png")
    Image.new("P", (3, 2), 7).save(tmp_path / "palette.gif")
    for name in ("alpha.png", "palette.gif"):
        assert imagerows.decode_image(tmp_path / name).shape == (2, 3, 3)
    with pytest.raises(OSError):
        imagerows.decode_image(b"not an image")


def test_cli_import_stays_light_and_every_user_error_shares_the_base():
    code = ("import sys, pipelines.cli; heavy = [m for m in ('torch', 'mlflow', 'ray', 'PIL') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    from deploy.pull import PullError
    from pipelines.sources import PreprocessError
    from pipelines.tracking import TrackingError
    from vaegan.checkpoint import CheckpointError
    from vaegan.config import ConfigError
    from vaegan.data import DatasetError, DatasetNotFoundError
    from vaegan.errors import UserError
    from vaegan.guard import NonFiniteLossError
    errors = (ConfigError, DatasetError, DatasetNotFoundError, CheckpointError, NonFiniteLossError, PullError,
              TrackingError, PreprocessError)
    assert all(issubclass(error, UserError) for error in errors)
    assert issubclass(ConfigError, ValueError) and issubclass(DatasetNotFoundError, FileNotFoundError)


def test_serving_code_does_not_load_the_trainer():
    """Checkpoints and inference are what serving imports; the train step (and its guard) stay out."""
    code = ("import sys, vaegan.checkpoint, vaegan.inference; "
            "loaded = [m for m in ('vaegan.step', 'vaegan.guard', 'vaegan.loop') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("mode, pixel", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0)), ("RGBA", (200, 0, 0, 128))],
                         ids=["rgba-clear", "la-clear", "rgba-half"])
def test_transparent_pixels_are_composited_on_white(tmp_path, mode, pixel):
    """A transparent pixel reads as white (as a viewer shows it), not as the colour it holds (black here);
    a half-transparent one as its mix with white. Files and encoded bytes alike, in L and RGB."""
    path = tmp_path / "alpha.png"
    Image.new(mode, (2, 2), pixel).save(path)
    alpha = pixel[-1] / 255
    expected = [round(c * alpha + 255 * (1 - alpha)) for c in (pixel[:3] if mode == "RGBA" else pixel[:1] * 3)]
    for source in (path, path.read_bytes()):
        rgb = imagerows.decode_image(source, "RGB")
        assert rgb.shape == (2, 2, 3)
        np.testing.assert_allclose(rgb[0, 0], expected, atol=1)
        np.testing.assert_allclose(imagerows.decode_image(source)[0, 0], expected, atol=1)
        grey = imagerows.decode_image(source, "L")
        assert grey.shape == (2, 2) and abs(int(grey[0, 0]) - round(np.dot(expected, [0.299, 0.587, 0.114]))) <= 1


def test_an_image_over_the_decompression_bomb_limit_is_a_value_error(tmp_path):
    """Pillow's DecompressionBombError is neither OSError nor ValueError; the codec raises ValueError, which
    preprocess and the pull verbs turn into one line naming the file."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20000, 20000))
    with pytest.raises(ValueError, match="exceeds limit"):
        imagerows.decode_image(path)


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header claiming ``width`` x ``height`` grey pixels, and no pixel data: Pillow's
    size check reads no further."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))
