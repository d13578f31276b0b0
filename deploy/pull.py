"""Pull a registered model from MLflow and make images with it: what ``vaegan sample | encode |
reconstruct | interpolate`` run, and the one function Python users need.

    import numpy as np
    from deploy.pull import load_model
    model = load_model("models:/vaegan-fashion-mnist@champion")  # MLFLOW_TRACKING_URI names the server
    images = model.predict(np.zeros((1, 1, 28, 28), np.float32), params={"mode": "sample", "num_samples": 16})

Everything goes through the registered pyfunc (``deploy/pyfunc_model.py``), the same code that
``mlflow models serve`` runs, so the CLI, Python and the REST endpoint give the same answers.
Inputs for encode/reconstruct/interpolate (``read_images``): an image file, a folder of images, a
``.npy`` array ((H, W), (N, H, W) or (N, C, H, W); uint8 0..255 or float in [0, 1]), or a Parquet
split written by the pipeline (``runs/<name>/preprocess-<key>/test``). They are resized and converted
to the model's channels as the pipeline's preprocess does; transparent pixels are composited on white.
A 3-D ``.npy`` is N grey images (N, H, W); one that reads as a single colour image instead, (H, W, C) with
C = 1, 3 or 4 last or (C, H, W) with C = 3 or 4 first, is refused as ambiguous: give (N, C, H, W).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.tracking import MlflowClient

from vaegan.atomic import unwritable_reason
from vaegan.data import match_channels, resize_images
from vaegan.errors import UserError
from vaegan.imagerows import IMAGE_TYPES, decode_image, decode_rows_float, first_bad_row, is_image_file

PYFUNC_CLASS = "VAEGANPyfunc"
PREDICT_BATCH = 1024  # the pyfunc's per-request image cap


class PullError(UserError):
    """A model or input the user named cannot be used; the message says which and why."""


def download_through_the_server() -> None:
    """Make MLflow fetch artifacts through the tracking server rather than from the bucket behind it.

    A server with ``--artifacts-destination s3://…`` advertises presigned downloads, and MLflow 3's client
    then fetches every file straight from the bucket: a puller needs the bucket's endpoint and network reach,
    and an S3-compatible store that mishandles presigned URLs stalls each file for a minute of retries. Through
    the server, anyone who reaches the server can pull. A value the user set is left alone."""
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")


def load_model(model_uri: str) -> PyFuncModel:
    """The registered vaegan pyfunc behind ``model_uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ...)."""
    download_through_the_server()
    try:
        with warnings.catch_warnings():
            # MLflow advises type hints on predict() (the logged signature already types the model) under
            # its own simplefilter("once"), which no filter of ours outranks; so drop it where it is shown.
            show = warnings.showwarning
            warnings.showwarning = lambda message, *args, **kwargs: (
                None if "type hint" in str(message) else show(message, *args, **kwargs))
            model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        raise PullError(f"cannot load model {model_uri!r} from {mlflow.get_tracking_uri()}: "
                        f"{str(err).splitlines()[0].rstrip('.')}; allowed: {_uris_held(model_uri)}") from err
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:
        python_model = None
    if type(python_model).__name__ != PYFUNC_CLASS:
        flavours = ", ".join(sorted(model.metadata.flavors))
        raise PullError(f"model {model_uri!r} is not a vaegan model (flavours: {flavours}); "
                        "allowed: a model registered by `vaegan run`")
    return model


def _uris_held(model_uri: str) -> str:
    """The URIs that would load, for an error message: the registered model's aliases and versions, or the
    registered model names when ``model_uri`` names none."""
    forms = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a model folder"
    if not model_uri.startswith("models:/"):
        return forms
    name = model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    client = MlflowClient()
    try:
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            return f"a registered model name, one of {sorted(m.name for m in client.search_registered_models())}"
        aliases = sorted(client.get_registered_model(name).aliases)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:  # the registry cannot be listed: say what a URI looks like
        return forms
    return f"models:/{name}@ALIAS with ALIAS in {aliases}, or models:/{name}/VERSION with VERSION in {versions}"


def image_shape(model: PyFuncModel) -> tuple[int, int, int]:
    """(C, H, W) of the images the model takes and makes, from its signature."""
    return tuple(model.metadata.get_input_schema().inputs[0].shape[1:])


def predict(model: PyFuncModel, images: np.ndarray | None, **params) -> np.ndarray:
    """Run the pyfunc; image inputs go in batches under its per-request cap."""
    shape = image_shape(model)
    try:
        if images is None:  # sample mode ignores the input; the signature still wants a tensor
            return model.predict(np.zeros((1, *shape), np.float32), params=params)
        if params.get("mode") == "interpolate":
            return model.predict(images[:2], params=params)
        return np.concatenate([model.predict(images[i:i + PREDICT_BATCH], params=params)
                               for i in range(0, len(images), PREDICT_BATCH)])
    except (MlflowException, ValueError) as err:
        raise PullError(str(err).splitlines()[0]) from err


def read_images(path: str | Path, shape: tuple[int, int, int], limit: int = 0) -> np.ndarray:
    """Images at ``path`` as float32 (N, C, H, W) in [0, 1] with the model's ``shape``; ``limit`` > 0 keeps the first."""
    path = Path(path)
    if not path.exists():
        raise PullError(f"input {str(path)!r} does not exist; allowed: an image file, a folder of images, "
                        "a .npy array or a Parquet split")
    if path.suffix == ".npy":
        images = _from_npy(path)
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        images = _from_parquet(path, shape)
    elif path.is_dir():
        images = _from_folder(path, shape[0])
    else:
        images = _decode(path, shape[0]).unsqueeze(0)
    if limit:
        images = images[:limit]
    if len(images) == 0:
        raise PullError(f"input {str(path)!r} holds no images")
    return resize_images(match_channels(images, shape[0]), shape[1]).clamp_(0, 1).numpy()


def _from_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise PullError(f"{path} is not a plain numeric .npy array: {err}") from err
    if array.ndim not in (2, 3, 4):
        raise PullError(f"{path} has shape {array.shape}; allowed: (H, W), (N, H, W) or (N, C, H, W)")
    if array.ndim == 3 and (array.shape[-1] in (1, 3, 4) or array.shape[0] in (3, 4)):
        n, h, w = array.shape
        one = (1, w, n, h) if w in (1, 3, 4) else (1, n, h, w)  # the single (H, W, C) or (C, H, W) image
        raise PullError(f"{path} has shape {array.shape}: {n} grey images (N, H, W), or one colour image "
                        f"{'(H, W, C)' if w in (1, 3, 4) else '(C, H, W)'}?; allowed: 3-D as (N, H, W) only when "
                        f"N is not 3 or 4 and W > 4, else 4-D (N, C, H, W): {one} for one image")
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[:, None]
    if array.shape[1] not in (1, 3):
        raise PullError(f"{path} has shape {array.shape}, {array.shape[1]} channels; allowed: (N, C, H, W) with "
                        "C = 1 or 3 (converted to the model's channels)")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    allowed = "allowed: uint8 0..255 or finite floats in [0, 1]"
    if not np.issubdtype(array.dtype, np.floating):
        raise PullError(f"{path} holds {array.dtype} values; {allowed}")
    if not np.isfinite(array).all():
        raise PullError(f"{path} holds NaN or infinite values; {allowed}")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise PullError(f"{path} holds {array.dtype} values in [{array.min():g}, {array.max():g}]; {allowed}")
    return torch.from_numpy(array.astype(np.float32))


def _from_parquet(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """The pipeline's split layout: one row per image, ``image`` holding C*H*W raw uint8 bytes."""
    size, image = int(np.prod(shape)), f"one {tuple(shape)} uint8 image as the pipeline writes for this model"
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        raise PullError(f"{path} cannot be read as Parquet: {err}; allowed: a pipeline Parquet split") from err
    if "image" not in table.column_names:
        raise PullError(f"{path} has no 'image' column (columns: {', '.join(table.column_names)}); allowed: a "
                        f"pipeline Parquet split, whose 'image' rows hold {size} bytes each, {image}")
    kind = table.schema.field("image").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise PullError(f"{path} column 'image' holds {kind} rows; allowed: binary rows of {size} bytes, {image}")
    column = table.column("image").to_pylist()
    bad = first_bad_row(column, shape)
    if bad is not None:
        held = "no image (null)" if column[bad] is None else f"an image of {len(column[bad])} bytes"
        raise PullError(f"{path} row {bad} holds {held}; allowed: {size} bytes, {image}")
    return decode_rows_float(column, shape)


def _from_folder(path: Path, channels: int) -> torch.Tensor:
    files = sorted(f for f in path.iterdir() if is_image_file(f))
    if not files:
        raise PullError(f"folder {str(path)!r} holds no image files ({IMAGE_TYPES})")
    images = [_decode(f, channels) for f in files]
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:  # resize each to the largest side's square first so they stack
        side = max(max(s) for s in sizes)
        images = [resize_images(image.unsqueeze(0), side)[0] for image in images]
    return torch.stack(images)


def _decode(path: Path, channels: int) -> torch.Tensor:
    """(C, H, W) float in [0, 1]; any mode (palette, 16-bit) to L or RGB, transparency composited on white."""
    try:
        array = decode_image(path, "L" if channels == 1 else "RGB").astype(np.float32) / 255.0
    except (OSError, ValueError) as err:  # ValueError: also an image over Pillow's decompression-bomb limit
        raise PullError(f"cannot decode image {str(path)!r}: {err}; allowed: {IMAGE_TYPES} files") from err
    return torch.from_numpy(array).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def check_out(path: str | Path, suffixes: tuple[str, ...] = (".png", ".npy"), flag: str = "--out") -> Path:
    """``path`` as an output file a verb may write, checked before any model is loaded: it ends in one of
    ``suffixes`` (what decides the format), is no folder, and its nearest existing folder is writable."""
    path = Path(path)
    allowed = f"allowed: a file name ending in {' or '.join(suffixes)}"
    if path.is_dir():
        raise PullError(f"{flag} {str(path)!r} is a folder; {allowed} (e.g. {str(path / ('out' + suffixes[0]))!r})")
    if path.suffix not in suffixes:
        raise PullError(f"{flag} {str(path)!r} does not end in {' or '.join(suffixes)}; {allowed}")
    reason = unwritable_reason(path.parent)
    if reason is not None:
        folder, problem = reason
        raise PullError(f"{flag} {str(path)!r} cannot be written: {str(folder)!r} {problem}; allowed: a file in a "
                        "folder this user can write")
    return path


def write_images(images: np.ndarray, out: str | Path, nrow: int = 8) -> Path:
    """A PNG grid (``.png``) or the raw float32 array (``.npy``) of (N, C, H, W) images in [0, 1]."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, images.astype(np.float32))
    else:
        torchvision.utils.save_image(torch.from_numpy(images), out, nrow=nrow, padding=2, pad_value=1.0)
    return out
