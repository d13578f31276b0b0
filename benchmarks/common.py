"""What every benchmark script shares: the ``--quick``/``--out`` arguments, the ``machine`` block, writing
the result JSON, a private local Ray, the preprocessed data and feature net, and the pythae virtualenv.

Scripts import it as ``common`` (Python puts a script's own folder first on ``sys.path``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vaegan.atomic import atomic_file

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
WORK_DIR = REPO / "runs" / "benchmarks"  # runs/ is git-ignored: cached data, scratch, MLflow stores
PYTHAE_VENV = BENCHMARKS / ".venv-pythae"
PYTHAE_REQUIREMENT = "pythae==0.1.2"


# -- arguments and results ---------------------------------------------------------------------------


def argument_parser(doc: str | None, work_dir: Path = WORK_DIR) -> argparse.ArgumentParser:
    """A parser with the arguments every benchmark has: --quick, --out and --work-dir."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke-sized run (what the tests run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/<name>.json; <name>_quick.json with --quick)")
    parser.add_argument("--work-dir", type=Path, default=work_dir,
                        help=f"cached data and per-run scratch (default {work_dir})")
    return parser


def result_path(args: argparse.Namespace, name: str) -> Path:
    return args.out or RESULTS / (f"{name}_quick.json" if args.quick else f"{name}.json")


def machine() -> dict[str, Any]:
    """Where the figures were measured; the load average tells whether something else was running."""
    return {"cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cpu_model": _cpu_model(), "torch": _version("torch"), "ray": _version("ray"), "mlflow": _version("mlflow"),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` with the ``machine`` block and the ``command`` that produced it, atomically."""
    result = {**result, "machine": machine(), "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    with atomic_file(path, "w") as f:
        f.write(json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
    print(f"[bench] wrote {path}", flush=True)
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities as null: strict JSON, and a long run's figures are never lost to one bad number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    return round(numerator / denominator, digits)


def print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + "\n", flush=True)


# -- Ray, data and feature net -----------------------------------------------------------------------


@contextlib.contextmanager
def local_ray(**init_kwargs: Any) -> Iterator[None]:
    """A Ray of our own for the block, started as the pipeline starts its local one (never one that happens to
    be running), shut down after; ``init_kwargs`` go to ``ray.init`` (e.g. ``num_cpus``, ``object_store_memory``)."""
    from pipelines.cluster import start_local_ray
    start_local_ray(**{"num_cpus": os.cpu_count(), **init_kwargs})
    with connected():
        yield


@contextlib.contextmanager
def pipeline_ray() -> Iterator[None]:
    """The Ray the pipeline would run on, for the block: the cluster at RAY_ADDRESS where one is named (the
    tests run the benchmarks on a Ray head they share), else a local Ray of our own (``local_ray``)."""
    if not os.environ.get("RAY_ADDRESS"):
        with local_ray():
            yield
        return
    from pipelines.cluster import connect_ray
    connect_ray()
    with connected():
        yield


@contextlib.contextmanager
def connected() -> Iterator[None]:
    """Inside a connected Ray: no Ray Data progress bars in the benchmark's output; disconnect after."""
    import ray
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


@dataclasses.dataclass
class PreparedData:
    """The preprocess step's output folder and manifest, and the dataset's domain feature net."""

    dir: Path
    manifest: dict[str, Any]
    featnet_path: str
    featnet_name: str

    @property
    def image_shape(self) -> list[int]:
        return self.manifest["image_shape"]

    @property
    def outputs(self):
        """The preprocess step's outputs, as pipeline steps receive them."""
        from pipelines.steps import preprocess
        return preprocess.Outputs(manifest=self.manifest, folder=str(self.dir))


def prepare_data(cfg, cache_dir: Path) -> PreparedData:
    """Run (or reuse) the pipeline's own preprocess step in ``cache_dir``, then load or train the feature net.

    Goes through the DAG, so the Parquet folder is keyed by the data config like in ``vaegan run``
    and a second benchmark run reuses it. Needs Ray to be running.
    """
    from pipelines import dag
    from pipelines.context import RunContext
    cache_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(run_dir=str(cache_dir.resolve()), tracking_uri="", experiment_id="", parent_run_id="")
    return load_prepared(cfg, dag.execute(cfg, ctx, ["preprocess"], set())["preprocess"].outputs.path)


def load_prepared(cfg, pre_dir: Path) -> PreparedData:
    """A finished preprocess step folder and its feature net (loaded from the cache, or trained once)."""
    from pipelines.context import read_outputs
    from pipelines.steps import preprocess
    outputs = read_outputs(preprocess.Outputs, str(pre_dir))
    featnet_path, featnet_name = outputs.feature_net(str(Path(cfg.data.data_dir) / "featnets"), cfg.eval)
    return PreparedData(pre_dir, outputs.manifest, featnet_path, featnet_name)


def load_pipeline_config(path: Path | str, overrides: list[str]):
    """``vaegan run``'s config loading, with data paths made absolute (Ray workers run elsewhere)."""
    from pipelines.config import load_config
    from pipelines.pipeline import with_absolute_paths
    return with_absolute_paths(load_config(path, overrides), run_dir="")


# -- the pythae peer ---------------------------------------------------------------------------------


def pythae_python() -> Path:
    """The interpreter of benchmarks/.venv-pythae, created on first use.

    pythae is never a dependency of the product, so it lives in its own virtualenv; a .pth file puts
    this environment's site-packages (torch, numpy, pydantic, scipy, scikit-learn) behind the
    venv's own, so pip installs only what is missing (pythae, imageio, tqdm) and the big torch
    install is shared.
    """
    python = PYTHAE_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import pythae"], capture_output=True, check=False).returncode == 0:
        return python
    print(f"[bench] creating {PYTHAE_VENV} with {PYTHAE_REQUIREMENT}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", PYTHAE_VENV], check=True)
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    (Path(venv_site) / "_vaegan_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PYTHAE_REQUIREMENT],
                   check=True)
    return python


def run_pythae(args: list[str]) -> dict[str, Any]:
    """Run ``benchmarks/pythae_peer.py ARGS`` in the pythae virtualenv; returns the JSON it writes."""
    python = pythae_python()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}  # a progress bar per epoch floods logs
    with tempfile.TemporaryDirectory(prefix="vaegan-pythae-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([python, BENCHMARKS / "pythae_peer.py", *args, "--out", out], check=True, env=env, cwd=REPO)
        return json.loads(out.read_text())


def steady_images_per_s(history: list[dict[str, float]]) -> float:
    """Images/s over the epochs after the first (the first pays warm-up: allocator, data pipeline start).

    Each epoch summary holds ``images_per_s`` and ``epoch_seconds`` (``vaegan.loop.EpochMeter``); with
    a single epoch that epoch is all there is.
    """
    steady = history[1:] or history
    seconds = sum(h["epoch_seconds"] for h in steady)
    return sum(h["images_per_s"] * h["epoch_seconds"] for h in steady) / seconds
