"""The pipeline's configuration: YAML -> typed dataclasses -> plain dicts across Ray boundaries.

The model, loss, optimiser and core training sections are ``vaegan.config``'s own dataclasses
(their defaults live there); this module adds the sections only the pipeline has (data, Ray
scaling, tune, eval, register). YAML is parsed here and nowhere else.

    cfg = load_config("pipelines/configs/smoke.yaml", ["train.epochs=2", "tune.enabled=false"])
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vaegan.config import ConfigError, TrainConfig, VAEGANConfig, _require, from_dict

CONFIG_DIR = Path(__file__).parent / "configs"
MIN_EVAL_IMAGES = 16  # FID's covariance and precision/recall's k-NN need a few; `vaegan evaluate --n` too
# MLflow's own rules (mlflow/utils/validation.py: _validate_model_alias_name, _validate_model_alias_name_reserved,
# _validate_model_name), checked here so a bad name stops before any compute, not after training.
# tests/test_config.py checks that MLflow refuses what these refuse.
ALIAS_RULE = "a name of letters, digits, _ and - other than 'latest' and v<digits> (reserved by MLflow)"
MODEL_NAME_RULE = "a name without '/' or ':' that is its own normalised path (MLflow's rule)"


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-3`` is a number, as YAML users write it (YAML 1.1,
    which PyYAML follows, wants ``1.0e-3`` and reads ``1e-3`` as a string)."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """The one YAML reader of config files and ``--set`` values."""
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class DataConfig:
    source: str = ""  # IDX folder, image folder or Parquet path; "" finds Fashion-MNIST (Debian package, data_dir)
    format: Literal["auto", "idx", "images", "parquet"] = "auto"
    data_dir: str = "data"  # where a torchvision download of Fashion-MNIST goes
    download: bool = True  # with source "": download Fashion-MNIST when it is not found on this machine
    download_timeout_s: float = 30.0  # the longest the download waits on one connection or read
    limit: int = 0  # keep only the first N source images (0 keeps all); for smoke runs
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # IDX sources keep their own test file instead
    rows_per_file: int = 10000  # most rows in one Parquet file
    seed: int = 0

    def validate(self) -> None:
        _require(bool(self.source) or self.format in ("auto", "idx"), "data.format", self.format,
                 "'auto' or 'idx' when data.source is \"\" (Fashion-MNIST); 'images' and 'parquet' need a data.source")
        _require(self.limit >= 0, "data.limit", self.limit, "an integer >= 0")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            _require(0 < value < 0.5, f"data.{key}", value, "a fraction in (0, 0.5)")
        _require(self.rows_per_file > 0, "data.rows_per_file", self.rows_per_file, "a positive integer")
        _require(self.download_timeout_s > 0, "data.download_timeout_s", self.download_timeout_s, "seconds > 0")

    def check_source(self) -> None:
        """That the source exists: a filesystem check, so the driver runs it once, before Ray (``validate``
        stays pure and runs wherever a config is rebuilt)."""
        if not self.source:
            return
        from . import store  # pyarrow's filesystems: only for a run that reads a source
        if store.is_remote(self.source):
            store.check_readable(self.source, "config key 'data.source'")
            if self.format == "idx":
                raise ConfigError(f"config key 'data.format' is 'idx' with data.source {self.source!r} on object "
                                  "storage; allowed: 'images' or 'parquet' there (IDX files are read locally)")
        elif not Path(self.source).exists():
            raise ConfigError(f"config key 'data.source' points to {self.source!r}, which does not exist; allowed: "
                              "an IDX folder, an image folder, a Parquet file or folder, or \"\" for Fashion-MNIST")

    def find_idx(self, download: bool = True) -> Path:
        """The IDX folder: ``source``, else Fashion-MNIST found on this machine, else (when ``data.download``
        and ``download``) downloaded into ``data_dir``; a failure names the keys that govern the download."""
        from vaegan import data as vdata  # torch and torchvision: only where an IDX source is read
        allowed = download and self.download
        try:
            return vdata.find_idx_dir(self.source or None, self.data_dir, search_dirs=vdata.DEFAULT_IDX_DIRS,
                                      allow_download=allowed, download_timeout_s=self.download_timeout_s)
        except vdata.DatasetNotFoundError as err:
            if self.source or not download:
                raise
            keys = (f"data.download=true, data.download_timeout_s={self.download_timeout_s:g}" if self.download
                    else "data.download=false")
            raise vdata.DatasetNotFoundError(f"with config keys {keys}: {err}") from None


@dataclass
class TrainRunConfig(TrainConfig):
    num_workers: int = 1  # Ray Train workers, each one DDP rank
    cpus_per_worker: int = 1  # CPUs each worker reserves; Ray sets its torch threads to this
    use_gpu: bool = False
    checkpoint_every: int = 1  # epochs between checkpoints
    num_to_keep: int = 2
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    patience: int = 0  # early stopping: epochs without validation improvement (0 disables)
    val_images: int = 1000  # validation images for the per-epoch ELBO and FID
    # With RAY_ADDRESS: warn, instead of refusing, when the cluster's nodes now cannot hold the run (true for a
    # cluster whose autoscaler will add them; the run waits until it does).
    wait_for_autoscaler: bool = False

    def validate(self) -> None:
        super().validate()
        _require(self.num_workers > 0, "train.num_workers", self.num_workers, "a positive integer")
        _require(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker, "a positive integer")
        _require(self.checkpoint_every > 0, "train.checkpoint_every", self.checkpoint_every, "a positive integer")
        _require(self.num_to_keep > 0, "train.num_to_keep", self.num_to_keep, "a positive integer")
        _require(self.max_failures >= 0, "train.max_failures", self.max_failures, "an integer >= 0")
        _require(self.patience >= 0, "train.patience", self.patience, "an integer >= 0")
        _require(self.val_images >= 16, "train.val_images", self.val_images, "an integer >= 16")


@dataclass
class TuneConfig:
    enabled: bool = True
    num_samples: int = 4  # trials drawn from tune/space.py
    max_epochs: int = 2  # ASHA's max_t
    grace_period: int = 1
    reduction_factor: int = 2
    train_limit: int = 0  # training rows each trial reads (0 = all)
    seed: int = 0
    max_concurrent: int = 0  # trials at once; 0: as many as the cluster's CPUs (or GPUs) hold
    cpus_per_worker: int = 0  # CPUs of each trial's Train workers; 0: train.cpus_per_worker's
    # Keys the YAML file or --set gives are left as given, not searched, unless listed here ("loss.gamma").
    search_keys: list[str] = field(default_factory=list)
    # asha: asynchronous successive halving over fresh trials; sha: synchronous successive halving, whose trials
    # pause at each rung until all have reached it (a cost fixed by num_samples and the rungs, in any order);
    # pbt: population-based training, whose trials take over a better trial's checkpoint and perturb their loss
    # weights and learning rates every perturbation_interval epochs
    scheduler: Literal["asha", "sha", "pbt"] = "asha"
    perturbation_interval: int = 1  # epochs between PBT's exploit/explore decisions
    # random: draws from tune/space.py; optuna: Optuna's TPE sampler, multi-objective when objectives has two
    search: Literal["random", "optuna"] = "random"
    objectives: list[str] = field(default_factory=lambda: ["val/fid"])  # the first one ranks trials for ASHA/PBT
    # With several objectives, the winner is the best first objective among the trials whose every other
    # objective is within this factor of that objective's best (README, "Sweeps and evaluation")
    objective_tolerance: float = 1.25

    def validate(self) -> None:
        _require(self.num_samples > 0, "tune.num_samples", self.num_samples, "a positive integer")
        _require(self.max_epochs > 0, "tune.max_epochs", self.max_epochs, "a positive integer")
        _require(0 < self.grace_period <= self.max_epochs, "tune.grace_period", self.grace_period,
                 f"an integer in [1, tune.max_epochs={self.max_epochs}]")
        _require(self.reduction_factor >= 2, "tune.reduction_factor", self.reduction_factor, "an integer >= 2")
        _require(self.train_limit >= 0, "tune.train_limit", self.train_limit, "an integer >= 0")
        _require(self.max_concurrent >= 0, "tune.max_concurrent", self.max_concurrent,
                 "an integer >= 0 (0: as many as fit)")
        _require(self.cpus_per_worker >= 0, "tune.cpus_per_worker", self.cpus_per_worker,
                 "an integer >= 0 (0: train.cpus_per_worker's)")
        for key in self.search_keys:
            _require(key.count(".") == 1, "tune.search_keys", key, "keys in the --set form, e.g. loss.gamma")
        _require(0 < self.perturbation_interval <= self.max_epochs, "tune.perturbation_interval",
                 self.perturbation_interval, f"an integer in [1, tune.max_epochs={self.max_epochs}]")
        _require(bool(self.objectives) and len(set(self.objectives)) == len(self.objectives), "tune.objectives",
                 self.objectives, "a non-empty list of distinct metric names, e.g. [val/fid, val/recon_mse]")
        _require(len(self.objectives) == 1 or self.search == "optuna", "tune.objectives", self.objectives,
                 "one metric unless tune.search=optuna (random draws have no use for a second objective)")
        _require(self.search == "random" or self.scheduler == "asha", "tune.search", self.search,
                 f"'random' with tune.scheduler={self.scheduler} (PBT explores by perturbing its population, not "
                 "by a sampler; SHA creates trials as slots free, through Tune's variant generator)")
        _require(self.objective_tolerance >= 1, "tune.objective_tolerance", self.objective_tolerance,
                 "a factor >= 1")


@dataclass
class EvalConfig:
    num_images: int = 2000  # test images (and as many samples) for FID, KID, precision/recall
    iwae_k: int = 64
    iwae_images: int = 256
    baseline_vae: bool = False  # also train and score the plain VAE with the same budget
    featnet_epochs: int = 2

    def validate(self) -> None:
        _require(self.num_images >= MIN_EVAL_IMAGES, "eval.num_images", self.num_images,
                 f"an integer >= {MIN_EVAL_IMAGES}")
        _require(self.iwae_k > 0, "eval.iwae_k", self.iwae_k, "a positive integer")
        _require(self.iwae_images > 0, "eval.iwae_images", self.iwae_images, "a positive integer")
        _require(self.featnet_epochs > 0, "eval.featnet_epochs", self.featnet_epochs, "a positive integer")


@dataclass
class RegisterConfig:
    model_name: str = "vaegan"
    alias: str = "champion"
    experiment: str = "vaegan"
    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db

    def validate(self) -> None:
        for key in ("model_name", "alias", "experiment"):
            _require(bool(getattr(self, key).strip()), f"register.{key}", getattr(self, key), "a non-empty string")
        alias = self.alias
        _require(re.fullmatch(r"[\w\-]{1,255}", alias) is not None and alias.lower() != "latest"
                 and re.fullmatch(r"[vV]\d+", alias) is None, "register.alias", alias, ALIAS_RULE)
        name = self.model_name
        _require(not any(c in name for c in "/:") and posixpath.normpath(name) == name and name != "."
                 and not name.startswith(".."), "register.model_name", name, MODEL_NAME_RULE)


@dataclass
class PipelineConfig(VAEGANConfig):
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainRunConfig = field(default_factory=TrainRunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    # Filled by load_config, not written by users: the keys ("section.name") that the YAML file or --set
    # gave, so that the sweep leaves them as given (tune.search_keys overrides).
    given_keys: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        for section in (self.data, self.tune, self.eval, self.register):
            section.validate()

    def core(self) -> VAEGANConfig:
        """The part ``vaegan/`` knows about, as its own dataclass (what checkpoints store); the sections are
        shared, not copied, and ``train`` keeps only the library's fields."""
        core_train = TrainConfig(**{f.name: getattr(self.train, f.name) for f in dataclasses.fields(TrainConfig)})
        return VAEGANConfig(model=self.model, loss=self.loss, opt_enc=self.opt_enc, opt_dec=self.opt_dec,
                            opt_dis=self.opt_dis, train=core_train)


def check_batch_fits(cfg: PipelineConfig, train_rows: int, what: str) -> None:
    """Each Train worker gets at least one batch: Ray Train splits the train split equally, ``train_rows //
    train.num_workers`` rows each, and workers drop their last partial batch, so a larger batch would train
    zero steps an epoch without a word. ``what`` says where ``train_rows`` comes from."""
    per_worker = train_rows // cfg.train.num_workers
    if cfg.train.batch_size > per_worker:
        raise ConfigError(f"config key 'train.batch_size' has invalid value {cfg.train.batch_size}; allowed: at most "
                          f"{per_worker} ({what}, shared by train.num_workers={cfg.train.num_workers})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is read as YAML (numbers, booleans)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=3), got {text!r}")
    return key.strip().split("."), read_yaml(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config, apply ``--set`` overrides and validate; errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {problem} (configs shipped: {shipped})")
    try:
        data = read_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        data = apply_overrides(data, overrides or [])
        data["given_keys"] = sorted(key for key in flatten(data) if "." in key)
        return from_dict(PipelineConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def stable_hash(*parts: Any) -> str:
    """A short content hash of JSON-able parts: the cache key of a step's outputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"gamma": 1.0}} -> {"loss.gamma": 1.0}: the --set form, for reports and MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested ``base`` with nested ``overrides`` applied on top."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
