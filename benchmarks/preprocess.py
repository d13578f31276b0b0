"""Preprocessing to Parquet: the product's Ray Data step vs one plain process, on two sources.

IDX: Fashion-MNIST (70,000 28 px grey images), about a second of byte copying, so it measures Ray's fixed
start-up more than anything.
  ray_data  ``pipelines.shards.run`` on a fresh local Ray cluster, Ray start-up included (with RAY_ADDRESS, on
            that cluster, whose start-up is then the connection: the tests' --quick run does so): read the
            IDX files, ``map_batches`` (decode, resize if needed, channels, validate, split by a hash of
            each row's key), ``write_parquet`` partitioned by split, then the manifest read-back.
  numpy     the same work in one process without Ray, in a spawned child (its own memory): the same IDX
            blocks (``idx_blocks``) and ``transform_batch`` over 1024-row batches, pyarrow
            ``write_table`` per split, the same ``build_manifest``.

PNG folder (``png_folder``): ``--images`` (default 50,000) 64 px RGB PNG files in one sub-folder per class,
where decoding dominates. The benchmark generates them once into ``--work-dir`` (Fashion-MNIST upscaled,
tinted and grained, so each file compresses and decodes like a small photo) and reuses them; before the
two sides run it reads every file once, so both find them in the page cache.
  ray_data  ``pipelines.shards.run`` with that folder as ``data.source`` (model.image_size=64,
            model.channels=3) on a fresh local Ray, start-up included.
  script    one spawned process, no Ray: list the folder (``image_files``), read each file, decode with
            PIL (``transform_batch``) 1024 files at a time, and stream the rows through one pyarrow
            ``ParquetWriter`` per split (bounded memory), then the same ``build_manifest``.
``ratios.ray_over_script_png_time`` is Ray's seconds (start-up included) over the script's.
``ratios.ray_over_script_png_time_at_perfect_scaling`` is what that ratio would be if Ray's Data phase took
the script's decode and write split perfectly over the cores, with Ray's start-up and manifest as measured:
the best this start-up allows. ``data_phase_cpu_seconds`` says where Ray's cores went in the Data phase,
per kind of process (task workers, Ray Data's own actors, the driver, Ray's daemons), beside the script's
``transform_write_cpu_seconds``.

Each pair writes the same rows, so their manifests carry the same fingerprint (checked: ``same_output``).
Peak RSS: for Ray, the sum over the driver and every process of the cluster, sampled every 0.2 s
(``preprocess_memory.Sampler``; shared object-store pages count once per process that maps them);
for the one-process side, the child's own peak (``getrusage``). Both include the imports (torch, ray,
pyarrow).

Run from the repository root, under the shared Ray lock (2-core times; the first run also writes the PNG
files, ~1 min for 50,000):
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/preprocess.py          # 70,000 IDX + 50,000 PNG, ~3 min
    flock /tmp/vaegan-ray.lock .venv/bin/python benchmarks/preprocess.py --quick  # 2,000 IDX + 500 PNG, ~1 min
Results: benchmarks/results/preprocess.json (--quick: preprocess_quick.json; --out to change).
"""
from __future__ import annotations

import dataclasses
import json
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
from PIL import Image
from preprocess_memory import MiB, Sampler, measure

BATCH_ROWS = 1024  # the Ray step's map_batches batch size
PNG_SIZE = 64  # px, RGB
PNG_CHUNK = 2500  # images per generation task


def parse_args():
    p = common.argument_parser(__doc__)
    p.add_argument("--limit", type=int, default=None, help="data.limit (default 0: all 70,000; --quick: 2000)")
    p.add_argument("--images", type=int, default=None, help="PNG files to generate (default 50000; --quick: 500)")
    args = p.parse_args()
    args.limit = args.limit if args.limit is not None else (2000 if args.quick else 0)
    args.images = args.images if args.images is not None else (500 if args.quick else 50000)
    args.out = common.result_path(args, "preprocess")
    return args


# -- the PNG folder ----------------------------------------------------------------------------------


def png_folder(work_dir: Path, n: int) -> tuple[Path, dict[str, Any]]:
    """The cached folder of ``n`` 64 px RGB PNG files, ``<label>/<index>.png``, and its description."""
    name = f"fashion-png-{PNG_SIZE}px-rgb-n{n}"
    folder, meta_file = work_dir / name, work_dir / f"{name}.json"  # beside it: the folder holds images only
    if folder.is_dir() and meta_file.is_file():
        return folder, {**json.loads(meta_file.read_text()), "cached": True}
    from vaegan import data as vdata
    idx_dir, cache = vdata.find_idx_dir(None, common.REPO / "data"), common.REPO / "data" / "idx-cache"
    splits = [vdata.load_idx(idx_dir, split, cache_dir=cache) for split in ("train", "test")]
    grey = np.concatenate([images[:, 0].numpy() for images, _ in splits])  # (70000, 28, 28) uint8
    labels = np.concatenate([split_labels.numpy() for _, split_labels in splits])
    picked = np.arange(n) % len(grey)  # past 70,000 the images repeat, in other colours
    partial = work_dir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for label in np.unique(labels):
        (partial / str(label)).mkdir(parents=True)
    start = time.perf_counter()
    firsts = range(0, n, PNG_CHUNK)
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        encoded = sum(pool.map(write_pngs, [str(partial)] * len(firsts), firsts,
                               [grey[picked[f:f + PNG_CHUNK]] for f in firsts],
                               [labels[picked[f:f + PNG_CHUNK]] for f in firsts]))
    shutil.rmtree(folder, ignore_errors=True)  # a folder without its JSON is one whose generation was cut short
    partial.rename(folder)
    meta = {"folder": name, "images": n, "image_shape": [3, PNG_SIZE, PNG_SIZE], "classes": len(np.unique(labels)),
            "content": "Fashion-MNIST upscaled bicubic to 64 px, tinted, grain sigma 3",
            "encoded_bytes": encoded, "decoded_bytes": n * 3 * PNG_SIZE**2,
            "generate_seconds": round(time.perf_counter() - start, 2)}
    meta_file.write_text(json.dumps(meta, indent=2))
    return folder, {**meta, "cached": False}


def write_pngs(folder: str, first: int, grey: np.ndarray, labels: np.ndarray) -> int:
    """``<folder>/<label>/<first + i>.png`` for each (28, 28) grey image: upscaled to 64 px, lit in a random
    colour over a random dark background, with some grain (so it compresses like a small photo, not a
    flat drawing); returns the bytes written."""
    rng = np.random.default_rng(first)
    written = 0
    for i, (image, label) in enumerate(zip(grey, labels)):
        big = Image.fromarray(image).resize((PNG_SIZE, PNG_SIZE), Image.Resampling.BICUBIC)
        light = np.asarray(big, np.float32)[..., None] / 255  # (H, W, 1) in [0, 1]
        fg, bg = rng.uniform(120, 255, 3), rng.uniform(0, 60, 3)
        rgb = bg + light * (fg - bg) + rng.normal(0, 3, (PNG_SIZE, PNG_SIZE, 3))  # (H, W, C)
        path = Path(folder) / str(label) / f"{first + i:06d}.png"
        Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB").save(path)
        written += path.stat().st_size
    return written


def read_all(folder: Path) -> None:
    """Read every file once, so both sides find them in the page cache (neither pays the first disk read)."""
    for path in folder.rglob("*.png"):
        path.read_bytes()


# -- the single-process scripts ----------------------------------------------------------------------


def numpy_preprocess(data: dict[str, Any], model: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """The Ray step's work on the IDX source in this process alone; returns its timings, peak RSS and manifest."""
    import psutil  # importable once ray is (ray/thirdparty_files); preprocess_memory imported it

    from pipelines import shards, sources
    from pipelines.config import DataConfig
    from vaegan.config import ModelConfig
    rss_before_mb = psutil.Process().memory_info().rss / MiB
    start = time.perf_counter()
    cfg, model_cfg = DataConfig(**data), ModelConfig(**model)
    blocks, classes = sources.idx_blocks(cfg)
    shape = {"image_size": model_cfg.image_size, "channels": model_cfg.channels}
    tables: dict[str, list[pa.Table]] = {split: [] for split in shards.SPLITS}
    for block in blocks:
        for first in range(0, len(block["key"]), BATCH_ROWS):
            batch = {name: column[first:first + BATCH_ROWS] for name, column in block.items()}
            rows = shards.transform_batch(batch, data, shape)
            for split, parts in tables.items():
                parts.append(split_table(rows, split))
    write_splits(tables, Path(out_dir), cfg.rows_per_file)
    written = time.perf_counter()
    manifest = shards.build_manifest(Path(out_dir), "idx", cfg, model_cfg, classes)
    end = time.perf_counter()
    return {"seconds": end - start, "transform_write_seconds": written - start, "manifest_seconds": end - written,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kB on Linux
            "rss_before_mb": rss_before_mb, "manifest": manifest}


def png_script_preprocess(data: dict[str, Any], model: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """The step's work on an image folder in this process alone: PIL decode (``transform_batch``) 1024
    files at a time, rows streamed to Parquet; returns its timings, peak RSS and manifest."""
    import psutil

    from pipelines import shards, sources
    from pipelines.config import DataConfig
    from vaegan.config import ModelConfig
    rss_before_mb = psutil.Process().memory_info().rss / MiB
    start, start_cpu = time.perf_counter(), time.process_time()
    cfg, model_cfg = DataConfig(**data), ModelConfig(**model)
    root = str(Path(cfg.source).resolve())
    classes = sources.image_classes(root)
    files = sources.image_files(root, cfg.limit)
    shape = {"image_size": model_cfg.image_size, "channels": model_cfg.channels}
    with SplitWriter(Path(out_dir), cfg.rows_per_file) as writer:
        for first in range(0, len(files), BATCH_ROWS):
            chunk = files[first:first + BATCH_ROWS]
            batch = sources.read_image_files({"path": np.array(chunk)}, root, classes)
            writer.write(shards.transform_batch(batch, data, shape))
    written, written_cpu = time.perf_counter(), time.process_time()
    manifest = shards.build_manifest(Path(out_dir), "images", cfg, model_cfg, classes)
    end = time.perf_counter()
    return {"seconds": end - start, "transform_write_seconds": written - start,
            "transform_write_cpu_seconds": written_cpu - start_cpu, "manifest_seconds": end - written,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before_mb, "manifest": manifest}


def split_table(rows: dict[str, np.ndarray], split: str) -> pa.Table:
    """The transformed rows of one split, columns as ``write_parquet`` writes them."""
    mask = rows["split"] == split
    return pa.table({"image": pa.array(list(rows["image"][mask]), pa.binary()),
                     "label": rows["label"][mask], "key": rows["key"][mask]})


def write_splits(tables: dict[str, list[pa.Table]], out_dir: Path, rows_per_file: int) -> None:
    """``split=<name>/part-NNNNN.parquet`` files of at most ``rows_per_file`` rows (hive layout, like Ray's)."""
    for split, parts in tables.items():
        table = pa.concat_tables(parts)
        folder = out_dir / f"split={split}"
        folder.mkdir(parents=True)
        for index, first in enumerate(range(0, table.num_rows, rows_per_file)):
            pq.write_table(table.slice(first, rows_per_file), folder / f"part-{index:05d}.parquet")


class SplitWriter:
    """``write_splits``'s layout written as rows arrive: one open ``ParquetWriter`` per split, a new
    ``part-NNNNN.parquet`` every ``rows_per_file`` rows, so memory holds one batch, not the dataset."""

    def __init__(self, out_dir: Path, rows_per_file: int):
        self.out_dir, self.rows_per_file = out_dir, rows_per_file
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows_in_file: dict[str, int] = {}
        self.files: dict[str, int] = {}

    def write(self, rows: dict[str, np.ndarray]) -> None:
        for split in map(str, np.unique(rows["split"])):
            table = split_table(rows, split)
            while table.num_rows:
                writer = self._writer(split, table.schema)
                part = table.slice(0, self.rows_per_file - self.rows_in_file[split])
                writer.write_table(part)
                self.rows_in_file[split] += part.num_rows
                table = table.slice(part.num_rows)

    def _writer(self, split: str, schema: pa.Schema) -> pq.ParquetWriter:
        if split in self.writers and self.rows_in_file[split] < self.rows_per_file:
            return self.writers[split]
        if split in self.writers:
            self.writers[split].close()
        index = self.files[split] = self.files.get(split, -1) + 1
        folder = self.out_dir / f"split={split}"
        folder.mkdir(parents=True, exist_ok=True)
        self.writers[split] = pq.ParquetWriter(folder / f"part-{index:05d}.parquet", schema)
        self.rows_in_file[split] = 0
        return self.writers[split]

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self.writers.values():
            writer.close()


def in_child(fn, data: dict[str, Any], model: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``fn(data, model, out_dir)`` in a fresh spawned process, so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, data, model, str(out_dir)).result()


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
            "max_processes": sampler.max_processes,
            "data_phase_cpu_seconds": sampler.cpu_seconds_between("ray_data", "manifest"), "manifest": manifest}


# -- the run -----------------------------------------------------------------------------------------


def figures(side: dict[str, Any]) -> dict[str, Any]:
    """Rounded timings and memory, rows/s, and what the output holds."""
    manifest = side.pop("manifest")
    rows = sum(manifest["counts"].values())
    out = {k: round(v, 2 if k.endswith("seconds") else 1) if isinstance(v, float) else v for k, v in side.items()}
    return {**out, "rows": rows, "rows_per_s": round(rows / side["seconds"], 1), "counts": manifest["counts"],
            "fingerprint": manifest["fingerprint"]}


def idx_comparison(args, scratch: Path) -> dict[str, Any]:
    """Fashion-MNIST's IDX files: the numpy script, then the Ray step."""
    from pipelines.config import DataConfig
    from vaegan.config import ModelConfig
    data_cfg = DataConfig(data_dir=str(common.REPO / "data"), limit=args.limit)
    data_cfg.validate()
    model_cfg = ModelConfig()  # 28 px, 1 channel: Fashion-MNIST's own size, so nothing is resized
    numpy_side = figures(in_child(numpy_preprocess, dataclasses.asdict(data_cfg), dataclasses.asdict(model_cfg),
                                  scratch / "numpy"))
    ray_side = figures(run_ray_side(data_cfg, model_cfg, scratch / "ray"))
    return {
        "ratios": {"ray_over_numpy_time": common.ratio(ray_side["seconds"], numpy_side["seconds"]),
                   "ray_data_over_numpy_transform_write_time": common.ratio(ray_side["ray_data_seconds"],
                                                                            numpy_side["transform_write_seconds"]),
                   "ray_over_numpy_peak_rss": common.ratio(ray_side["peak_rss_mb"], numpy_side["peak_rss_mb"])},
        "ray_data": ray_side, "numpy": numpy_side,
        "same_output": ray_side["fingerprint"] == numpy_side["fingerprint"] and ray_side["counts"] == numpy_side["counts"],
        "setup": {"limit": args.limit, "image_shape": [model_cfg.channels, model_cfg.image_size, model_cfg.image_size],
                  "rows_per_file": data_cfg.rows_per_file, "batch_rows": BATCH_ROWS, "ray_num_cpus": os.cpu_count()},
    }


def png_comparison(args, scratch: Path) -> dict[str, Any]:
    """A folder of ``args.images`` 64 px RGB PNG files: the PIL + pyarrow script, then the Ray step."""
    from pipelines.config import DataConfig
    from vaegan.config import ModelConfig
    folder, source = png_folder(args.work_dir, args.images)
    print(f"[bench] {args.images} PNG files {'cached' if source['cached'] else 'generated'} in {folder} "
          f"({source['encoded_bytes'] / MiB:.0f} MiB)", flush=True)
    read_all(folder)
    data_cfg = DataConfig(source=str(folder), format="images")
    model_cfg = ModelConfig(image_size=PNG_SIZE, channels=3)
    data_cfg.validate()
    model_cfg.validate()
    script = figures(in_child(png_script_preprocess, dataclasses.asdict(data_cfg), dataclasses.asdict(model_cfg),
                              scratch / "png-script"))
    ray_side = figures(run_ray_side(data_cfg, model_cfg, scratch / "png-ray"))
    same = ray_side["fingerprint"] == script["fingerprint"] and ray_side["counts"] == script["counts"]
    return {"images": args.images, "source": source, "ray_data": ray_side, "script": script, "same_output": same}


def main() -> None:
    args = parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="preprocess-", dir=args.work_dir))
    try:
        result = idx_comparison(args, scratch)
        png = png_comparison(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["ratios"].update({
        "ray_over_script_png_time": common.ratio(png["ray_data"]["seconds"], png["script"]["seconds"]),
        "ray_over_script_png_time_at_perfect_scaling": common.ratio(
            png["ray_data"]["ray_init_seconds"] + png["script"]["transform_write_seconds"] / result["setup"]["ray_num_cpus"]
            + png["ray_data"]["manifest_seconds"], png["script"]["seconds"]),
        "ray_over_script_png_peak_rss": common.ratio(png["ray_data"]["peak_rss_mb"], png["script"]["peak_rss_mb"])})
    result["png_folder"] = png
    sides = (("ray", result["ray_data"]), ("numpy", result["numpy"]),
             ("png ray", png["ray_data"]), ("png script", png["script"]))
    common.print_table([(f"{name} {key}", side[key]) for name, side in sides
                        for key in ("seconds", "rows_per_s", "peak_rss_mb")]
                       + [*result["ratios"].items(), ("same output", result["same_output"]),
                          ("png same output", png["same_output"])])
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
