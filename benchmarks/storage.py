"""A run folder on object storage against a local one: wall time per step, bytes written, and the time to resume
after a driver kill.

The same `vaegan run` goes once into a local run folder and once into ``s3://…`` on a local S3 server
(``deploy/local_s3.py``, moto's, on 127.0.0.1), both tracked by one `mlflow server` that keeps its artifacts in
that bucket, so the run folder is the only difference. Each run gets a fresh ``data.data_dir``, so neither
finds the other's feature net or IDX copy. Then, per storage, a driver is SIGKILLed once Ray Train has
recorded a checkpoint, and the time its rerun takes to resume training (to the worker's "resumed from epoch"
line) is measured; the rerun is stopped there.

The local S3 server is a process on the same 2 cores, so ``s3_over_local_time`` here also pays for the
server's CPU; against a remote store that cost moves off the machine, and network latency comes instead.

Run from the repository root, under the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/storage.py --configs smoke,default
Results: benchmarks/results/storage.json (--out to change).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

from deploy.local_s3 import local_s3
from deploy.local_server import tracking_server

BUCKET = "vaegan-bench"
RESUME_ARGS = ("--steps", "preprocess,tune,train", "--set", "tune.enabled=false", "--set", "train.epochs=3")


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--configs", default="smoke,default",
                   help="comma-separated names from pipelines/configs (default smoke,default; --quick: smoke)")
    args = p.parse_args()
    if args.quick:
        args.configs = "smoke"
    return args


def command(config: str, run_dir: str, data_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "vaegan"), "run", "--config", f"pipelines/configs/{config}.yaml",
            "--run-dir", run_dir, "--set", f"data.data_dir={data_dir}", "--set", f"register.experiment=storage-{config}",
            *extra]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w+")  # noqa: SIM115 (read back by the caller)
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.out = out
    return proc


def finish(proc: subprocess.Popen) -> str:
    proc.wait()
    proc.out.seek(0)
    text = proc.out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed (exit {proc.returncode}):\n{text[-3000:]}")
    return text


def stored_bytes(run_dir: str) -> int:
    """What the run wrote into its folder or prefix."""
    import pyarrow.fs as pafs

    from pipelines import store
    fs, path = store.filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def full_run(config: str, run_dir: str, data_dir: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    start_time = time.perf_counter()
    finish(start(command(config, run_dir, data_dir), env, log))
    from pipelines import store
    summary = json.loads(store.read_text(store.join(run_dir, "summary.json")))
    return {"run_dir": run_dir, "seconds": round(time.perf_counter() - start_time, 1),
            "steps": {name: step["seconds"] for name, step in summary["steps"].items()},
            "bytes_written": stored_bytes(run_dir)}


def checkpoint_recorded(run_dir: str) -> bool:
    """Whether Ray Train's controller has recorded a checkpoint of the train step (what a rerun resumes from)."""
    import pyarrow.fs as pafs

    from pipelines import store
    fs, path = store.filesystem(store.join(run_dir, "ray"))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    for info in infos:
        if info.base_name == "checkpoint_manager_snapshot.json" and "/train-" in info.path:
            with fs.open_input_stream(info.path) as f:
                return bool(json.loads(f.read())["checkpoint_results"])
    return False


def resume(config: str, run_dir: str, data_dir: Path, env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Kill a driver once a checkpoint is recorded; the seconds its rerun takes to resume training."""
    cmd = command(config, run_dir, data_dir, *RESUME_ARGS)
    first = start(cmd, env, logs / "killed.log")
    while not checkpoint_recorded(run_dir):
        if first.poll() is not None:
            raise RuntimeError(f"the run ended before a checkpoint; see {logs / 'killed.log'}")
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    rerun_start = time.perf_counter()
    second = start(cmd, env, logs / "rerun.log")
    while second.poll() is None:
        second.out.seek(0)
        if re.search(r"\[train\] resumed from epoch", second.out.read()):
            resumed_after = round(time.perf_counter() - rerun_start, 1)
            # The figure is taken; the rest of the rerun is ordinary training (tests/test_object_storage.py runs
            # such a rerun to its end), so it is stopped rather than paid for on the default pipeline.
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
            return {"rerun_to_resumed_training_s": resumed_after}
        time.sleep(0.2)
    raise RuntimeError(f"the rerun ended without resuming training; see {logs / 'rerun.log'}")


def compare(config: str, s3_env: dict[str, str], tracking: str, scratch: Path) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env = {**base, **s3_env, "MLFLOW_TRACKING_URI": tracking}
    where = {"local": str(scratch / config / "local-run"), "s3": f"s3://{BUCKET}/{scratch.name}/{config}"}
    result: dict[str, Any] = {}
    for storage, run_dir in where.items():
        logs = scratch / config / storage
        logs.mkdir(parents=True)
        print(f"[bench] {config} into {run_dir}", flush=True)
        result[storage] = full_run(config, run_dir, logs / "data", env, logs / "run.log")
        print(f"[bench] {config} resume after a driver kill, {storage}", flush=True)
        result[storage]["resume"] = resume(config, f"{run_dir}-resume", logs / "resume-data", env, logs)
    result["s3_over_local_time"] = common.ratio(result["s3"]["seconds"], result["local"]["seconds"])
    result["s3_over_local_step_time"] = {step: common.ratio(result["s3"]["steps"][step], seconds)
                                         for step, seconds in result["local"]["steps"].items()}
    return result


def main() -> None:
    args = parse_args()
    scratch = args.work_dir / f"storage-{time.strftime('%Y%m%d-%H%M%S')}"
    scratch.mkdir(parents=True)
    results: dict[str, Any] = {}
    with local_s3(BUCKET, log=scratch / "moto.log") as s3_env:
        os.environ.update(s3_env)  # for this process's own look at the bucket (stored_bytes, checkpoint_recorded)
        server_env = {**s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]}
        with tracking_server(scratch, f"s3://{BUCKET}/mlartifacts", server_env) as tracking:
            for config in args.configs.split(","):
                results[config] = compare(config, s3_env, tracking, scratch)
    rows = []
    for config, result in results.items():
        rows += [(f"{config}: local s", result["local"]["seconds"]), (f"{config}: s3 s", result["s3"]["seconds"]),
                 (f"{config}: s3_over_local_time", result["s3_over_local_time"]),
                 (f"{config}: bytes written local / s3", f"{result['local']['bytes_written']:,} / "
                                                         f"{result['s3']['bytes_written']:,}"),
                 (f"{config}: resume s local / s3", f"{result['local']['resume']['rerun_to_resumed_training_s']} / "
                                                    f"{result['s3']['resume']['rerun_to_resumed_training_s']}")]
    common.print_table(rows)
    common.write_result(common.result_path(args, "storage"), {"configs": results})


if __name__ == "__main__":
    main()
