"""The alias moves only for a better model on the same data, against a real MLflow server."""
import pytest
from mlflow.tracking import MlflowClient

from pipelines import registry, tracking
from pipelines.config import RegisterConfig
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
