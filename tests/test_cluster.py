"""A Train run that the Ray cluster at RAY_ADDRESS cannot place is refused in one line, instead of waiting
forever: against a real one-CPU `ray start --head` of this test's own (stopped by its session, never with a
global `ray stop`); and the environment the pipeline gives every Ray worker."""
from __future__ import annotations

import os
import time

import pytest
import ray
from conftest import ray_head

from pipelines.cluster import check_fits, connect_ray, worker_env
from pipelines.config import PipelineConfig
from vaegan.config import ConfigError, from_dict


@pytest.fixture
def one_cpu_cluster():
    # Without token auth, as the test's own client connects (with a ~/.ray/auth_token on the machine, `ray start`
    # would demand the token otherwise).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with ray_head(env, "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false") as address:
        ray.init(address=address)
        try:
            deadline = time.time() + 120
            while ray.cluster_resources().get("CPU") != 1:  # the head's raylet may register a moment later
                assert time.time() < deadline, f"the head never showed its CPU: {ray.cluster_resources()}"
                time.sleep(0.2)
            ray.shutdown()
            yield address
        finally:
            # Leave before the head is killed (the test's connect_ray joins it from this process): Ray ends a
            # driver that finds its cluster gone, and here that would be the test process.
            if ray.is_initialized():
                ray.shutdown()


def test_a_run_the_cluster_cannot_place_is_refused_in_one_line(one_cpu_cluster, monkeypatch, capfd):
    monkeypatch.setenv("RAY_ADDRESS", one_cpu_cluster)
    cfg = from_dict(PipelineConfig, {"train": {"num_workers": 2}})
    with pytest.raises(ConfigError) as info:
        connect_ray(cfg)  # what the driver calls right after the MLflow check
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("config keys 'train.num_workers' x 'train.cpus_per_worker' = 2 x 1 = 2 CPUs, but "
                              f"the Ray cluster at RAY_ADDRESS={one_cpu_cluster} has, on its nodes now, 1;"), message
    assert "train.wait_for_autoscaler=true" in message
    # An autoscaling cluster that will grow to fit: a warning, and the run goes on to wait for its nodes.
    check_fits(from_dict(PipelineConfig, {"train": {"num_workers": 2, "wait_for_autoscaler": True}}),
               ray.cluster_resources(), cluster=one_cpu_cluster)
    assert "[ray] warning: config keys 'train.num_workers'" in capfd.readouterr().out


def test_train_polls_its_workers_every_half_second_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert worker_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    assert worker_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
