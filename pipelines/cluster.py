"""The Ray cluster the pipeline runs on: join the one at RAY_ADDRESS or start a local one sized to this
machine, and refuse up front a Train run that a local Ray could never place."""
from __future__ import annotations

import os
import socket
from typing import Any

import ray

from vaegan.config import ConfigError

from . import tracking
from .config import PipelineConfig


def local_resources(*, gpus: bool) -> dict[str, float]:
    """What a local Ray has: the running one's resources, else what ``connect_ray`` gives a new one, every CPU
    and, with ``gpus``, every GPU torch sees, so that a Train run can be checked before Ray starts."""
    if ray.is_initialized():
        return ray.cluster_resources()
    if not gpus:
        return {"CPU": os.cpu_count() or 1}
    # Imported here: a driver whose run needs no GPU never loads torch (2.3 s of `vaegan run`'s start on 2 cores).
    import torch
    return {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}


def connect_ray(cfg: PipelineConfig | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS, else start a local Ray sized to this machine (Ray finds its
    GPUs); returns whether the cluster is a local one of fixed size (no autoscaler will add nodes). With
    ``cfg``, a cluster joined is checked to hold the Train run (``check_fits``) before anything is scheduled."""
    local = not os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return local
    if local:
        start_local_ray(num_cpus=int(local_resources(gpus=False)["CPU"]))
    else:
        ray.init(runtime_env={"env_vars": worker_env()})
        if cfg is not None:
            check_fits(cfg, ray.cluster_resources(), cluster=os.environ["RAY_ADDRESS"])
    return local


# Ray Train's controller polls its workers every 2 s by default, and a run's start and end each wait for a
# poll: a one-epoch Train run (a sweep trial, a test) took 31 s at 2 s and 26.5 s at 0.5 s. A poll is one
# small actor call per worker, so 0.5 s costs nothing a training step would notice. A user's own value wins.
TRAIN_POLL_SECONDS = "0.5"


def worker_env() -> dict[str, str]:
    """The environment every Ray worker of the pipeline gets: Ray Train otherwise prints every worker line
    twice; Train's controller polls its workers every TRAIN_POLL_SECONDS (it reads that from the process that
    starts the run, a step or a trial); Ray's workers talk to MLflow as the driver does."""
    poll = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_SECONDS)
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll,
            **tracking.bounded_retries()}


def start_local_ray(**init_kwargs: Any) -> None:
    """A Ray of this process's own on this machine (never one that happens to be running); ``init_kwargs``
    go to ``ray.init`` (``num_cpus``, ``object_store_memory``, ...). The benchmarks start theirs here too."""
    env = worker_env()
    # Ray Train's PlacementGroupCleaner asks the state API whether its controller lives, with no address:
    # with a second local Ray on the machine (another pipeline, a sweep) that lookup fails with "Found
    # multiple active Ray instances", the cleaner dies, its placement group leaks and the next Tune trial
    # waits forever. Naming this Ray's dashboard, the state API's server, to every worker avoids the guess.
    dashboard_port = free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # Ray Train's preemption watcher polls for nodes being drained; one machine's own Ray is never drained,
    # and the watcher is one more actor process to start per Train run (seconds each on 2 cores).
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    # address="local": without it Ray joins the cluster named in /tmp/ray/ray_current_cluster, the last
    # `ray start` on this machine, even one that is long gone (then init fails: "When connecting to an
    # existing cluster, num_cpus and num_gpus must not be provided"). RAY_ADDRESS alone picks a cluster.
    ray.init(address="local", runtime_env={"env_vars": env}, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, **init_kwargs)


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_fits(cfg: PipelineConfig, have: dict[str, float], cluster: str = "") -> None:
    """Refuse a Train run (and so a Tune trial, which is one) that Ray cannot place, instead of waiting
    forever. A local Ray (``cluster`` "") never grows. A cluster joined at RAY_ADDRESS is judged by its nodes
    now (``ray.cluster_resources()``): an autoscaler's headroom is not visible from here, so one that will
    grow to fit is declared with ``train.wait_for_autoscaler``, which turns the refusal into a warning."""
    cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
    where = f"the Ray cluster at RAY_ADDRESS={cluster} has, on its nodes now," if cluster else "this machine's Ray has"
    if cpus > have.get("CPU", 0):
        problem = (f"config keys 'train.num_workers' x 'train.cpus_per_worker' = {cfg.train.num_workers} x "
                   f"{cfg.train.cpus_per_worker} = {cpus} CPUs, but {where} {int(have.get('CPU', 0))}")
        allowed = "at most that many" + ("" if cluster else " (or set RAY_ADDRESS to a bigger cluster)")
    elif cfg.train.use_gpu and cfg.train.num_workers > have.get("GPU", 0):
        problem = (f"config key 'train.num_workers' = {cfg.train.num_workers} GPU workers (train.use_gpu), but "
                   f"{where} {int(have.get('GPU', 0))} GPUs")
        allowed = "at most that many, or train.use_gpu=false"
    else:
        return
    if not cluster:
        raise ConfigError(f"{problem}; allowed: {allowed}")
    if not cfg.train.wait_for_autoscaler:
        raise ConfigError(f"{problem}; allowed: {allowed}, or train.wait_for_autoscaler=true for a cluster that "
                          "autoscales to fit")
    print(f"[ray] warning: {problem}; waiting for its autoscaler to add nodes (train.wait_for_autoscaler=true)",
          flush=True)
