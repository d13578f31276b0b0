"""The MLflow pyfunc of a trained VAE-GAN, logged as code ("models from code"), never pickled.

MLflow stores this file with the model and runs it at load time; the weights come from the
``checkpoint`` artifact through ``torch.load(weights_only=True)``, so loading needs neither
cloudpickle nor MLFLOW_ALLOW_PICKLE_DESERIALIZATION. The ``vaegan`` package travels with the
model as a code path, so a fresh environment only needs torch, torchvision, scipy and mlflow.

Modes (chosen by the request's params):
- ``sample``: ``num_samples`` (1..MAX_SAMPLES) images from the prior with ``seed``; the input is an
  empty (0, C, H, W) float32 array, present only because the signature declares a tensor input.
- ``encode``: images (N, C, H, W) float32 in [0, 1] -> posterior means (N, latent_dim).
- ``reconstruct``: images (N, C, H, W) float32 in [0, 1] -> reconstructions, same shape, in [0, 1].
"""
from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

MODES = ("sample", "encode", "reconstruct")
MAX_SAMPLES = 1024  # per request: bounds a server's memory and latency
MAX_IMAGES = 1024


class VAEGANPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from vaegan.checkpoint import load_checkpoint
        from vaegan.inference import GenerativeModel

        torch.set_grad_enabled(False)
        self.model = GenerativeModel.from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        params = params or {}
        mode = params.get("mode", "sample")
        if mode not in MODES:
            raise ValueError(f"params.mode={mode!r} is not one of {list(MODES)}")
        if mode == "sample":
            num = int(params.get("num_samples", 16))
            if not 1 <= num <= MAX_SAMPLES:
                raise ValueError(f"params.num_samples={num} is outside the allowed range 1..{MAX_SAMPLES}")
            return self.model.sample(num, seed=int(params.get("seed", 0))).numpy().astype(np.float32)
        images = self._images(model_input)
        if mode == "encode":
            return self.model.encode(images).numpy().astype(np.float32)
        return self.model.reconstruct(images).numpy().astype(np.float32)

    def _images(self, model_input) -> torch.Tensor:
        array = np.asarray(model_input)
        expected = self.model.image_shape
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise ValueError(f"input images have shape {array.shape}; expected (N, {', '.join(map(str, expected))})")
        if not 1 <= len(array) <= MAX_IMAGES:
            raise ValueError(f"input holds {len(array)} images; allowed: 1..{MAX_IMAGES}")
        if array.dtype != np.float32:
            raise ValueError(f"input dtype is {array.dtype}; expected float32 in [0, 1]")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("input pixel values must be finite and in [0, 1]")
        return torch.from_numpy(np.array(array, copy=True))


mlflow.models.set_model(VAEGANPyfunc())
