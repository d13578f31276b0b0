"""The workflow DAG, a generic cached runner: it knows no step by name, only ``pipelines.steps.STEPS``.

Each step is a Ray task node (``execute_step.bind(...)``) whose upstream nodes are its arguments;
``dag.execute()`` runs the graph on the cluster. A step's outputs live in ``<run dir>/<step>-<key>/``,
where the key hashes the config sections the step declares (``CACHE_KEY``) and its upstream steps' keys.
A step counts as complete when its manifest (``outputs.json``) is there, so a rerun skips every complete
step (``cached``) and an interrupted pipeline resumes where it stopped. In a local run folder the step
writes into a hidden temporary folder, renamed when complete; on object storage, which has no rename, it
writes into a local temporary folder that is uploaded, manifest last (``publish_remote``).

Run it:  ``vaegan run --config pipelines/configs/default.yaml``
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vaegan.config import ConfigError, from_dict

from . import store
from .config import PipelineConfig, stable_hash
from .context import OUTPUTS_FILE, RunContext, StepResult, read_outputs
from .steps import STEPS


@functools.cache
def step_module(name: str) -> ModuleType:
    return importlib.import_module(f"pipelines.steps.{name}")


def upstream_of(name: str) -> tuple[str, ...]:
    """The steps whose outputs ``name`` reads: the fields of its ``Inputs``."""
    return tuple(f.name for f in dataclasses.fields(step_module(name).Inputs))


def cache_section(name: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The values of the config keys step ``name`` declares in ``CACHE_KEY`` ("section" or "section.key")."""
    full = dataclasses.asdict(cfg)
    section: dict[str, Any] = {}
    for dotted in step_module(name).CACHE_KEY:
        value: Any = full
        for part in dotted.split("."):
            value = value[part]
        section[dotted] = value
    return section


def step_key(name: str, cfg: PipelineConfig, ctx: RunContext, upstream: dict[str, StepResult]) -> str:
    """The hash of the step's ``CACHE_KEY`` values, its upstream keys and, where the step defines
    ``cache_extra(cfg, ctx) -> dict``, what that returns: what its outputs depend on beyond the config (the
    source's files, the registry it writes to)."""
    parts = [name, cache_section(name, cfg), {up: result.key for up, result in upstream.items()}]
    extra = getattr(step_module(name), "cache_extra", None)
    if extra is not None:
        parts.append(extra(cfg, ctx))
    return stable_hash(*parts)


def check_steps(cfg: PipelineConfig, selected: list[str]) -> None:
    """Run the driver-side checks of the selected steps that define ``check(cfg)``: what only a step knows
    to be wrong with the config is refused before Ray starts."""
    for name in selected:
        check = getattr(step_module(name), "check", None)
        if check is not None:
            check(cfg)


def remove_stale_partials(run_dir: Path) -> list[Path]:
    """Delete the hidden temporary folders an interrupted run left (a killed step never reaches its
    ``finally``); they were never visible as step outputs, so nothing complete is touched."""
    stale = [p for p in run_dir.glob(".*-*.tmp-*") if p.is_dir()] + [p for p in run_dir.glob(".*-*.old-*") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish(tmp: Path, final: str) -> None:
    """Make the finished local folder ``tmp`` (manifest included) the step's folder ``final``: by one rename in
    a local run folder, by an upload, manifest last, on object storage."""
    if store.is_remote(final):
        publish_remote(tmp, final)
    else:
        publish_local(tmp, Path(final))


def publish_local(tmp: Path, final: Path) -> None:
    """Make ``tmp`` visible as ``final`` in one rename, replacing an older ``final`` (a forced rerun)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def publish_remote(tmp: Path, final: str) -> None:
    """Upload the local ``tmp`` to the object-storage prefix ``final``, its manifest last. An older ``final``
    (a forced rerun, or a folder a killed run half wrote) loses its manifest first, so at every moment the
    prefix is either complete or not a step's output at all."""
    store.delete(store.join(final, OUTPUTS_FILE))
    store.delete(final)
    manifest = (tmp / OUTPUTS_FILE).read_text()
    (tmp / OUTPUTS_FILE).unlink()
    store.upload(tmp, final)
    store.write_text(store.join(final, OUTPUTS_FILE), manifest)


def scratch_folder(run_dir: str, name: str, key: str) -> Path:
    """A new empty local folder for step ``name`` with ``key`` to write into before ``publish``: hidden in a
    local run folder (one rename then publishes it), a temporary one for a run folder on object storage."""
    if store.is_remote(run_dir):
        return Path(tempfile.mkdtemp(prefix=f"vaegan-{name}-"))
    tmp = Path(run_dir) / f".{name}-{key}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def cached_result(name: str, key: str, final: str) -> StepResult | None:
    """The step's result from its complete folder ``final`` (path or URI), or None when it has none."""
    if not store.exists(store.join(final, OUTPUTS_FILE)):
        return None
    return StepResult(name, key, "cached", 0.0, read_outputs(step_module(name).Outputs, final))


def all_cached(cfg: PipelineConfig, ctx: RunContext, selected: list[str],
               forced: set[str]) -> dict[str, StepResult] | None:
    """Every step up to the last selected one, when each is complete in the run folder and none is forced;
    else None. A rerun that changes nothing then needs no Ray at all: the driver reads the folders itself."""
    if forced:
        return None
    results: dict[str, StepResult] = {}
    for name in STEPS[: max(STEPS.index(s) for s in selected) + 1]:
        key = step_key(name, cfg, ctx, {up: results[up] for up in upstream_of(name)})
        cached = cached_result(name, key, store.join(ctx.run_dir, f"{name}-{key}"))
        if cached is None:
            return None
        results[name] = cached
    return results


@ray.remote(num_cpus=0)  # orchestration only: the Data/Train/Tune work a step launches holds the CPUs
def execute_step(name: str, cfg_dict: dict[str, Any], ctx: RunContext, run_it: bool, force: bool,
                 *upstream: dict[str, StepResult]) -> dict[str, StepResult]:
    """Run (or reuse) one step; returns the results of this step and of everything upstream of it."""
    cfg = from_dict(PipelineConfig, cfg_dict)  # the config crossed the Ray boundary as a dict
    step = step_module(name)
    results = {n: result for up in upstream for n, result in up.items()}
    ups = {n: results[n] for n in upstream_of(name)}
    key = step_key(name, cfg, ctx, ups)
    final = store.join(ctx.run_dir, f"{name}-{key}")
    cached = None if force else cached_result(name, key, final)
    if cached is not None:
        results[name] = cached
        return results
    if not run_it:
        raise ConfigError(f"step '{name}' has no complete outputs for this config in {ctx.run_dir}; "
                          f"add it to --steps (allowed: {', '.join(STEPS)})")
    tmp = scratch_folder(ctx.run_dir, name, key)
    start = time.perf_counter()
    try:
        print(f"[dag] step {name} ({key}) started", flush=True)
        inputs = step.Inputs(**{n: result.outputs for n, result in ups.items()})
        outputs = step.run(cfg, dataclasses.replace(ctx, step_key=key), inputs, tmp)
        (tmp / OUTPUTS_FILE).write_text(outputs.to_json())  # last: the folder is complete once this exists
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    print(f"[dag] step {name} ({key}) finished in {seconds:.1f}s", flush=True)
    results[name] = StepResult(name, key, "ran", seconds, dataclasses.replace(outputs, folder=final))
    return results


def build_dag(cfg: PipelineConfig, ctx: RunContext, selected: list[str], forced: set[str]):
    """The DAG up to the last selected step, as bound Ray task nodes; returns its final node.

    Forcing a step forces every step after it, since each later step depends on it (transitively).
    """
    last = max(STEPS.index(s) for s in selected)
    first_forced = min((STEPS.index(s) for s in forced), default=len(STEPS))
    # A local run folder is a path on the driver's node, so its steps run there; on object storage a step may
    # run on any node.
    placement = {} if store.is_remote(ctx.run_dir) else {"scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}
    nodes: dict[str, Any] = {}
    for index, name in enumerate(STEPS[: last + 1]):
        nodes[name] = execute_step.options(name=f"step:{name}", **placement).bind(
            name, dataclasses.asdict(cfg), ctx, name in selected, index >= first_forced,
            *(nodes[up] for up in upstream_of(name)))
    return nodes[STEPS[last]]


def execute(cfg: PipelineConfig, ctx: RunContext, selected: list[str], forced: set[str]) -> dict[str, StepResult]:
    """Run the DAG on the cluster and return every executed step's result, keyed by step name."""
    root = build_dag(cfg, ctx, selected, forced)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates DAGNode.execute() in favour of compiled graphs, which run only actor
        # methods with accelerator channels; long-running task steps like ours still need execute().
        warnings.filterwarnings("ignore", message="DAGNode.execute", category=Warning)
        ref = root.execute()
    return ray.get(ref)
