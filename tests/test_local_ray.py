"""Two pipelines on one machine: each starts its own local Ray, and Ray's own lookups inside the workers must
find their own instance (a failed lookup killed Ray Train's PlacementGroupCleaner, and the leaked placement
group left the next Tune trial waiting forever)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import ray

from pipelines.cluster import connect_ray

OTHER_RAY = textwrap.dedent("""
    import sys, time, ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    print("up", flush=True)
    sys.stdin.read()  # until the test closes stdin
""")


@ray.remote(num_cpus=0)
class Alive:
    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
def actor_state(actor_id: str) -> str:
    """What Ray Train's PlacementGroupCleaner asks, from a worker, with no address given."""
    from ray.util.state import get_actor
    return get_actor(actor_id, timeout=30).state


@pytest.fixture
def another_local_ray():
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert other.stdout.readline().strip() == "up"
    yield
    other.stdin.close()
    other.wait(timeout=60)


def test_workers_find_their_own_ray_when_another_runs_on_the_machine(another_local_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect_ray()
    try:
        alive = Alive.remote()
        assert ray.get(alive.ping.remote())
        assert ray.get(actor_state.remote(alive._actor_id.hex())) == "ALIVE"
    finally:
        ray.shutdown()
