"""The MLflow Model Registry, for the register step (``steps/register.py``): log the chosen checkpoint as a
pickle-free pyfunc, register a version, and move the alias only when the new version beats the current holder.

The comparison uses the test domain FID on the same data fingerprint; a champion scored on other
data is not comparable, so the alias stays where it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import vaegan

from . import tracking
from .config import RegisterConfig

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "deploy" / "pyfunc_model.py"
SCORE_TAG, FINGERPRINT_TAG = "test_fid", "data_fingerprint"


def signature(image_shape: list[int]) -> ModelSignature:
    """Tensor in, tensor out; the params pick the mode."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]),
        params=ParamSchema([ParamSpec("mode", "string", "sample"), ParamSpec("num_samples", "long", 16),
                            ParamSpec("seed", "long", 0), ParamSpec("steps", "long", 8),
                            ParamSpec("prior", "string", "standard")]))


def requirements() -> list[str]:
    import scipy
    import torch
    import torchvision
    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"scipy=={scipy.__version__}", f"mlflow=={mlflow.__version__}", "numpy"]


@tracking.names_an_unreachable_server
def log_pyfunc(uri: str, run_id: str, checkpoint: Path, image_shape: list[int]) -> str:
    """Log the pyfunc into ``run_id``; returns its model URI."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(vaegan.__file__).parent)], signature=signature(image_shape),
            pip_requirements=requirements())
    return info.model_uri


def champion(client: MlflowClient, uri: str, name: str, alias: str):
    """The version holding ``alias``, or None when the alias is not set. Any other failure to read it (a
    refusal, a server error, a timeout) raises: taking it for "no holder" would hand the alias to a model
    that may be worse than the one holding it."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if alias_not_set(err, alias):
            return None
        reason = str(err).splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise tracking.TrackingError(
            f"MLflow tracking server {uri}: cannot read which version of model {name!r} holds alias {alias!r} "
            f"({reason}); the alias is left where it was: rerun once this user can read the model's aliases "
            "on that server") from err


def alias_not_set(err: MlflowException, alias: str) -> bool:
    """Whether ``err`` says only that ``alias`` is not set. MLflow's stores answer INVALID_PARAMETER_VALUE
    "Registered model alias X not found." for that; RESOURCE_DOES_NOT_EXIST is the not-found code."""
    if err.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return err.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in str(err)


def alias_decision(current, score: float, fingerprint: str) -> tuple[bool, str]:
    """Whether a new version with ``score`` (lower is better) on ``fingerprint`` should take the alias."""
    if current is None:
        return True, "no current holder"
    if current.tags.get(FINGERPRINT_TAG) != fingerprint:
        return False, f"holder v{current.version} was scored on other data ({current.tags.get(FINGERPRINT_TAG)})"
    held = float(current.tags.get(SCORE_TAG, "inf"))
    if score < held:
        return True, f"test FID {score:.4f} beats holder v{current.version}'s {held:.4f}"
    return False, f"test FID {score:.4f} does not beat holder v{current.version}'s {held:.4f}"


def register(cfg: RegisterConfig, uri: str, *, run_id: str, checkpoint: Path, metrics: dict[str, float],
             feature_net: str, fingerprint: str, image_shape: list[int]) -> dict[str, Any]:
    model_uri = log_pyfunc(uri, run_id, checkpoint, image_shape)
    version, move, reason = new_version(uri, cfg, model_uri, checkpoint, tags={
        SCORE_TAG: str(metrics["fid"]), FINGERPRINT_TAG: fingerprint, "feature_net": feature_net})
    print(f"[register] {cfg.model_name} v{version}: alias '{cfg.alias}' "
          f"{'moved' if move else 'kept'} ({reason})", flush=True)
    return {"model_name": cfg.model_name, "model_version": int(version), "alias": cfg.alias,
            "alias_moved": move, "alias_reason": reason,
            "model_uri": f"models:/{cfg.model_name}@{cfg.alias}" if move
            else f"models:/{cfg.model_name}/{version}"}


@tracking.names_an_unreachable_server
def new_version(uri: str, cfg: RegisterConfig, model_uri: str, checkpoint: Path,
                tags: dict[str, str]) -> tuple[str, bool, str]:
    """Register ``model_uri`` as a new version; move the alias to it if it beats the holder and its
    artifacts are verifiably complete. Returns the version, whether the alias moved, and why."""
    client = tracking.client(uri)
    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags).version
    missing = missing_artifacts(f"models:/{cfg.model_name}/{version}", checkpoint)
    if missing:
        return version, False, f"v{version}'s artifacts are incomplete ({missing}); the alias stays where it was"
    move, reason = alias_decision(champion(client, uri, cfg.model_name, cfg.alias), float(tags[SCORE_TAG]),
                                  tags[FINGERPRINT_TAG])
    if move:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    return version, move, reason


def missing_artifacts(model_uri: str, checkpoint: Path) -> str:
    """What the model at ``model_uri`` lacks (empty when complete): MLmodel, and the checkpoint at its full size."""
    stored = {f.path: f.file_size for f in mlflow.artifacts.list_artifacts(artifact_uri=model_uri)}
    stored.update({f.path: f.file_size for f in mlflow.artifacts.list_artifacts(artifact_uri=f"{model_uri}/artifacts")})
    problems = [] if "MLmodel" in stored else ["MLmodel missing"]
    size = stored.get(f"artifacts/{checkpoint.name}")
    if size != checkpoint.stat().st_size:
        problems.append(f"artifacts/{checkpoint.name} has {size} of {checkpoint.stat().st_size} bytes")
    return "; ".join(problems)
