"""A Train run that the Ray cluster at RAY_ADDRESS cannot place is refused in one line, instead of waiting
forever: against a real one-CPU `ray start --head` of this test's own (stopped by its temp folder, never
with a global `ray stop`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import ray
from conftest import BIN, free_port

from pipelines.cluster import check_fits, connect_ray
from pipelines.config import PipelineConfig
from vaegan.config import ConfigError, from_dict


@pytest.fixture
def one_cpu_cluster():
    temp = Path(tempfile.mkdtemp(prefix="vgr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=1", "--num-gpus=0", f"--port={port}",
         f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        # Without token auth, as the test's own client connects (with a ~/.ray/auth_token on the machine,
        # e.g. from tests/test_deploy.py, `ray start` would demand the token otherwise).
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (temp / "ray_current_cluster").is_file():  # written once the head is up
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.2)
        ray.init(address=f"127.0.0.1:{port}")
        while ray.cluster_resources().get("CPU") != 1:  # the head's raylet may register a moment later
            assert time.time() < deadline, f"the head never showed its CPU: {ray.cluster_resources()}"
            time.sleep(0.2)
        ray.shutdown()
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)  # this head's process group: its raylet, GCS and workers
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
        for pid in left:  # a daemon that left the group still names this head's own temp folder
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


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
