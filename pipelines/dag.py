"""The workflow DAG: preprocess -> tune -> train -> evaluate -> register, executed by Ray.

Each step is a Ray task node (``execute_step.bind(...)``) whose upstream nodes are its arguments;
``dag.execute()`` runs the graph on the cluster. A step's outputs live in
``<run dir>/<step>-<key>/`` where the key hashes the step's config and its inputs' keys; they are
written to a temporary folder and renamed when complete, so a rerun skips every step whose folder
exists (``cached``) and an interrupted pipeline resumes where it stopped.

Run it:  ``vaegan run --config pipelines/configs/default.yaml``
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vaegan.config import ConfigError, from_dict

from . import steps
from .config import STEPS, PipelineConfig, stable_hash

OUTPUTS_FILE = "outputs.json"
UPSTREAM = {"preprocess": (), "tune": ("preprocess",), "train": ("preprocess", "tune"),
            "evaluate": ("preprocess", "train"), "register": ("preprocess", "train", "evaluate")}
STEP_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "preprocess": steps.preprocess, "tune": steps.tune, "train": steps.train,
    "evaluate": steps.evaluate, "register": steps.register,
}


@dataclasses.dataclass
class RunContext:
    """What every step needs besides the config; crosses the Ray boundary as a dict."""

    run_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def config_section_of(step: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The part of the config a step's outputs depend on (its cache key's own share)."""
    full = dataclasses.asdict(cfg)
    if step == "preprocess":
        return {"data": full["data"], "image_size": cfg.model.image_size, "channels": cfg.model.channels}
    if step == "evaluate":
        return {"eval": full["eval"]}
    if step == "register":
        return {"register": full["register"]}
    trained = {k: v for k, v in full.items() if k not in ("name", "data", "eval", "register", "tune")}
    return {**trained, "tune": full["tune"]} if step == "tune" else trained


def step_key(step: str, cfg: PipelineConfig, upstream: dict[str, dict[str, Any]]) -> str:
    return stable_hash(step, config_section_of(step, cfg), {name: up["key"] for name, up in upstream.items()})


def remove_stale_partials(run_dir: Path) -> list[Path]:
    """Delete the hidden temporary folders an interrupted run left (a killed step never reaches its
    ``finally``); they were never visible as step outputs, so nothing complete is touched."""
    stale = [p for p in run_dir.glob(".*-*.tmp-*") if p.is_dir()] + [p for p in run_dir.glob(".*-*.old-*") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish(tmp: Path, final: Path) -> None:
    """Make ``tmp`` visible as ``final`` in one rename, replacing an older ``final`` (a forced rerun)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


@ray.remote(num_cpus=0)  # orchestration only: the Data/Train/Tune work a step launches holds the CPUs
def execute_step(step: str, cfg_dict: dict[str, Any], ctx_dict: dict[str, Any], run_it: bool, force: bool,
                 *upstream: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Run (or reuse) one step; returns the results of this step and of everything upstream of it."""
    cfg = from_dict(PipelineConfig, cfg_dict)
    ctx = RunContext(**ctx_dict)
    results = {name: result for up in upstream for name, result in up.items()}
    ups = {name: results[name] for name in UPSTREAM[step]}
    key = step_key(step, cfg, ups)
    final = Path(ctx.run_dir) / f"{step}-{key}"
    if final.is_dir() and not force:
        outputs = json.loads((final / OUTPUTS_FILE).read_text())
        results[step] = {"key": key, "dir": str(final), "status": "cached", "seconds": 0.0, "outputs": outputs}
        return results
    if not run_it:
        raise ConfigError(f"step '{step}' has no complete outputs for this config in {ctx.run_dir}; "
                          f"add it to --steps (allowed: {', '.join(STEPS)})")
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        print(f"[dag] step {step} ({key}) started", flush=True)
        outputs = STEP_FUNCTIONS[step](cfg, ctx, ups, tmp, key)
        (tmp / OUTPUTS_FILE).write_text(json.dumps(outputs, indent=2))
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    print(f"[dag] step {step} ({key}) finished in {seconds:.1f}s", flush=True)
    results[step] = {"key": key, "dir": str(final), "status": "ran", "seconds": seconds, "outputs": outputs}
    return results


def build_dag(cfg: PipelineConfig, ctx: RunContext, selected: list[str], forced: set[str]):
    """The DAG up to the last selected step, as bound Ray task nodes; returns its final node.

    Forcing a step forces every step after it, since each later step depends on it (transitively).
    """
    last = max(STEPS.index(s) for s in selected)
    first_forced = min((STEPS.index(s) for s in forced), default=len(STEPS))
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    nodes: dict[str, Any] = {}
    for index, step in enumerate(STEPS[: last + 1]):
        nodes[step] = execute_step.options(scheduling_strategy=driver_node, name=f"step:{step}").bind(
            step, dataclasses.asdict(cfg), dataclasses.asdict(ctx), step in selected, index >= first_forced,
            *(nodes[up] for up in UPSTREAM[step]))
    return nodes[STEPS[last]]


def execute(cfg: PipelineConfig, ctx: RunContext, selected: list[str], forced: set[str]) -> dict[str, dict]:
    """Run the DAG on the cluster and return every executed step's result, keyed by step name."""
    root = build_dag(cfg, ctx, selected, forced)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates DAGNode.execute() in favour of compiled graphs, which run only actor
        # methods with accelerator channels; long-running task steps like ours still need execute().
        warnings.filterwarnings("ignore", message="DAGNode.execute", category=Warning)
        ref = root.execute()
    return ray.get(ref)
