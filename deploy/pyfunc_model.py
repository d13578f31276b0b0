"""The MLflow pyfunc of a trained VAE-GAN, logged as code ("models from code"), never pickled.

MLflow stores this file with the model and runs it at load time; the weights come from the
``checkpoint`` artifact through ``torch.load(weights_only=True)``, so loading needs neither
cloudpickle nor MLFLOW_ALLOW_PICKLE_DESERIALIZATION. The ``vaegan`` package travels with the
model as a code path, so a fresh environment only needs torch, torchvision, scipy and mlflow.

Modes (chosen by the request's params):
- ``sample``: ``num_samples`` (1..MAX_SAMPLES) images with ``seed``, z drawn from ``prior``: ``standard``
  (N(0, I), the default) or ``fitted`` (the Gaussian mixture fitted to the training set's posterior means,
  which the checkpoint carries); the input is an empty (0, C, H, W) float32 array, present only because the
  signature declares a tensor input.
- ``encode``: images (N, C, H, W) float32 in [0, 1] -> posterior means (N, latent_dim).
- ``reconstruct``: images (N, C, H, W) float32 in [0, 1] -> reconstructions, same shape, in [0, 1].
- ``interpolate``: the first two images (2, C, H, W) -> ``steps`` (2..MAX_STEPS) images decoded along the
  straight line between their latents, (steps, C, H, W) in [0, 1].
"""
from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

# Bad requests raise MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers those with a 400 that
# carries our message, where any other exception becomes a generic "unexpected error".
_bad_request = MlflowException.invalid_parameter_value
MODES = ("sample", "encode", "reconstruct", "interpolate")
MAX_SAMPLES = 1024  # per request: bounds a server's memory and latency
MAX_IMAGES = 1024
MAX_STEPS = 256


class VAEGANPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from vaegan.checkpoint import load_checkpoint
        from vaegan.inference import GenerativeModel

        # No global torch.set_grad_enabled(False): loading a model into a user's Python session must not
        # switch off autograd for the rest of it. GenerativeModel's methods run under inference_mode.
        self.model = GenerativeModel.from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        params = params or {}
        mode = params.get("mode", "sample")
        if mode not in MODES:
            raise _bad_request(f"params.mode={mode!r} is not one of {list(MODES)}")
        if mode == "sample":
            num = int(params.get("num_samples", 16))
            if not 1 <= num <= MAX_SAMPLES:
                raise _bad_request(f"params.num_samples={num} is outside the allowed range 1..{MAX_SAMPLES}")
            return self._sample(num, int(params.get("seed", 0)), str(params.get("prior", "standard")))
        images = self._images(model_input)
        if mode == "encode":
            return self.model.encode(images).numpy().astype(np.float32)
        if mode == "interpolate":
            return self._interpolate(images, int(params.get("steps", 8)))
        return self.model.reconstruct(images).numpy().astype(np.float32)

    def _sample(self, num: int, seed: int, prior: str) -> np.ndarray:
        from vaegan.inference import PriorError

        try:
            return self.model.sample(num, seed=seed, prior=prior).numpy().astype(np.float32)
        except PriorError as err:
            raise _bad_request(f"params.prior: {err}") from err

    def _interpolate(self, images: torch.Tensor, steps: int) -> np.ndarray:
        if len(images) < 2:
            raise _bad_request(f"mode 'interpolate' needs two input images, got {len(images)}")
        if not 2 <= steps <= MAX_STEPS:
            raise _bad_request(f"params.steps={steps} is outside the allowed range 2..{MAX_STEPS}")
        return self.model.interpolate(images[0], images[1], steps).numpy().astype(np.float32)

    def _images(self, model_input) -> torch.Tensor:
        array = np.asarray(model_input)
        expected = self.model.image_shape
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise _bad_request(f"input images have shape {array.shape}; expected (N, {', '.join(map(str, expected))})")
        if not 1 <= len(array) <= MAX_IMAGES:
            raise _bad_request(f"input holds {len(array)} images; allowed: 1..{MAX_IMAGES}")
        if array.dtype != np.float32:
            raise _bad_request(f"input dtype is {array.dtype}; expected float32 in [0, 1]")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise _bad_request("input pixel values must be finite and in [0, 1]")
        return torch.from_numpy(np.array(array, copy=True))


mlflow.models.set_model(VAEGANPyfunc())
