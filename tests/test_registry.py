"""The alias moves only for a better model on the same data, against a real MLflow server."""
import dataclasses
import http.client
import http.server
import json
import threading
import urllib.parse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from deploy.pyfunc_model import VAEGANPyfunc
from pipelines import registry, tracking
from pipelines.config import PipelineConfig, RegisterConfig
from pipelines.context import RunContext
from pipelines.steps import evaluate, preprocess, train
from pipelines.steps import register as register_step
from vaegan.checkpoint import save_checkpoint
from vaegan.config import VAEGANConfig
from vaegan.nets import build_nets
from vaegan.step import VAEGANTrainer


@pytest.fixture
def checkpoint(tmp_path):
    cfg = VAEGANConfig()
    cfg.model.latent_dim, cfg.model.base_channels = 4, 4
    return save_checkpoint(tmp_path / "checkpoint.pt", VAEGANTrainer(cfg, *build_nets(cfg.model)))


def test_only_a_better_model_on_the_same_data_takes_the_alias(mlflow_server, checkpoint, tmp_path):
    cfg = RegisterConfig(model_name="alias-test", alias="champion", experiment="registry-test")
    experiment = tracking.ensure_experiment(mlflow_server, cfg.experiment, tmp_path)

    def register(fid: float, fingerprint: str = "data-a") -> dict:
        run_id = tracking.start_run(mlflow_server, experiment, "train")
        return registry.register(cfg, mlflow_server, run_id=run_id, checkpoint=checkpoint, metrics={"fid": fid},
                                 feature_net="domain-cnn@x", fingerprint=fingerprint, image_shape=[1, 28, 28])

    client = MlflowClient(mlflow_server)
    assert register(10.0)["alias_moved"] is True
    worse = register(12.0)
    assert worse["alias_moved"] is False and worse["model_uri"] == "models:/alias-test/2"
    assert "does not beat" in worse["alias_reason"]
    assert client.get_model_version_by_alias("alias-test", "champion").version == "1"
    other_data = register(1.0, fingerprint="data-b")
    assert other_data["alias_moved"] is False and "other data" in other_data["alias_reason"]
    better = register(8.0)
    assert better["alias_moved"] is True and better["model_uri"] == "models:/alias-test@champion"
    assert client.get_model_version_by_alias("alias-test", "champion").version == str(better["model_version"])


class RefusingProxy(http.server.ThreadingHTTPServer):
    """A proxy in front of the real MLflow server that answers ``status`` to every read of an alias
    (``GET /api/2.0/mlflow/registered-models/alias``) and forwards everything else."""

    def __init__(self, upstream: str, status: int):
        self.upstream, self.status = urllib.parse.urlsplit(upstream).netloc, status
        super().__init__(("127.0.0.1", 0), ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: RefusingProxy

    def log_message(self, *args) -> None:
        pass

    def forward(self) -> None:
        if self.path.startswith("/api/2.0/mlflow/registered-models/alias") and self.command == "GET":
            body = json.dumps({"error_code": "PERMISSION_DENIED", "message": "Permission denied"}).encode() \
                if self.server.status == 403 else b"<html>Internal Server Error</html>"
            self.reply(self.server.status, [("Content-Type", "application/json" if self.server.status == 403
                                             else "text/html")], body)
            return
        connection = http.client.HTTPConnection(self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "transfer-encoding", "content-length")}
        connection.request(self.command, self.path, body=self.body(), headers=headers)
        response = connection.getresponse()
        self.reply(response.status, [(k, v) for k, v in response.getheaders()
                                     if k.lower() not in ("transfer-encoding", "connection", "content-length")],
                   response.read())
        connection.close()

    def body(self) -> bytes:
        """The request's body; requests sends an empty file's upload chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(chunks)

    def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward


@pytest.mark.parametrize("status", [403, 500])
def test_an_unreadable_alias_fails_the_step_and_leaves_the_alias(mlflow_server, checkpoint, tmp_path, status):
    """Only "alias not set" means "no holder": a refusal or a server error while reading the holder must not
    hand the alias to a worse model."""
    name = f"alias-unreadable-{status}"
    cfg = RegisterConfig(model_name=name, alias="champion", experiment="registry-test")
    experiment = tracking.ensure_experiment(mlflow_server, cfg.experiment, tmp_path)

    def register(uri: str, fid: float) -> dict:
        return registry.register(cfg, uri, run_id=tracking.start_run(uri, experiment, "train"), checkpoint=checkpoint,
                                 metrics={"fid": fid}, feature_net="domain-cnn@x", fingerprint="data-a",
                                 image_shape=[1, 28, 28])

    assert register(mlflow_server, 10.0)["alias_moved"] is True
    proxy = RefusingProxy(mlflow_server, status)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with pytest.raises(tracking.TrackingError) as raised:
            register(proxy.url, 12.0)  # worse: must not take the alias whatever the server says
    finally:
        proxy.shutdown()
        proxy.server_close()
    message = str(raised.value)
    assert "\n" not in message
    assert proxy.url in message and f"model '{name}'" in message and "alias 'champion'" in message
    assert MlflowClient(mlflow_server).get_model_version_by_alias(name, "champion").version == "1"


def test_the_register_step_on_another_registry_logs_the_model_into_a_run_there(mlflow_server, checkpoint, tmp_path):
    """The register step reruns when the tracking URI changes (its key holds it), but the cached train step's
    MLflow run lives on the old server: the model goes into a run of its own on the new one."""
    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, register=RegisterConfig(model_name="moved-registry", experiment="registry-test"))
    experiment = tracking.ensure_experiment(mlflow_server, "registry-test", tmp_path)
    parent = tracking.start_run(mlflow_server, experiment, "pipeline")
    ctx = RunContext(run_dir=str(tmp_path), tracking_uri=mlflow_server, experiment_id=experiment,
                     parent_run_id=parent, step_key="abc")
    inputs = register_step.Inputs(
        preprocess=preprocess.Outputs(manifest={"fingerprint": "data-a", "image_shape": [1, 28, 28]}),
        train=train.Outputs(checkpoint=checkpoint.name, mlflow_run_id="0123456789abcdef0123456789abcdef",
                            best_epoch=1, epochs_run=1, val_fid=1.0, faults={}, config={}, folder=str(checkpoint.parent)),
        evaluate=evaluate.Outputs(metrics={"fid": 3.0}, feature_net="none", num_images=8))
    outputs = register_step.run(cfg, ctx, inputs, tmp_path)
    assert outputs.model_uri == "models:/moved-registry@champion"
    version = MlflowClient(mlflow_server).get_model_version("moved-registry", str(outputs.model_version))
    run = MlflowClient(mlflow_server).get_run(version.run_id)
    assert run.info.run_name == "register-abc" and run.data.tags[tracking.PARENT_TAG] == parent
    assert run.info.status == "FINISHED"


def test_loading_the_pyfunc_leaves_autograd_on_in_the_callers_process(checkpoint):
    """A user who loads the model into a training session keeps their gradients (the predictions themselves run
    under inference_mode)."""
    model = VAEGANPyfunc()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}))
    samples = model.predict(None, np.zeros((1, 1, 28, 28), np.float32), params={"mode": "sample", "num_samples": 2})
    assert samples.shape == (2, 1, 28, 28)
    assert torch.is_grad_enabled()
