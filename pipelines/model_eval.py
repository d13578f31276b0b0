"""``vaegan evaluate``: score a registered model on a data split, the way the pipeline's evaluate step does.

Inputs:  a model URI (``models:/NAME@ALIAS``), data (a run folder, a preprocess folder, or a source
         that Ray Data preprocesses first; default Fashion-MNIST), a split and a number of images.
Outputs: ``<out>/metrics.json`` (the core metrics, the feature net, the sample count and seeds) and
         samples.png, reconstructions.png (a fixed set of split images beside their reconstructions),
         interpolation.png, loss_curves.png (when the checkpoint carries a training history);
         with ``log``, all of them in the model's MLflow run under ``evaluate-<split>/``.
Run it:  ``vaegan evaluate --model models:/vaegan-fashion-mnist@champion --data runs/default --n 10000``
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from deploy.pull import PullError, download_through_the_server
from vaegan.atomic import write_json
from vaegan.checkpoint import CHECKPOINT_NAME, config_of, load_checkpoint
from vaegan.config import ConfigError, from_dict
from vaegan.inference import GenerativeModel

from . import plots, tracking
from . import shards
from .cluster import connect_ray
from .config import DataConfig, EvalConfig, PipelineConfig
from .steps import preprocess
from .steps.evaluate import score_checkpoint
from .steps.train import write_grids

MANIFEST = "manifest.json"
# In every folder `vaegan evaluate` creates. Only a folder holding it is ever cleared; a non-empty folder
# without it is the user's, and nothing is written into it.
OWNER_MARK = ".vaegan-evaluate"


@dataclasses.dataclass
class EvaluateRequest:
    model_uri: str
    out: Path
    data: str = ""  # run folder, preprocess folder or source; "" = Fashion-MNIST
    split: str = "test"
    num_images: int = 10000
    seed: int = 0
    prior: str = "standard"  # vaegan.prior.PRIORS: the sampler of the sample-quality figures and samples.png
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: bool = False


def download_checkpoint(model_uri: str, dst: Path) -> dict[str, Any]:
    """The registered model's weights (``torch.load(weights_only=True)``), without running its code."""
    download_through_the_server()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as err:
        raise PullError(f"cannot download model {model_uri!r} from {mlflow.get_tracking_uri()}: "
                        f"{str(err).splitlines()[0]}") from err
    found = sorted(local.rglob(CHECKPOINT_NAME))
    if not found:
        raise PullError(f"model {model_uri!r} has no {CHECKPOINT_NAME} artifact; expected one registered by `vaegan run`")
    return load_checkpoint(found[0])


def preprocessed_data(data: str, cfg: PipelineConfig, out: Path) -> preprocess.Outputs:
    """A preprocess folder (Parquet splits + manifest) with the model's image shape."""
    path = Path(data) if data else None
    shape = [cfg.model.channels, cfg.model.image_size, cfg.model.image_size]
    if path is not None and (path / MANIFEST).is_file():
        candidates = [path]
    elif path is not None and path.is_dir() and any(path.glob(f"preprocess-*/{MANIFEST}")):
        candidates = sorted((p.parent for p in path.glob(f"preprocess-*/{MANIFEST}")),
                            key=lambda p: p.stat().st_mtime, reverse=True)
    else:  # a source: preprocess it with Ray Data as the pipeline would
        target = fresh_folder(out / "preprocess", "--out's preprocess folder")
        connect_ray()
        data_cfg = DataConfig(source=str(path.resolve()) if path else "")
        data_cfg.validate()
        data_cfg.check_source()
        return preprocess.Outputs(manifest=shards.run(data_cfg, cfg.model, target), folder=str(target))
    for candidate in candidates:
        manifest = json.loads((candidate / MANIFEST).read_text())
        if manifest["image_shape"] == shape:
            return preprocess.Outputs(manifest=manifest, folder=str(candidate))
    raise ConfigError(f"--data {data!r} holds no preprocessed data of the model's shape {shape}")


def claim_folder(path: Path, what: str) -> Path:
    """``path`` as a folder of ours: created, or empty, or marked by an earlier `vaegan evaluate`. A folder
    holding anything else is refused before anything is written."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file; allowed: a new or empty folder, or one an earlier "
                          "`vaegan evaluate` wrote")
    if path.is_dir() and not (path / OWNER_MARK).is_file():
        held = sorted(p.name for p in path.iterdir())
        if held:
            raise ConfigError(f"{what} {str(path)!r} holds files `vaegan evaluate` did not write ({', '.join(held[:3])}"
                              f"{', ...' if len(held) > 3 else ''}); allowed: a new or empty folder, or one an "
                              f"earlier `vaegan evaluate` wrote (it holds {OWNER_MARK})")
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNER_MARK).touch()
    return path


def fresh_folder(path: Path, what: str) -> Path:
    """An empty folder of ours at ``path``: one an earlier `vaegan evaluate` wrote is cleared (write_parquet
    would add to it); anyone else's is refused by ``claim_folder``."""
    if (path / OWNER_MARK).is_file():
        shutil.rmtree(path)
    return claim_folder(path, what)


def evaluate(request: EvaluateRequest) -> dict[str, Any]:
    claim_folder(request.out, "--out folder")
    with tempfile.TemporaryDirectory() as tmp:
        state = download_checkpoint(request.model_uri, Path(tmp))
    model = GenerativeModel.from_checkpoint(state)
    model.check_prior(request.prior)  # before any data is read or preprocessed
    eval_cfg = dataclasses.replace(request.eval, num_images=request.num_images)
    cfg = from_dict(PipelineConfig, {**dataclasses.asdict(config_of(state)), "eval": dataclasses.asdict(eval_cfg)})
    data = preprocessed_data(request.data, cfg, request.out)
    counts = data.manifest["counts"]
    if counts.get(request.split, 0) < shards.MIN_SPLIT_ROWS:  # precision/recall's k-NN needs more than k=3
        raise ConfigError(f"--split {request.split!r} has {counts.get(request.split, 0)} images in {data.path} "
                          f"(counts: {counts}); allowed: a split of at least {shards.MIN_SPLIT_ROWS} images")
    featnet, featnet_name = data.feature_net(str(Path(cfg.data.data_dir) / "featnets"), cfg.eval)
    scores = score_checkpoint(cfg.eval, state, data, featnet, seed=request.seed, split=request.split,
                              prior=request.prior)
    pngs = write_grids(model, data, request.out, seed=request.seed, split=request.split, prior=request.prior)
    history = json.loads(state.get("history", "[]"))
    if history:
        pngs.append(plots.loss_curves(history, request.out / "loss_curves.png"))
    report = {"model_uri": request.model_uri, "metrics": scores, "feature_net": featnet_name,
              "data": {"dir": str(data.path), "fingerprint": data.manifest["fingerprint"], "split": request.split},
              "num_images": min(request.num_images, counts[request.split]),
              "seeds": {"samples": request.seed, "iwae": request.seed}, "prior": request.prior,
              "iwae": {"k": cfg.eval.iwae_k, "images": cfg.eval.iwae_images},
              "pngs": [p.name for p in pngs]}
    write_json(request.out / "metrics.json", report)
    if request.log:
        report["logged_to_run"] = log_to_model_run(request, scores, [request.out / "metrics.json", *pngs])
        write_json(request.out / "metrics.json", report)
    return report


def log_to_model_run(request: EvaluateRequest, scores: dict[str, float], files: list[Path]) -> str:
    """Metrics and files into the MLflow run that produced the model version."""
    run_id = mlflow.models.get_model_info(request.model_uri).run_id
    prefix = f"evaluate-{request.split}"
    uri = mlflow.get_tracking_uri()
    tracking.log_metrics(uri, run_id, {f"{prefix}/{name}": value for name, value in scores.items()})
    tracking.log_artifacts(uri, run_id, files, prefix)
    return run_id
