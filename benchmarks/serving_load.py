"""Serving under load: ``mlflow models serve`` of a registered VAE-GAN on 127.0.0.1, hit by a pool of client
threads at several concurrency levels.

The model has the main job's nets (pipelines/configs/default.yaml; --quick: smoke.yaml) with random
weights: serving cost depends on the architecture, not on what the weights learned. It is logged and
registered by the product's own ``pipelines.registry.register`` into a throwaway sqlite MLflow store, and
served from ``models:/<name>@champion`` as docs/deploy.md does, with each uvicorn worker count in
``--workers``. The requests cycle through three bodies: ``sample`` 16 images, ``encode`` 16 images,
``reconstruct`` 16 images. Each level first sends a few warm-up requests, then ``--requests`` timed ones;
an error is any answer other than 200 with the expected number of predictions, or no answer.
The client threads run on the same machine as the server (2 cores here), so they share its CPUs.

Run from the repository root (no Ray):
    .venv/bin/python benchmarks/serving_load.py            # about 1 minute on 2 cores
    .venv/bin/python benchmarks/serving_load.py --quick    # smoke-sized model, fewer requests
Results: benchmarks/results/serving_load.json (--quick: serving_load_quick.json; --out to change).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common
import numpy as np

MODEL = "vaegan-serving-bench"
BATCH = 16  # images per request, for every mode
WARM_UP = 6


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--config", default=None, help="pipeline config whose nets are served "
                                                  "(default pipelines/configs/default.yaml; --quick: smoke.yaml)")
    p.add_argument("--requests", type=int, default=None, help="timed requests per level (default 200; --quick 40)")
    p.add_argument("--concurrency", default=None, help="comma-separated client threads (default 1,8,32; --quick 1,8)")
    p.add_argument("--workers", default=None, help="comma-separated uvicorn worker counts (default 1,2; --quick 1)")
    args = p.parse_args()
    args.config = args.config or f"pipelines/configs/{'smoke' if args.quick else 'default'}.yaml"
    args.requests = args.requests or (40 if args.quick else 200)
    args.concurrency = [int(c) for c in (args.concurrency or ("1,8" if args.quick else "1,8,32")).split(",")]
    args.workers = [int(w) for w in (args.workers or ("1" if args.quick else "1,2")).split(",")]
    args.out = common.result_path(args, "serving_load")
    return args


# -- the served model --------------------------------------------------------------------------------


def register_random_model(cfg, store: Path) -> str:
    """Log and register a checkpoint of ``cfg``'s nets with random weights; returns the tracking URI."""
    from pipelines import registry, tracking
    from pipelines.config import RegisterConfig
    from vaegan.checkpoint import save_checkpoint
    from vaegan.nets import build_nets
    from vaegan.step import VAEGANTrainer
    core = cfg.core()
    checkpoint = save_checkpoint(store / "checkpoint.pt", VAEGANTrainer(core, *build_nets(core.model)))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "serving-benchmark", store)
    run_id = tracking.start_run(uri, experiment, "random-weights")
    registry.register(RegisterConfig(model_name=MODEL), uri, run_id=run_id, checkpoint=checkpoint,
                      metrics={"fid": 0.0}, feature_net="none", fingerprint="none",
                      image_shape=[core.model.channels, core.model.image_size, core.model.image_size])
    return uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``mlflow models serve`` of the champion in its own process group, up until ``stop``."""

    def __init__(self, tracking_uri: str, workers: int, log: Path):
        self.port = free_port()
        self.log = open(log, "w")
        bin_dir = Path(sys.executable).parent  # `mlflow models serve` runs `uvicorn` from PATH
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds until /ping answers (model loaded in every worker that answers)."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"mlflow models serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"{self.url}/ping did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


# -- the load ----------------------------------------------------------------------------------------


def request_bodies(image_shape: list[int]) -> list[tuple[bytes, int]]:
    """(JSON body, expected number of predictions) for sample, encode and reconstruct."""
    images = np.random.default_rng(0).random((BATCH, *image_shape), dtype=np.float32).tolist()
    dummy = np.zeros((1, *image_shape), np.float32).tolist()
    bodies = [{"inputs": dummy, "params": {"mode": "sample", "num_samples": BATCH, "seed": 0}},
              {"inputs": images, "params": {"mode": "encode"}},
              {"inputs": images, "params": {"mode": "reconstruct"}}]
    return [(json.dumps(body).encode(), BATCH) for body in bodies]


def timed_post(url: str, body: bytes, expected: int) -> tuple[float, bool]:
    """(seconds, whether the answer was a 200 holding ``expected`` predictions)."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            ok = response.status == 200 and len(json.loads(response.read())["predictions"]) == expected
    except (OSError, ValueError, KeyError):  # HTTPError is an OSError
        ok = False
    return time.perf_counter() - start, ok


def load_level(url: str, bodies: list[tuple[bytes, int]], requests: int, concurrency: int) -> dict[str, Any]:
    plan = [bodies[i % len(bodies)] for i in range(requests)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda b: timed_post(url, *b), [bodies[i % len(bodies)] for i in range(WARM_UP)]))
        start = time.perf_counter()
        answers = list(pool.map(lambda b: timed_post(url, *b), plan))
        wall = time.perf_counter() - start
    latencies = sorted(seconds * 1000 for seconds, _ in answers)
    quantiles = statistics.quantiles(latencies, n=100)
    return {"concurrency": concurrency, "requests": requests, "ok": sum(ok for _, ok in answers),
            "errors": sum(not ok for _, ok in answers), "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 1), "images_per_s": round(requests * BATCH / wall, 1),
            "p50_ms": round(quantiles[49], 1), "p95_ms": round(quantiles[94], 1), "max_ms": round(latencies[-1], 1)}


def serve_and_load(args, tracking_uri: str, image_shape: list[int], scratch: Path, workers: int) -> dict[str, Any]:
    server = Server(tracking_uri, workers, scratch / f"serve-{workers}w.log")
    try:
        ready = server.wait_ready()
        print(f"[bench] {workers} worker(s) ready in {ready:.1f}s", flush=True)
        levels = []
        for concurrency in args.concurrency:
            level = load_level(server.url, request_bodies(image_shape), args.requests, concurrency)
            print(f"[bench] {workers}w c={concurrency}: {level['requests_per_s']} req/s, p50 {level['p50_ms']} ms, "
                  f"p95 {level['p95_ms']} ms, {level['errors']} errors", flush=True)
            levels.append(level)
    finally:
        server.stop()
    return {"workers": workers, "ready_seconds": round(ready, 1), "levels": levels}


def main() -> None:
    args = parse_args()
    cfg = common.load_pipeline_config(args.config, [])
    image_shape = [cfg.model.channels, cfg.model.image_size, cfg.model.image_size]
    with tempfile.TemporaryDirectory(prefix="vaegan-serving-") as tmp:
        tracking_uri = register_random_model(cfg, Path(tmp))
        runs = [serve_and_load(args, tracking_uri, image_shape, Path(tmp), workers) for workers in args.workers]
    rps = {(r["workers"], level["concurrency"]): level["requests_per_s"] for r in runs for level in r["levels"]}
    top, one = max(args.concurrency), min(args.concurrency)
    ratios = {f"rps_c{top}_over_c{one}_1w": common.ratio(rps.get((1, top)), rps.get((1, one))),
              f"rps_2w_over_1w_at_c{top}": common.ratio(rps.get((2, top)), rps.get((1, top)))}
    common.print_table([(f"{r['workers']}w c={lv['concurrency']}",
                         (f"{lv['requests_per_s']} req/s  p50 {lv['p50_ms']} ms  p95 {lv['p95_ms']} ms  "
                          f"errors {lv['errors']}/{lv['requests']}")) for r in runs for lv in r["levels"]])
    common.write_result(args.out, {
        "setup": {"config": args.config, "model": {"latent_dim": cfg.model.latent_dim,
                                                   "base_channels": cfg.model.base_channels, "image_shape": image_shape},
                  "images_per_request": BATCH, "modes": ["sample", "encode", "reconstruct"],
                  "requests_per_level": args.requests, "warm_up_requests": WARM_UP,
                  "client": "urllib, one thread per concurrent request, same machine"},
        "runs": runs, "ratios": ratios})


if __name__ == "__main__":
    main()
