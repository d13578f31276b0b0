"""Bad input, one row each, through the `vaegan` CLI: exit code 2, one `error:` line naming the file, key or
value and what is allowed, no traceback, and nothing already written changed (the row's earlier run folder, the
input files, the model registry). All rows but one end in the driver's checks before Ray starts; a corrupt
image in an image folder is found only when Ray Data decodes it.

Rows that end in the driver's checks call the CLI's ``main`` in this process, with stdout and stderr captured
at the file descriptors (a real process would pay seconds of imports per row). The rows that need a process
of their own run the real ``vaegan`` console script: the one that starts Ray, and the one whose run folder
must be unwritable to a user without root's capabilities.

Mixed image sizes and channel counts in an image folder are no error (preprocess resizes and converts them,
see test_preprocess.py); mixing is an error where an input must match the model: a Parquet split holding an
image of another size, a .npy array with a channel count other than 1 or 3.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BIN, REPO, run_cli, vaegan_in_process
from test_imagerows import png_header
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import registry, tracking
from pipelines.config import ALIAS_RULE, RegisterConfig
from vaegan.checkpoint import save_checkpoint
from vaegan.config import VAEGANConfig
from vaegan.data import IDX_FILES, make_shapes
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer

SMOKE = "pipelines/configs/smoke.yaml"
MODEL, OTHER_FLAVOUR = "vaegan-bad-input", "vaegan-bad-input-echo"
CHAMPION = f"models:/{MODEL}@champion"
IMAGE_TYPES = "png, jpg, jpeg, bmp, gif, webp, tif, tiff files, flat or one sub-folder per class"
NPY_VALUES = "allowed: uint8 0..255 or finite floats in [0, 1]"
ECHO_MODEL = """
import mlflow
from mlflow.pyfunc import PythonModel


class Echo(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Echo())
"""


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # {inputs}, {run}, {out}, {too_many_cpus}, {gpu_workers} filled in, here and in expect
    expect: tuple[str, ...]  # each is in the error line
    ray: bool = False  # decoding the source needs Ray Data
    read_only_run: bool = False  # the row's earlier run folder is made read-only

    @property
    def own_process(self) -> bool:
        """Ray's start and its log lines, or dropped capabilities (setpriv), need a real `vaegan` process."""
        return self.ray or self.read_only_run


def run(*overrides: str) -> tuple[str, ...]:
    sets = [part for override in ("register.experiment=bad-input", *overrides) for part in ("--set", override)]
    return ("run", "--config", SMOKE, "--run-dir", "{run}", *sets)


def pull(verb: str, *args: str, model: str = CHAMPION) -> tuple[str, ...]:
    return (verb, "--model", model, *args, "--out", "{out}/result.npy")


CASES = [
    # the config: every key, type and value is checked before anything runs
    Case("unknown-config-key", run("train.epoch=3"),
         ("smoke.yaml: unknown config key 'train.epoch'; allowed keys here: epochs, batch_size, seed",)),
    Case("wrong-type", run("train.epochs=zero"), ("config key 'train.epochs' must be an integer, got 'zero'",)),
    Case("negative-learning-rate", run("opt_enc.lr=-0.001"),
         ("config key 'opt_enc.lr' has invalid value -0.001; allowed: a learning rate > 0",)),
    Case("zero-learning-rate", run("opt_dis.lr=0"),
         ("config key 'opt_dis.lr' has invalid value 0.0; allowed: a learning rate > 0",)),
    Case("unsupported-image-size", run("model.image_size=48"),
         ("config key 'model.image_size' has invalid value 48; allowed: one of [28, 32, 64, 128]",)),
    Case("unknown-model-kind", run("model.kind=gan"),
         ("config key 'model.kind' has invalid value 'gan'; allowed: one of ['vaegan', 'vae']",)),
    Case("grace-period-above-max-epochs", run("tune.grace_period=5"),
         ("config key 'tune.grace_period' has invalid value 5; allowed: an integer in [1, tune.max_epochs=1]",)),
    Case("val-fraction-too-large", run("data.val_fraction=0.7"),
         ("config key 'data.val_fraction' has invalid value 0.7; allowed: a fraction in (0, 0.5)",)),
    Case("zero-cpus-per-worker", run("train.cpus_per_worker=0"),
         ("config key 'train.cpus_per_worker' has invalid value 0; allowed: a positive integer",)),
    Case("register-alias-latest", run("register.alias=latest"),
         (f"config key 'register.alias' has invalid value 'latest'; allowed: {ALIAS_RULE}",)),
    Case("register-alias-like-a-version", run("register.alias=v1"),
         (f"config key 'register.alias' has invalid value 'v1'; allowed: {ALIAS_RULE}",)),
    Case("register-alias-with-a-space", run("register.alias=best model"),
         (f"config key 'register.alias' has invalid value 'best model'; allowed: {ALIAS_RULE}",)),
    Case("register-model-name-with-a-slash", run("register.model_name=a/b"),
         ("config key 'register.model_name' has invalid value 'a/b'; allowed: a name without '/' or ':'",)),
    Case("register-experiment-empty", run("register.experiment="),
         ("config key 'register.experiment' has invalid value ''; allowed: a non-empty string",)),
    Case("parquet-format-without-a-source", run("data.format=parquet"),
         ("config key 'data.format' has invalid value 'parquet'; allowed: 'auto' or 'idx' when data.source is \"\"",)),
    Case("unknown-data-format", run("data.format=tar"),
         ("config key 'data.format' has invalid value 'tar'; allowed: one of ['auto', 'idx', 'images', 'parquet']",)),
    Case("unknown-config-section", run("modle.kind=vae"),
         ("unknown config key 'modle'; allowed keys here: model, loss, opt_enc, opt_dec, opt_dis, train, name, data",)),
    Case("not-true-or-false", run("train.use_gpu=maybe"),
         ("config key 'train.use_gpu' must be true or false, got 'maybe'",)),
    Case("zero-epochs", run("train.epochs=0"),
         ("config key 'train.epochs' has invalid value 0; allowed: a positive integer",)),
    Case("ema-decay-of-one", run("train.ema_decay=1"),
         ("config key 'train.ema_decay' has invalid value 1.0; allowed: a number in [0, 1)",)),
    Case("four-channel-model", run("model.channels=4"),
         ("config key 'model.channels' has invalid value 4; allowed: one of [1, 3]",)),
    Case("negative-data-limit", run("data.limit=-1"),
         ("config key 'data.limit' has invalid value -1; allowed: an integer >= 0",)),
    Case("adam-beta1-of-one", run("opt_dec.beta1=1"),
         ("config key 'opt_dec.beta1' has invalid value 1.0; allowed: a number in [0, 1)",)),
    Case("unknown-adversarial-loss", run("loss.adversarial=lsgan"),
         ("config key 'loss.adversarial' has invalid value 'lsgan'; allowed: one of ['bce', 'hinge', 'wgan-gp']",)),
    Case("asha-reduction-factor-one", run("tune.reduction_factor=1"),
         ("config key 'tune.reduction_factor' has invalid value 1; allowed: an integer >= 2",)),
    Case("search-key-outside-the-space", run("tune.search_keys=[model.latent_dim]"),
         ("config key 'tune.search_keys' has invalid value 'model.latent_dim'; allowed: keys the vaegan sweep "
          "searches (loss.kl_weight, ",)),
    Case("unknown-tune-scheduler", run("tune.scheduler=hyperband"),
         ("config key 'tune.scheduler' has invalid value 'hyperband'; allowed: one of ['asha', 'sha', 'pbt']",)),
    Case("unknown-tune-objective", run("tune.search=optuna", "tune.objectives=[val/fid,val/sharpness]"),
         ("config key 'tune.objectives' has invalid value 'val/sharpness'; allowed: val/fid, val/kid, val/recon_mse",)),
    Case("two-objectives-without-optuna", run("tune.objectives=[val/fid,val/recon_mse]"),
         ("config key 'tune.objectives' has invalid value ['val/fid', 'val/recon_mse']; allowed: one metric unless "
          "tune.search=optuna",)),
    Case("optuna-under-pbt", run("tune.search=optuna", "tune.scheduler=pbt"),
         ("config key 'tune.search' has invalid value 'optuna'; allowed: 'random' with tune.scheduler=pbt",)),
    Case("set-without-a-value", run("train.epochs"),
         ("--set expects key=value (e.g. train.epochs=3), got 'train.epochs'",)),
    Case("set-below-a-value", run("train.epochs.x=1"), ("--set 'train.epochs.x=1': 'epochs' is not a section",)),
    Case("config-not-a-mapping", ("run", "--config", "{inputs}/list.yaml", "--run-dir", "{run}"),
         ("config file {inputs}/list.yaml must hold a mapping of sections, got list",)),
    Case("config-not-yaml", ("run", "--config", "{inputs}/broken.yaml", "--run-dir", "{run}"),
         ("config file {inputs}/broken.yaml is not valid YAML: while parsing a flow mapping",)),
    Case("config-is-a-folder", ("run", "--config", "pipelines/configs", "--run-dir", "{run}"),
         ("config file pipelines/configs is a folder (configs shipped: cluster.yaml, default.yaml, smoke.yaml)",)),
    Case("unknown-step", (*run(), "--steps", "preprocess,trian"),
         ("vaegan run: argument --steps: unknown step 'trian'; allowed: preprocess, tune, train, evaluate, register",)),
    Case("force-outside-steps", (*run(), "--steps", "preprocess", "--force", "train"),
         ("--force train names a step outside --steps preprocess; allowed: one of preprocess, or add it to --steps",)),
    Case("run-folder-is-a-file", ("run", "--config", SMOKE, "--run-dir", "{inputs}/notes.txt"),
         ("run folder '{inputs}/notes.txt' (--run-dir) cannot be written: '{inputs}/notes.txt' is not a folder",)),
    Case("missing-config-file", ("run", "--config", "pipelines/configs/nope.yaml", "--run-dir", "{run}"),
         ("config file pipelines/configs/nope.yaml does not exist (configs shipped: cluster.yaml, default.yaml, "
          "smoke.yaml)",)),
    Case("missing-data-source", run("data.source={inputs}/nowhere"),
         ("config key 'data.source' points to '{inputs}/nowhere', which does not exist; allowed: an IDX folder, "
          "an image folder, a Parquet file or folder",)),
    # the data: checked from headers, names and footers on the driver, before Ray starts
    Case("idx-file-missing", run("data.source={inputs}/idx-missing"),
         ("IDX source directory {inputs}/idx-missing lacks t10k-labels-idx1-ubyte (nor .gz)",
          "pass a folder holding the four IDX files")),
    Case("idx-file-truncated", run("data.source={inputs}/idx-truncated"),
         ("{inputs}/idx-truncated/train-images-idx3-ubyte: truncated: header says shape (70, 28, 28) = 54896 bytes, "
          "file has 27448 bytes",)),
    Case("idx-wrong-magic", run("data.source={inputs}/idx-wrong-magic"),
         ("{inputs}/idx-wrong-magic/train-images-idx3-ubyte: wrong magic number 0x00000801, expected 0x00000803 "
          "for an IDX images file",)),
    Case("non-image-file-in-image-folder", run("data.source={inputs}/images-stray"),
         (f"image folder {{inputs}}/images-stray holds 'notes.txt', which is not an image file; "
          f"allowed: {IMAGE_TYPES}",)),
    Case("parquet-folder-without-parquet-files", run("data.format=parquet", "data.source={inputs}/images-empty"),
         ("Parquet source {inputs}/images-empty holds no .parquet file; allowed: a Parquet file or a folder holding "
          ".parquet files",)),
    Case("text-file-as-source", run("data.source={inputs}/notes.txt"),
         ("Parquet source {inputs}/notes.txt cannot be read: ", "allowed: a Parquet file or folder")),
    Case("empty-dataset", run("data.source={inputs}/images-empty"),
         (f"image folder {{inputs}}/images-empty holds no image files; allowed: {IMAGE_TYPES}",)),
    Case("parquet-wrong-schema", run("data.source={inputs}/wrong-schema.parquet"),
         ("Parquet source {inputs}/wrong-schema.parquet has columns (pixels: binary, label: string); allowed: an "
          "'image' column of encoded PNG/JPEG bytes or uint8 arrays, and optionally an integer 'label' column",)),
    Case("split-left-empty", run("data.limit=14", "data.val_fraction=0.01"),
         ("split 'val' is empty after preprocessing Fashion-MNIST (14 rows in all, data.limit=14); allowed: more data "
          "(data.limit) or larger data.val_fraction / data.test_fraction",)),
    Case("split-of-three-rows-or-fewer", run("data.limit=20"),
         ("split 'val' holds only 1 row after preprocessing Fashion-MNIST (20 rows in all, data.limit=20); allowed: at "
          "least 4 rows per split for training and evaluation: more data (data.limit)",)),
    Case("batch-larger-than-data", run("train.batch_size=2048"),
         ("config key 'train.batch_size' has invalid value 2048; allowed: at most 1061 (1061 training images of "
          "Fashion-MNIST with data.limit=1400, shared by train.num_workers=1)",)),
    # the cluster: a local Ray cannot grow, so what it lacks would be waited for forever
    Case("more-cpus-than-the-machine-has", run("train.cpus_per_worker={too_many_cpus}"),
         ("config keys 'train.num_workers' x 'train.cpus_per_worker' = 1 x {too_many_cpus} = {too_many_cpus} CPUs, "
          "but this machine's Ray has",
          "allowed: at most that many (or set RAY_ADDRESS to a bigger cluster)")),
    Case("more-gpus-than-the-machine-has", run("train.use_gpu=true", "train.num_workers={gpu_workers}"),
         ("config key 'train.num_workers' = {gpu_workers} GPU workers (train.use_gpu), but this machine's Ray has",
          "allowed: at most that many, or train.use_gpu=false")),
    Case("run-folder-not-writable", run(),
         ("run folder '{run}' (--run-dir) cannot be written: '{run}' is not writable; allowed: a folder this user "
          "can write",), read_only_run=True),
    # decoding the source: only Ray Data's tasks find it, and the message still names the file
    Case("corrupt-image-in-image-folder", run("data.source={inputs}/images-corrupt", "train.batch_size=4"),
         ("{inputs}/images-corrupt/broken.png: not a decodable image (cannot identify image file",
          "allowed: png, jpg, jpeg, bmp, gif, webp, tif, tiff image data"), ray=True),
    # the registry
    Case("unknown-model-name", pull("sample", model="models:/no-such-model@champion"),
         ("Registered Model with name=no-such-model not found; allowed: a registered model name, one of [",
          f"'{MODEL}'")),
    Case("unknown-alias", pull("sample", model=f"models:/{MODEL}@no-such-alias"),
         (f"alias no-such-alias not found; allowed: models:/{MODEL}@ALIAS with ALIAS in ['champion'], or "
          f"models:/{MODEL}/VERSION with VERSION in [1]",)),
    Case("model-of-another-flavour", pull("sample", model=f"models:/{OTHER_FLAVOUR}/1"),
         (f"model 'models:/{OTHER_FLAVOUR}/1' is not a vaegan model (flavours: python_function); allowed: a model "
          "registered by `vaegan run`",)),
    # what the pull verbs are asked for
    Case("num-samples-zero", pull("sample", "--num", "0"),
         ("vaegan sample: argument --num: invalid value '0'; allowed: an integer >= 1",)),
    Case("num-samples-above-cap", pull("sample", "--num", "5000"),
         ("params.num_samples=5000 is outside the allowed range 1..1024",)),
    Case("unknown-prior", pull("sample", "--prior", "gmm"),
         ("vaegan sample: argument --prior: invalid choice: 'gmm' (choose from 'standard', 'fitted')",)),
    Case("fitted-prior-of-a-model-without-one", pull("sample", "--prior", "fitted"),
         ("params.prior: prior 'fitted': this model's checkpoint carries no fitted prior", "use prior 'standard'")),
    Case("wrong-input-shape", pull("encode", "--input", "{inputs}/five-dims.npy"),
         ("{inputs}/five-dims.npy has shape (1, 1, 1, 28, 28); allowed: (H, W), (N, H, W) or (N, C, H, W)",)),
    Case("wrong-input-dtype", pull("encode", "--input", "{inputs}/int64.npy"),
         (f"{{inputs}}/int64.npy holds int64 values; {NPY_VALUES}",)),
    Case("nan-pixels-to-reconstruct", pull("reconstruct", "--input", "{inputs}/nan.npy"),
         (f"{{inputs}}/nan.npy holds NaN or infinite values; {NPY_VALUES}",)),
    Case("mixed-channels-in-npy", pull("encode", "--input", "{inputs}/four-channels.npy"),
         ("{inputs}/four-channels.npy has shape (2, 4, 28, 28), 4 channels; allowed: (N, C, H, W) with C = 1 or 3",)),
    Case("npy-hwc-image", pull("encode", "--input", "{inputs}/hwc.npy"),
         ("{inputs}/hwc.npy has shape (28, 28, 3): 28 grey images (N, H, W), or one colour image (H, W, C)?; "
          "allowed: 3-D as (N, H, W) only when N is not 3 or 4 and W > 4, else 4-D (N, C, H, W): (1, 3, 28, 28) for "
          "one image",)),
    Case("npy-chw-image-without-n", pull("reconstruct", "--input", "{inputs}/chw.npy"),
         ("{inputs}/chw.npy has shape (3, 28, 28): 3 grey images (N, H, W), or one colour image (C, H, W)?",
          "(1, 3, 28, 28) for one image")),
    Case("npy-floats-above-one", pull("encode", "--input", "{inputs}/above-one.npy"),
         (f"{{inputs}}/above-one.npy holds float32 values in [0, 2]; {NPY_VALUES}",)),
    Case("npy-of-pickled-objects", pull("encode", "--input", "{inputs}/objects.npy"),
         ("{inputs}/objects.npy is not a plain numeric .npy array: Object arrays cannot be loaded when "
          "allow_pickle=False",)),
    Case("npy-truncated", pull("encode", "--input", "{inputs}/truncated.npy"),
         ("{inputs}/truncated.npy is not a plain numeric .npy array",)),
    Case("text-file-as-input", pull("encode", "--input", "{inputs}/notes.txt"),
         ("cannot decode image '{inputs}/notes.txt': cannot identify image file",
          f"allowed: {IMAGE_TYPES.split(' files')[0]} files")),
    Case("missing-input", pull("encode", "--input", "{inputs}/nowhere.png"),
         ("input '{inputs}/nowhere.png' does not exist; allowed: an image file, a folder of images",)),
    Case("input-folder-without-images", pull("encode", "--input", "{inputs}/images-empty"),
         ("folder '{inputs}/images-empty' holds no image files (png, jpg",)),
    Case("image-over-the-decompression-bomb-limit", pull("encode", "--input", "{inputs}/bomb.png"),
         ("cannot decode image '{inputs}/bomb.png': Image size (400000000 pixels) exceeds limit of",)),
    Case("decompression-bomb-in-an-input-folder", pull("reconstruct", "--input", "{inputs}/bombs"),
         ("cannot decode image '{inputs}/bombs/bomb.png': Image size (400000000 pixels) exceeds limit of",)),
    Case("null-rows-in-parquet-split", pull("encode", "--input", "{inputs}/nulls.parquet"),
         ("{inputs}/nulls.parquet row 1 holds no image (null); allowed: 784 bytes, one (1, 28, 28) uint8 image",)),
    Case("list-rows-in-parquet-split", pull("encode", "--input", "{inputs}/lists.parquet"),
         ("{inputs}/lists.parquet column 'image' holds list<element: uint8> rows; allowed: binary rows of 784 bytes",)),
    Case("parquet-split-without-image-column", pull("encode", "--input", "{inputs}/wrong-schema.parquet"),
         ("{inputs}/wrong-schema.parquet has no 'image' column (columns: pixels, label); allowed: a pipeline Parquet "
          "split",)),
    Case("interpolate-more-than-two-images", pull("interpolate", "--input", "{inputs}/three.npy"),
         ("vaegan interpolate: --input {inputs}/three.npy holds 3 images; allowed: exactly two",)),
    Case("interpolate-one-step", pull("interpolate", "--input", "{inputs}/three.npy", "--steps", "1"),
         ("vaegan interpolate: argument --steps: invalid value '1'; allowed: an integer >= 2",)),
    Case("limit-zero", pull("encode", "--input", "{inputs}/three.npy", "--limit", "0"),
         ("vaegan encode: argument --limit: invalid value '0'; allowed: an integer >= 1",)),
    Case("negative-num-samples", pull("sample", "--num", "-3"),
         ("vaegan sample: argument --num: invalid value '-3'; allowed: an integer >= 1",)),
    Case("seed-above-the-range", pull("sample", "--seed", str(2**64)),
         (f"vaegan sample: argument --seed: invalid value '{2**64}'; allowed: an integer in [0, {2**63 - 1}]",)),
    # what the verbs are asked to write
    Case("out-without-a-suffix", ("sample", "--model", CHAMPION, "--out", "{out}/grid"),
         ("--out '{out}/grid' does not end in .png or .npy; allowed: a file name ending in .png or .npy",)),
    Case("out-of-another-type", ("reconstruct", "--model", CHAMPION, "--input", "{inputs}/three.npy", "--out",
                                 "{out}/recon.txt"),
         ("--out '{out}/recon.txt' does not end in .png or .npy",)),
    Case("out-is-a-folder", ("sample", "--model", CHAMPION, "--out", "{run}"),
         ("--out '{run}' is a folder; allowed: a file name ending in .png or .npy (e.g. '{run}/out.png')",)),
    Case("out-below-a-file", ("sample", "--model", CHAMPION, "--out", "{inputs}/notes.txt/grid.png"),
         ("--out '{inputs}/notes.txt/grid.png' cannot be written: '{inputs}/notes.txt' is not a folder",)),
    Case("npy-flag-not-npy", ("sample", "--model", CHAMPION, "--out", "{out}/grid.png", "--npy", "{out}/grid.png"),
         ("--npy '{out}/grid.png' does not end in .npy; allowed: a file name ending in .npy",)),
    Case("encode-out-png", ("encode", "--model", CHAMPION, "--input", "{inputs}/three.npy", "--out", "{out}/z.png"),
         ("--out '{out}/z.png' does not end in .npy; allowed: a file name ending in .npy",)),
    # `vaegan evaluate`: its flags are checked before the model is downloaded
    Case("evaluate-out-is-a-file", ("evaluate", "--model", CHAMPION, "--n", "16", "--out", "{inputs}/notes.txt"),
         ("--out folder '{inputs}/notes.txt' is a file; allowed: a new or empty folder",)),
    Case("evaluate-n-below-the-minimum", ("evaluate", "--model", CHAMPION, "--n", "5", "--out", "{out}"),
         ("vaegan evaluate: argument --n: invalid value '5'; allowed: an integer >= 16",)),
    Case("evaluate-seed-above-the-range", ("evaluate", "--model", CHAMPION, "--seed", str(2**64), "--out", "{out}"),
         (f"vaegan evaluate: argument --seed: invalid value '{2**64}'; allowed: an integer in [0, {2**63 - 1}]",)),
    Case("evaluate-negative-seed", ("evaluate", "--model", CHAMPION, "--seed", "-1", "--out", "{out}"),
         (f"vaegan evaluate: argument --seed: invalid value '-1'; allowed: an integer in [0, {2**63 - 1}]",)),
    Case("mixed-sizes-in-parquet-split", pull("encode", "--input", "{inputs}/mixed-sizes.parquet"),
         ("{inputs}/mixed-sizes.parquet row 1 holds an image of 3072 bytes; allowed: 784 bytes, one (1, 28, 28) "
          "uint8 image as the pipeline writes for this model",)),
]


# -- the inputs ------------------------------------------------------------------------------------


def write_idx(folder: Path, train: int = 70, test: int = 12) -> None:
    """A small, valid, uncompressed IDX dataset of 28 x 28 images."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        images, labels = IDX_FILES[split]
        (folder / images).write_bytes(b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">u4").tobytes()
                                      + rng.integers(0, 256, n * 28 * 28, np.uint8).tobytes())
        (folder / labels).write_bytes(b"\x00\x00\x08\x01" + np.array([n], ">u4").tobytes()
                                      + rng.integers(0, 10, n, np.uint8).tobytes())


def write_pngs(folder: Path, n: int) -> None:
    folder.mkdir()
    for i, image in enumerate(make_shapes(n, 28, channels=1)[0][:, 0].numpy()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


def write_bad_sources(root: Path) -> None:
    """IDX folders, image folders and Parquet files as a user might pass them to `vaegan run`."""
    for name in ("idx-missing", "idx-truncated", "idx-wrong-magic"):
        write_idx(root / name)
    (root / "idx-missing" / IDX_FILES["test"][1]).unlink()
    images = root / "idx-truncated" / IDX_FILES["train"][0]
    images.write_bytes(images.read_bytes()[:27448])
    (root / "idx-wrong-magic" / IDX_FILES["train"][0]).write_bytes(
        (root / "idx-wrong-magic" / IDX_FILES["train"][1]).read_bytes())
    write_pngs(root / "images-stray", 3)
    (root / "images-stray" / "notes.txt").write_text("where these images came from\n")
    (root / "images-empty").mkdir()
    write_pngs(root / "images-corrupt", 80)  # 5 val and 5 test rows: past the driver's split check
    (root / "images-corrupt" / "broken.png").write_text("a download that failed half-way")
    pq.write_table(pa.table({"pixels": [b"\x00" * 784], "label": ["shirt"]}), root / "wrong-schema.parquet")
    (root / "notes.txt").write_text("not an image, not Parquet, not a folder\n")
    (root / "list.yaml").write_text("- data\n- train\n")
    (root / "broken.yaml").write_text("train: {epochs: 3\n")


def write_bad_pull_inputs(root: Path) -> None:
    """Inputs for encode / reconstruct / interpolate that the model cannot take."""
    np.save(root / "five-dims.npy", np.zeros((1, 1, 1, 28, 28), np.float32))
    np.save(root / "int64.npy", np.zeros((2, 1, 28, 28), np.int64))
    nan = np.zeros((2, 1, 28, 28), np.float32)
    nan[1, 0, 5, 5] = np.nan
    np.save(root / "nan.npy", nan)
    np.save(root / "four-channels.npy", np.zeros((2, 4, 28, 28), np.uint8))
    pq.write_table(pa.table({"image": [b"\x00" * 784, b"\x00" * 3072]}), root / "mixed-sizes.parquet")
    pq.write_table(pa.table({"image": pa.array([b"\x00" * 784, None], pa.binary())}), root / "nulls.parquet")
    pq.write_table(pa.table({"image": pa.array([[0] * 784] * 2, pa.list_(pa.uint8()))}), root / "lists.parquet")
    np.save(root / "three.npy", np.zeros((3, 1, 28, 28), np.float32))
    np.save(root / "hwc.npy", np.zeros((28, 28, 3), np.uint8))
    np.save(root / "chw.npy", np.zeros((3, 28, 28), np.uint8))
    np.save(root / "above-one.npy", np.linspace(0, 2, 2 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28))
    np.save(root / "objects.npy", np.array([{"pixels": 0}], dtype=object), allow_pickle=True)
    (root / "truncated.npy").write_bytes((root / "hwc.npy").read_bytes()[:100])
    (root / "bomb.png").write_bytes(png_header(20000, 20000))
    (root / "bombs").mkdir()
    (root / "bombs" / "bomb.png").write_bytes(png_header(20000, 20000))


def write_earlier_run(run_dir: Path) -> None:
    """What a finished run leaves: a failed rerun into the same folder must not touch any of it."""
    step = run_dir / "preprocess-0123456789ab"
    step.mkdir(parents=True)
    (step / "outputs.json").write_text('{"manifest": {"counts": {"train": 1061, "val": 139, "test": 200}}}')
    (run_dir / "summary.json").write_text(f'{{"model_uri": "{CHAMPION}"}}')


def fingerprint(root: Path) -> dict[str, str]:
    """Every file's and folder's path, mode and content hash under ``root``."""
    return {str(p.relative_to(root)): f"{p.stat().st_mode:o}:" + (hashlib.sha256(p.read_bytes()).hexdigest()
                                                                  if p.is_file() else "folder")
            for p in sorted([root, *root.rglob("*")])}


def registry_state(uri: str) -> dict[str, tuple]:
    client = MlflowClient(uri)
    return {m.name: (sorted(m.aliases.items()),
                     sorted(v.version for v in client.search_model_versions(f"name = '{m.name}'")))
            for m in client.search_registered_models()}


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A tiny untrained vaegan model as models:/vaegan-bad-input@champion, and a pyfunc of another kind."""
    folder = tmp_path_factory.mktemp("models")
    cfg = VAEGANConfig()
    cfg.model.latent_dim, cfg.model.base_channels = 4, 4
    checkpoint = save_checkpoint(folder / "checkpoint.pt", VAEGANTrainer(cfg, *build_nets(cfg.model)))
    register = RegisterConfig(model_name=MODEL, alias="champion", experiment="bad-input")
    experiment = tracking.ensure_experiment(mlflow_server, register.experiment, folder)
    registry.register(register, mlflow_server, run_id=tracking.start_run(mlflow_server, experiment, "bad-input"),
                      checkpoint=checkpoint, metrics={"fid": 1.0}, feature_net="none", fingerprint="none",
                      image_shape=[1, 28, 28])
    (folder / "echo.py").write_text(ECHO_MODEL)
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(folder / "echo.py"))
    mlflow.register_model(info.model_uri, OTHER_FLAVOUR)
    return mlflow_server


# -- running the rows ------------------------------------------------------------------------------


@dataclass
class Outcome:
    done: subprocess.CompletedProcess
    fields: dict[str, str]  # what filled the row's {placeholders}
    run_before: dict[str, str]
    run_after: dict[str, str]


@dataclass
class Outcomes:
    rows: dict[str, Outcome]
    shared_before: tuple
    shared_after: tuple


def vaegan(args: list[str], env: dict[str, str], as_user: bool) -> subprocess.CompletedProcess:
    if as_user and os.geteuid() == 0:
        # Root writes through permission bits; without these two capabilities it meets them as any user does.
        return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", str(BIN / "vaegan"),
                               *args], cwd=REPO, capture_output=True, text=True, env={**os.environ, **env},
                              timeout=300, check=False)
    return run_cli(*args, env=env, timeout=300)


def run_row(case: Case, folder: Path, fields: dict[str, str], env: dict[str, str]) -> Outcome:
    write_earlier_run(folder / "run")
    if case.read_only_run:
        (folder / "run").chmod(0o555)
    fields = {**fields, "run": str(folder / "run"), "out": str(folder / "out")}
    before = fingerprint(folder)
    args = [arg.format(**fields) for arg in case.args]
    done = vaegan(args, env, case.read_only_run) if case.own_process else vaegan_in_process(args)
    return Outcome(done, fields, before, fingerprint(folder))


@pytest.fixture(scope="module")
def outcomes(registered, tmp_path_factory) -> Outcomes:
    """Every row's CLI run: the rows with a process of their own in threads, meanwhile the others one after
    another in this process's main thread. They share only read-only inputs and the registry, fingerprinted
    before and after them all."""
    inputs = tmp_path_factory.mktemp("inputs")
    write_bad_sources(inputs)
    write_bad_pull_inputs(inputs)
    fields = {"inputs": str(inputs), "too_many_cpus": str(os.cpu_count() + 1),
              "gpu_workers": str(torch.cuda.device_count() + 1)}
    env = {"MLFLOW_TRACKING_URI": registered}
    shared_before = fingerprint(inputs), registry_state(registered)
    folders = {case.id: tmp_path_factory.mktemp(case.id) for case in CASES}
    # The environment of the rows in this process, set before any thread copies os.environ for its process.
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(os.cpu_count()) as pool:
        patch.setenv("MLFLOW_TRACKING_URI", registered)
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.chdir(REPO)
        futures = {case.id: pool.submit(run_row, case, folders[case.id], fields, env)
                   for case in sorted(CASES, key=lambda c: not c.ray) if case.own_process}  # the slow Ray row first
        rows = {case.id: run_row(case, folders[case.id], fields, env) for case in CASES if not case.own_process}
        rows.update({name: future.result() for name, future in futures.items()})
    return Outcomes(rows, shared_before, (fingerprint(inputs), registry_state(registered)))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_clear_line_and_changes_nothing(case, outcomes):
    outcome = outcomes.rows[case.id]
    done = outcome.done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # Where a row starts Ray, Ray's log lines come too, some after the error; elsewhere the error is all there is.
    assert len(errors) == 1 and (case.ray or errors == lines), done.stderr[-3000:]
    for text in case.expect:
        assert text.format(**outcome.fields) in errors[0]
    assert outcome.run_after == outcome.run_before, "the earlier run folder changed"
    assert outcomes.shared_after == outcomes.shared_before, "an input file or the registry changed"


@pytest.mark.parametrize("args", [("--debug", "run"), ("run", "--debug")], ids=["before-the-verb", "after-it"])
def test_debug_shows_the_traceback_of_a_user_error(args):
    done = run_cli(*args, "--config", SMOKE, "--set", "train.epoch=3", "--dry-run")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "vaegan.config.ConfigError: pipelines/configs/smoke.yaml: unknown config key 'train.epoch'" in done.stderr


def test_evaluate_never_clears_a_folder_it_did_not_write(registered, tmp_path):
    """`vaegan evaluate --out DIR` writes DIR/preprocess; a user's own DIR/preprocess survives and the command
    stops with one line instead (it used to be deleted by shutil.rmtree)."""
    out = tmp_path / "out"
    (out / "preprocess").mkdir(parents=True)
    (out / "preprocess" / "notes.txt").write_text("a user's own file\n")
    write_pngs(tmp_path / "images", 40)
    before = fingerprint(tmp_path)
    done = run_cli("evaluate", "--model", CHAMPION, "--data", str(tmp_path / "images"), "--n", "16", "--out", str(out),
                   env={"MLFLOW_TRACKING_URI": registered}, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, lines
    assert str(out) in lines[0] and "allowed:" in lines[0]
    assert fingerprint(tmp_path) == before
