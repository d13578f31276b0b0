"""Preprocessing Fashion-MNIST (70,000 images) to Parquet: the product's Ray Data step vs one plain process.

  ray_data  ``pipelines.preprocess.run`` on a fresh local Ray cluster, Ray start-up included: read the
            IDX files, ``map_batches`` (decode, resize if needed, channels, validate, split by a hash of
            each row's key), ``write_parquet`` partitioned by split, then the manifest read-back.
  numpy     the same work in one process without Ray, in a spawned child (its own memory): the same IDX
            blocks (``idx_blocks``) and ``transform_batch`` over 1024-row batches, pyarrow
            ``write_table`` per split, the same ``build_manifest``.
Both write the same rows, so their manifests carry the same fingerprint (checked: ``same_output``).

Peak RSS: for Ray, the sum over the driver and every process of the cluster, sampled every 0.2 s
(``preprocess_memory.Sampler``; shared object-store pages count once per process that maps them);
for numpy, the child's own peak (``getrusage``). Both include the imports (torch, ray, pyarrow).

Run from the repository root, under the shared Ray lock:
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/preprocess.py            # 70,000 images, < 1 min
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/preprocess.py --quick    # a 5,000-image slice
Results: benchmarks/results/preprocess.json (--quick: preprocess_quick.json; --out to change).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import common
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from preprocess_memory import MiB, Sampler, measure

BATCH_ROWS = 1024  # the Ray step's map_batches batch size


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--limit", type=int, default=None, help="data.limit (default 0: all 70,000; --quick: 5000)")
    args = p.parse_args()
    args.limit = args.limit if args.limit is not None else (5000 if args.quick else 0)
    args.out = common.result_path(args, "preprocess")
    return args


# -- the single-process script -----------------------------------------------------------------------


def numpy_preprocess(data: dict[str, Any], model: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """The Ray step's work in this process alone; returns its timings, peak RSS and manifest."""
    import psutil  # importable once ray is (ray/thirdparty_files); preprocess_memory imported it

    from pipelines import preprocess
    from pipelines.config import DataConfig
    from vaegan.config import ModelConfig
    rss_before_mb = psutil.Process().memory_info().rss / MiB
    start = time.perf_counter()
    cfg, model_cfg = DataConfig(**data), ModelConfig(**model)
    blocks, classes = preprocess.idx_blocks(cfg)
    shape = {"image_size": model_cfg.image_size, "channels": model_cfg.channels}
    tables: dict[str, list[pa.Table]] = {split: [] for split in preprocess.SPLITS}
    for block in blocks:
        for first in range(0, len(block["key"]), BATCH_ROWS):
            batch = {name: column[first:first + BATCH_ROWS] for name, column in block.items()}
            split_rows(preprocess.transform_batch(batch, data, shape), tables)
    write_splits(tables, Path(out_dir), cfg.rows_per_file)
    written = time.perf_counter()
    manifest = preprocess.build_manifest(Path(out_dir), "idx", cfg, model_cfg, classes)
    end = time.perf_counter()
    return {"seconds": end - start, "transform_write_seconds": written - start, "manifest_seconds": end - written,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kB on Linux
            "rss_before_mb": rss_before_mb, "manifest": manifest}


def split_rows(rows: dict[str, np.ndarray], tables: dict[str, list[pa.Table]]) -> None:
    """Append the transformed rows to their split's tables, columns as ``write_parquet`` writes them."""
    for split, parts in tables.items():
        mask = rows["split"] == split
        parts.append(pa.table({"image": pa.array(list(rows["image"][mask]), pa.binary()),
                               "label": rows["label"][mask], "key": rows["key"][mask]}))


def write_splits(tables: dict[str, list[pa.Table]], out_dir: Path, rows_per_file: int) -> None:
    """``split=<name>/part-NNNNN.parquet`` files of at most ``rows_per_file`` rows (hive layout, like Ray's)."""
    for split, parts in tables.items():
        table = pa.concat_tables(parts)
        folder = out_dir / f"split={split}"
        folder.mkdir(parents=True)
        for index, first in enumerate(range(0, table.num_rows, rows_per_file)):
            pq.write_table(table.slice(first, rows_per_file), folder / f"part-{index:05d}.parquet")


def run_numpy_side(data: dict[str, Any], model: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``numpy_preprocess`` in a fresh spawned process, so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(numpy_preprocess, data, model, str(out_dir)).result()


# -- the Ray step ------------------------------------------------------------------------------------


def run_ray_side(data_cfg, model_cfg, out_dir: Path) -> dict[str, Any]:
    sampler = Sampler(interval=0.2)
    manifest, phases = measure(data_cfg, model_cfg, out_dir, sampler)
    total = sampler.peaks["total"]
    return {"seconds": sum(phases.values()), "ray_init_seconds": phases["ray_init"],
            "ray_data_seconds": phases["ray_data"], "manifest_seconds": phases["manifest"],
            "peak_rss_mb": total["rss_mb"], "peak_private_mb": total["private_mb"],
            "peak_largest_ray_process_rss_mb": total["largest_ray_process_rss_mb"],
            "peak_driver_rss_mb": total["driver_rss_mb"], "rss_before_mb": sampler.baseline_mb,
            "max_processes": sampler.max_processes, "manifest": manifest}


# -- the run -----------------------------------------------------------------------------------------


def figures(side: dict[str, Any]) -> dict[str, Any]:
    """Rounded timings and memory, rows/s, and what the output holds."""
    manifest = side.pop("manifest")
    rows = sum(manifest["counts"].values())
    out = {k: round(v, 2 if k.endswith("seconds") else 1) if isinstance(v, float) else v for k, v in side.items()}
    return {**out, "rows": rows, "rows_per_s": round(rows / side["seconds"], 1), "counts": manifest["counts"],
            "fingerprint": manifest["fingerprint"]}


def main() -> None:
    args = parse_args()
    from pipelines.config import DataConfig
    from vaegan.config import ModelConfig
    data_cfg = DataConfig(data_dir=str(common.REPO / "data"), limit=args.limit)
    data_cfg.validate()
    model_cfg = ModelConfig()  # 28 px, 1 channel: Fashion-MNIST's own size, so nothing is resized
    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="preprocess-", dir=args.work_dir))
    try:
        numpy_side = figures(run_numpy_side(dataclasses.asdict(data_cfg), dataclasses.asdict(model_cfg),
                                            scratch / "numpy"))
        ray_side = figures(run_ray_side(data_cfg, model_cfg, scratch / "ray"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "ratios": {"ray_over_numpy_time": common.ratio(ray_side["seconds"], numpy_side["seconds"]),
                   "ray_data_over_numpy_transform_write_time": common.ratio(ray_side["ray_data_seconds"],
                                                                            numpy_side["transform_write_seconds"]),
                   "ray_over_numpy_peak_rss": common.ratio(ray_side["peak_rss_mb"], numpy_side["peak_rss_mb"])},
        "ray_data": ray_side, "numpy": numpy_side,
        "same_output": ray_side["fingerprint"] == numpy_side["fingerprint"] and ray_side["counts"] == numpy_side["counts"],
        "setup": {"limit": args.limit, "image_shape": [model_cfg.channels, model_cfg.image_size, model_cfg.image_size],
                  "rows_per_file": data_cfg.rows_per_file, "batch_rows": BATCH_ROWS, "ray_num_cpus": os.cpu_count()},
    }
    common.print_table([(f"{name} {key}", side[key]) for name, side in (("ray", ray_side), ("numpy", numpy_side))
                        for key in ("seconds", "rows_per_s", "peak_rss_mb")]
                       + [*result["ratios"].items(), ("same output", result["same_output"])])
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
