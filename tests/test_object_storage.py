"""The pipeline on object storage: a real S3 endpoint on 127.0.0.1 (``deploy/local_s3.py``, moto's server, with
credentials checked), a real `mlflow server` whose artifacts live in the bucket, and a real local Ray.

One run folder ``s3://BUCKET/run`` goes through the smoke DAG twice: the first driver is SIGKILLed, with the
local Ray it started, once Ray Train has recorded a checkpoint in the bucket; the second, on another Ray,
finishes from what the bucket holds. Then a third run changes nothing, and a process with no AWS credentials
pulls the registered model through the tracking server. Each driver runs in an empty working directory, which
must stay empty. A smoke run on ``gs://`` (a local GCS emulator, ``deploy/local_gcs.py``) checks that the same
code serves Google Cloud Storage. That second run, the runs from a source in the bucket and the one on
``gs://`` join one Ray head (``stores_ray``) instead of each starting a local Ray: its workers hold the
stores' settings, as a cluster's nodes or a job's runtime env would.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import BIN, BUCKET, REPO, bucket_fs, head_for_runs, objects, sigkill_session, without_mlflow_settings

SMOKE = str(REPO / "pipelines" / "configs" / "smoke.yaml")
# Three epochs, so that the kill after the first checkpoint leaves training to resume; a model name of its own.
RUN_ARGS = ("--set", "train.epochs=3", "--set", "register.model_name=vaegan-s3", "--set", "register.experiment=s3")


def vaegan(workdir: Path, env: dict[str, str], *args: str, background: bool = False):
    """`vaegan ARGS` from the empty ``workdir`` with only ``env``'s AWS and MLflow settings."""
    full_env = {k: v for k, v in without_mlflow_settings().items() if not k.startswith("AWS_")} | env
    command = [str(BIN / "vaegan"), *args]
    if background:  # its own session, so that a kill takes the local Ray it starts too
        log = open(workdir.parent / f"{workdir.name}.log", "w+", errors="replace")  # noqa: SIM115 (read by the fixture, mid-write)
        proc = subprocess.Popen(command, cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        proc.log = log
        return proc
    return subprocess.run(command, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=900)


def run_args(run_dir: str) -> list[str]:
    return ["run", "--config", SMOKE, *RUN_ARGS, "--run-dir", run_dir]


def registered_checkpoints(fs: pafs.S3FileSystem) -> list[str]:
    """The checkpoints Ray Train's controller recorded in the bucket: what a rerun resumes from."""
    for key in objects(fs, "run/ray"):
        if key.startswith("train-") and key.endswith("checkpoint_manager_snapshot.json"):
            with fs.open_input_stream(f"{BUCKET}/run/ray/{key}") as f:
                return [r["checkpoint_dir_name"] for r in json.loads(f.read())["checkpoint_results"]]
    return []


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A local GCS emulator (``deploy/local_gcs.py``) with BUCKET; the STORAGE_EMULATOR_HOST that reaches it."""
    from deploy.local_gcs import local_gcs
    with local_gcs(BUCKET, log=tmp_path_factory.mktemp("gcs") / "emulator.log") as env:
        yield env


@pytest.fixture(scope="module")
def stores_ray(s3, gcs):
    """A Ray head whose workers reach both stores (``head_for_runs`` with the S3 and GCS settings); the
    variables that join it."""
    with head_for_runs({**s3, **gcs}) as join:
        yield join


@pytest.fixture(scope="module")
def s3_run(s3, s3_mlflow, stores_ray, tmp_path_factory):
    env = {**s3, "MLFLOW_TRACKING_URI": s3_mlflow}
    fs, run_dir = bucket_fs(s3), f"s3://{BUCKET}/run"
    workdirs = [tmp_path_factory.mktemp(f"cwd-{n}") for n in range(3)]

    first = vaegan(workdirs[0], env, *run_args(run_dir), background=True)
    deadline = time.time() + 600
    while not registered_checkpoints(fs):
        first.log.seek(0)
        assert first.poll() is None and time.time() < deadline, f"no checkpoint in the bucket:\n{first.log.read()[-3000:]}"
        time.sleep(0.2)
    sigkill_session(first.pid)
    first.wait()
    first.log.seek(0)
    killed_output = first.log.read()
    after_kill = objects(fs, "run")

    second = vaegan(workdirs[1], {**env, **stores_ray}, *run_args(run_dir))  # on a Ray that outlives drivers
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    third = vaegan(workdirs[2], env, *run_args(run_dir))  # starts no Ray: every step is cached
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    with fs.open_input_stream(f"{BUCKET}/run/summary.json") as f:
        summary = json.loads(f.read())
    return {"env": env, "fs": fs, "workdirs": workdirs, "after_kill": after_kill, "killed_output": killed_output,
            "second": second, "third": third, "summary": summary}


def test_a_run_on_s3_writes_its_steps_and_summary_to_the_bucket_and_nothing_locally(s3_run):
    summary, stored = s3_run["summary"], objects(s3_run["fs"], "run")
    assert summary["run_dir"] == f"s3://{BUCKET}/run"
    assert summary["model_uri"] == "models:/vaegan-s3@champion" and summary["alias_moved"]
    for name, step in summary["steps"].items():
        assert f"{name}-{step['key']}/outputs.json" in stored, sorted(stored)
    key = summary["steps"]["train"]["key"]
    assert {f"train-{key}/checkpoint.pt", f"train-{key}/samples.png"} <= set(stored)
    assert any(k.startswith("featnets/featnet-") for k in stored), "the feature-net cache is not in the bucket"
    assert any(k.startswith("ray/tune-") for k in stored), "Tune's experiment is not in the bucket"
    assert [sorted(p.rglob("*")) for p in s3_run["workdirs"]] == [[], [], []]


def test_a_driver_killed_in_training_resumes_from_the_buckets_checkpoint(s3_run):
    after_kill, summary = s3_run["after_kill"], s3_run["summary"]
    train = f"train-{summary['steps']['train']['key']}/"
    assert not [k for k in after_kill if k.startswith(train)], "the killed train step looks complete"
    assert {"preprocess", "tune"} <= {k.split("-")[0] for k in after_kill if k.endswith("/outputs.json")}
    out = s3_run["second"].stdout
    assert '"status": "cached"' in out and "[train] resumed from epoch" in out, out[-3000:]
    assert summary["train_faults"]["restarts"] == 1


def test_a_rerun_on_s3_finds_every_step_complete(s3_run):
    third = s3_run["third"].stdout
    assert "nothing to run, so no Ray is started" in third
    steps = json.loads(third[third.index("{"):third.rindex("}") + 1])["steps"]
    assert {step["status"] for step in steps.values()} == {"cached"}


def test_the_keys_are_written_nowhere_in_the_bucket_the_output_or_mlflow(s3_run):
    """pyarrow reads the keys from each process's environment; none is passed on, so none can be written."""
    from mlflow.tracking import MlflowClient
    keys = [s3_run["env"]["AWS_ACCESS_KEY_ID"], s3_run["env"]["AWS_SECRET_ACCESS_KEY"]]
    fs, leaks = s3_run["fs"], []
    for prefix in ("run", "mlartifacts"):
        for key in objects(fs, prefix):
            with fs.open_input_stream(f"{BUCKET}/{prefix}/{key}") as f:
                content = f.read()
            leaks += [f"{prefix}/{key}" for secret in keys if secret.encode() in content]
    output = s3_run["killed_output"] + "".join(r.stdout + r.stderr for r in (s3_run["second"], s3_run["third"]))
    leaks += ["the drivers' output" for secret in keys if secret in output]
    client = MlflowClient(s3_run["env"]["MLFLOW_TRACKING_URI"])
    for run in client.search_runs([client.get_experiment_by_name("s3").experiment_id], max_results=1000):
        recorded = " ".join([*run.data.params.values(), *run.data.tags.values()])
        leaks += [f"MLflow run {run.info.run_name}" for secret in keys if secret in recorded]
    assert not leaks


def test_a_process_without_aws_credentials_pulls_the_model_through_the_server(s3_run, tmp_path):
    out = tmp_path / "samples.png"
    pulled = vaegan(tmp_path, {"MLFLOW_TRACKING_URI": s3_run["env"]["MLFLOW_TRACKING_URI"]},
                    "sample", "--model", "models:/vaegan-s3@champion", "--num", "8", "--out", str(out))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert out.stat().st_size > 0
    assert any(k.endswith("checkpoint.pt") for k in objects(s3_run["fs"], "mlartifacts")), "the model is not in the bucket"


@pytest.mark.parametrize("problem, change, expected", [
    ("a missing bucket", {"run_dir": "s3://no-such-bucket/run"}, "bucket 'no-such-bucket' does not exist"),
    ("bad credentials", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "the store refuses these credentials"),
    ("an endpoint that does not answer", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "the store cannot be reached"),
    ("no tracking server", {"MLFLOW_TRACKING_URI": ""}, "MLflow's sqlite store cannot live"),
    ("a data.source that is not there", {"set": f"data.source=s3://{BUCKET}/nowhere"},
     f"config key 'data.source' 's3://{BUCKET}/nowhere' at endpoint"),
])
def test_bad_storage_settings_fail_in_one_line_before_any_compute(s3, s3_mlflow, tmp_path, problem, change, expected):
    env = {**s3, "MLFLOW_TRACKING_URI": s3_mlflow, **change}
    run_dir = env.pop("run_dir", f"s3://{BUCKET}/bad-input")
    extra = ("--set", env.pop("set")) if "set" in env else ()
    result = vaegan(tmp_path, {k: v for k, v in env.items() if v}, *run_args(run_dir), *extra)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and expected in result.stderr, (problem, result.stderr[-2000:])
    assert "ray" not in result.stdout.lower() and not objects(bucket_fs(s3), "bad-input"), problem
    assert not list(tmp_path.iterdir())


def put_sources(fs: pafs.S3FileSystem, images: int = 300) -> None:
    """The same random 28 px grey images in the bucket twice: a Parquet file (``image`` as encoded PNG bytes,
    ``label``) and an image folder (one sub-folder per class)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(0)
    pngs, labels = [], rng.integers(0, 3, images)
    for index, label in enumerate(labels):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        with fs.open_output_stream(f"{BUCKET}/sources/images/class-{label}/{index:04d}.png") as f:
            f.write(pngs[-1])
    pq.write_table(pa.table({"image": pngs, "label": labels}), f"{BUCKET}/sources/data.parquet", filesystem=fs)


@pytest.mark.parametrize("source", ["data.parquet", "images"])
def test_a_source_on_s3_is_preprocessed_where_it_lives(s3, s3_mlflow, stores_ray, tmp_path, source):
    fs = bucket_fs(s3)
    if not objects(fs, "sources"):
        put_sources(fs)
    result = vaegan(tmp_path, {**s3, "MLFLOW_TRACKING_URI": s3_mlflow, **stores_ray}, "run", "--config", SMOKE,
                    "--steps", "preprocess", "--set", f"data.source=s3://{BUCKET}/sources/{source}",
                    "--set", "data.limit=0", "--run-dir", f"s3://{BUCKET}/from-{source}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with fs.open_input_stream(f"{BUCKET}/from-{source}/summary.json") as f:
        summary = json.loads(f.read())
    assert sum(summary["data_counts"].values()) == 300 and summary["image_shape"] == [1, 28, 28]
    key = summary["steps"]["preprocess"]["key"]
    assert any(k.startswith(f"preprocess-{key}/split=train/") for k in objects(fs, f"from-{source}"))
    assert not list(tmp_path.iterdir())


def test_a_run_on_gcs_keeps_its_steps_and_checkpoints_in_the_bucket_and_reruns_cached(gcs, stores_ray, mlflow_server,
                                                                                      tmp_path, monkeypatch):
    """The same codec, for gs://: pyarrow's GcsFileSystem under Ray Train, Ray Data and the DAG's manifests."""
    from pipelines import store
    env = {**gcs, "MLFLOW_TRACKING_URI": mlflow_server, **stores_ray}
    args = ["run", "--config", SMOKE, "--set", "tune.enabled=false", "--set", "register.model_name=vaegan-gcs",
            "--set", "register.experiment=gcs", "--run-dir", f"gs://{BUCKET}/run"]
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    first.mkdir(), rerun.mkdir()
    done = vaegan(first, env, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = vaegan(rerun, env, *args).stdout
    steps = json.loads(again[again.index("{"):again.rindex("}") + 1])["steps"]
    assert {step["status"] for step in steps.values()} == {"cached"}, again[-3000:]

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs["STORAGE_EMULATOR_HOST"])  # for this process's own look
    stored = objects(store.filesystem(f"gs://{BUCKET}")[0], "run")
    summary = json.loads(store.read_text(f"gs://{BUCKET}/run/summary.json"))
    assert summary["run_dir"] == f"gs://{BUCKET}/run" and summary["model_uri"] == "models:/vaegan-gcs@champion"
    for name, step in summary["steps"].items():
        assert f"{name}-{step['key']}/outputs.json" in stored, sorted(stored)
    assert any(k.startswith("ray/train-") and "/checkpoint_" in k for k in stored), "Ray Train's checkpoints"
    assert not list(first.iterdir()) and not list(rerun.iterdir())


# What pyarrow's GcsFileSystem raised here against an emulator port that nothing listens on, and the start of what
# it raises for a key that may not read the bucket.
GCS_UNREACHABLE = ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of PerformWork() - "
                   "CURL error [7]=Could not connect to server error_info={reason=, domain=, metadata={"
                   "gcloud-cpp.retry.on-entry=false, gcloud-cpp.retry.function=GetBucketMetadata, "
                   "gcloud-cpp.retry.reason=retry-policy-exhausted}")
GCS_DENIED = ("google::cloud::Status(PERMISSION_DENIED: Permanent error, with a last message of Received HTTP status "
              "code: 403 error_info={reason=, domain=, metadata={gcloud-cpp.retry.function=GetBucketMetadata}")


@pytest.mark.parametrize("error, expected", [
    (GCS_UNREACHABLE, "cannot be reached (UNAVAILABLE on GetBucketMetadata); allowed: an endpoint that answers "
                      "(STORAGE_EMULATOR_HOST"),
    (GCS_DENIED, "refuses these credentials (PERMISSION_DENIED on GetBucketMetadata); allowed: credentials that may "
                 "read and write the bucket, from Application Default Credentials"),
])
def test_a_gcs_refusal_reads_as_one_line_with_what_is_allowed(error, expected):
    from pipelines import store
    message = store._refusal(f"gs://{BUCKET}/run", OSError(error))
    assert expected in message and "\n" not in message and "AWS" not in message
