"""Preprocess memory: ``pipelines.shards.run`` streams a dataset several times the object store.

Generates (once, cached under ``--work-dir``) a Parquet source of ``--n`` procedural 64 px RGB
images (``vaegan.data.make_shapes``) stored as encoded PNG bytes in column ``image`` plus
``label``, starts a local Ray cluster with a deliberately small object store
(``--object-store-mb``, default 128 MiB), runs the preprocess step on it and samples, every
``--interval`` seconds, the summed RSS of the driver and of every process of that Ray cluster
(the driver's descendants: gcs_server, raylet, workers, ...) and the raylet's object-store stats.
The default ``--n 50000`` decodes to 50000*3*64*64 B = 586 MiB, ~4.6x the 128 MiB object store;
``--quick`` (2000 images, 23 MiB) runs the same settings, so its peaks are the small-N baseline.

Run it from the repository root (prefix PYTHONPATH=. where the package is not installed):
    python benchmarks/preprocess_memory.py                 # full size, ~4x the object store
    python benchmarks/preprocess_memory.py --quick         # 2000 images, for tests
Results go to benchmarks/results/preprocess_memory.json (``--quick``: preprocess_memory_quick.json;
``--out`` to change). The source stays cached in --work-dir (default /tmp/vaegan-bench); the
preprocess output is deleted afterwards unless ``--keep-output``.

"peak_rss_mb" sums RSS over processes, so pages of the shared-memory object store mapped by
several processes are counted once per process (an upper bound); "peak_private_mb" sums RSS minus
shared pages (a lower bound on the pipeline's own heap). Both include the driver, which runs the
Ray Data executor and then builds the manifest (phase "manifest", timed separately).
Streaming is bounded when the "ray_data" phase peaks (above all "largest Ray process", the
worker that decodes and writes) are about the same for --quick and the full size; the object
store rarely fills, because map_batches is fused with the Parquet write and decoded rows stay in
the worker's heap ("output ... write task(s)" says how many tasks shared the rows).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray  # puts ray/thirdparty_files (which holds psutil) on sys.path
import ray.data

try:
    import psutil
except ImportError as err:  # ray[default] vendors psutil in ray/thirdparty_files
    raise SystemExit(f"psutil is not importable ({err}); install ray[default] or psutil") from err
import common
from PIL import Image

from pipelines import shards
from pipelines.config import DataConfig
from vaegan.config import ModelConfig
from vaegan.data import make_shapes

MiB = 1024 * 1024


def parse_args():
    p = common.argument_parser(__doc__, work_dir=Path("/tmp/vaegan-bench"))
    p.add_argument("--n", type=int, default=50000, help="source images (default 50000: 586 MiB decoded)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--object-store-mb", type=int, default=128, help="Ray object store, MiB")
    p.add_argument("--rows-per-file", type=int, default=DataConfig.rows_per_file,
                   help="data.rows_per_file of the preprocess output (default: DataConfig's)")
    p.add_argument("--source-rows-per-file", type=int, default=2000, help="rows per generated source Parquet file")
    p.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--keep-output", action="store_true", help="keep the preprocess output folder")
    args = p.parse_args()
    if args.quick:  # 2000 images
        args.n = 2000
        args.source_rows_per_file = min(args.source_rows_per_file, 500)  # 4 source files
    args.out = common.result_path(args, "preprocess_memory")
    return args


# -- the source dataset ------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_source(work_dir: Path, n: int, size: int, rows_per_file: int) -> tuple[Path, dict]:
    """The cached Parquet source (``image`` PNG bytes, ``label`` int64) and its description."""
    name = f"shapes-{size}px-rgb-n{n}-r{rows_per_file}"
    folder, meta_file = work_dir / name, work_dir / f"{name}.json"  # the JSON sits beside, not inside
    if folder.is_dir() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        meta["cached"] = True
        return folder, meta
    partial = work_dir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start, encoded = time.perf_counter(), 0
    for i, first in enumerate(range(0, n, rows_per_file)):  # one chunk in memory at a time
        count = min(rows_per_file, n - first)
        images, labels = make_shapes(count, size, channels=3, seed=i)
        pngs = []
        for img in images.permute(0, 2, 3, 1).numpy():  # (C, H, W) -> (H, W, C) for PIL
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="PNG")
            pngs.append(buf.getvalue())
        encoded += sum(map(len, pngs))
        table = pa.table({"image": pa.array(pngs, pa.binary()), "label": pa.array(labels.numpy(), pa.int64())})
        pq.write_table(table, partial / f"part-{i:05d}.parquet")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    meta = {"path": str(folder), "n": n, "image_shape": [3, size, size], "files": len(list(folder.glob("*.parquet"))),
            "rows_per_file": rows_per_file, "encoding": "png", "encoded_bytes": encoded,
            "on_disk_bytes": _dir_bytes(folder), "decoded_bytes": n * 3 * size * size,
            "generate_seconds": round(time.perf_counter() - start, 2)}
    meta_file.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return folder, meta


# -- sampling --------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every ``interval`` s: summed RSS (and RSS - shared) of the driver and this Ray cluster's
    processes, the raylet's object-store usage, and the phase the run is in."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.driver = psutil.Process()
        self.stop_event = threading.Event()
        self.phase = "setup"
        self.peaks: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.max_processes = 0
        self.at_peak: list[dict] = []
        self.baseline_mb = 0.0
        self.store_error: str | None = None
        self.roots: list[psutil.Process] = []  # this cluster's daemons, in case one is not our descendant
        self.raylet: tuple[str, int] | None = None
        self.cpu_marks: dict[str, dict[int, tuple[str, float]]] = {}

    def attach(self) -> None:
        """Find this cluster's raylet (for store stats) and its processes by session dir."""
        node = ray.nodes()[0]
        self.raylet = (node["NodeManagerAddress"], node["NodeManagerPort"])
        session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if session in cmd and any(k in cmd for k in ("raylet", "gcs_server", "ray::")):
                self.roots.append(proc)

    def processes(self) -> list[psutil.Process]:
        found = {self.driver.pid: self.driver}
        for root in [self.driver, *self.roots]:
            try:
                found[root.pid] = root
                found.update((c.pid, c) for c in root.children(recursive=True))
            except psutil.Error:
                continue
        return list(found.values())

    def _label(self, proc: psutil.Process) -> str:
        if proc.pid == self.driver.pid:
            return "driver"
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            return "?"
        return (Path(cmd[0]).name if cmd and "/" in cmd[0] else " ".join(cmd[:1]))[:60] or proc.name()

    def mark_cpu(self, name: str) -> None:
        """Note every process's CPU seconds (user + system) so far, under ``name``."""
        marks = {}
        for proc in self.processes():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            marks[proc.pid] = (self._label(proc), times.user + times.system)
        self.cpu_marks[name] = marks

    def cpu_seconds_between(self, first: str, last: str) -> dict[str, float]:
        """CPU seconds each kind of process (driver, task workers, each Ray Data actor, each daemon) spent
        between two marks, most first; a process started in between counts from its start."""
        spent: dict[str, float] = {}
        for pid, (label, seconds) in self.cpu_marks[last].items():
            spent[label] = spent.get(label, 0.0) + seconds - self.cpu_marks[first].get(pid, (label, 0.0))[1]
        return {label: round(s, 2) for label, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s >= 0.05}

    def store_used(self) -> dict[str, float] | None:
        if self.raylet is None or self.store_error:
            return None
        try:
            from ray._private.internal_api import node_stats
            s = node_stats(*self.raylet, include_memory_info=False).store_stats
        except Exception as err:  # noqa: BLE001 - a private API: report, don't fail the run
            self.store_error = f"{type(err).__name__}: {err}"
            return None
        return {"store_used_mb": s.object_store_bytes_used / MiB, "store_fallback_mb": s.object_store_bytes_fallback / MiB,
                "spilled_mb": s.spilled_bytes_total / MiB, "restored_mb": s.restored_bytes_total / MiB}

    def sample(self) -> None:
        rss = private = 0
        procs = self.processes()
        per_process = []
        for proc in procs:
            try:
                mem = proc.memory_info()
            except psutil.Error:
                continue
            rss += mem.rss
            private += mem.rss - getattr(mem, "shared", 0)
            per_process.append((proc, mem.rss))
        if rss / MiB > self.peaks.get("total", {}).get("rss_mb", 0.0):  # who holds the memory at the peak
            self.at_peak = [{"pid": p.pid, "process": self._label(p), "rss_mb": round(m / MiB, 1), "phase": self.phase}
                            for p, m in sorted(per_process, key=lambda pm: -pm[1])]
        workers = [m for p, m in per_process if p.pid != self.driver.pid]
        values = {"rss_mb": rss / MiB, "private_mb": private / MiB, "driver_rss_mb": self.driver.memory_info().rss / MiB,
                  "largest_ray_process_rss_mb": max(workers, default=0) / MiB}
        values.update(self.store_used() or {})
        for phase in (self.phase, "total"):
            peak = self.peaks.setdefault(phase, {})
            for key, value in values.items():
                peak[key] = max(peak.get(key, 0.0), value)
        self.samples += 1
        self.max_processes = max(self.max_processes, len(procs))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def finish(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


# -- the benchmark ---------------------------------------------------------------------------------


def measure(data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: Path, sampler: Sampler,
            **ray_init_kwargs) -> tuple[dict, dict[str, float]]:
    """Start a local Ray cluster (with RAY_ADDRESS and no ``ray_init_kwargs``: join that one, whose start-up is
    then the connection) and run the preprocess step on it while ``sampler`` samples.

    Returns the manifest and the seconds of each phase: ``ray_init`` (cluster start), ``ray_data``
    (read .. write_parquet returned) and ``manifest`` (the driver reads the output back).
    """
    sampler.baseline_mb = sampler.driver.memory_info().rss / MiB
    sampler.start()
    times = {"start": time.perf_counter()}
    try:
        with common.local_ray(**ray_init_kwargs) if ray_init_kwargs else common.pipeline_ray():
            times["ray_ready"] = time.perf_counter()
            sampler.attach()
            real_build_manifest = shards.build_manifest

            def timed_build_manifest(*a, **kw):  # marks the end of the Ray Data phase (write_parquet returned)
                times["manifest_start"] = time.perf_counter()
                sampler.mark_cpu("manifest")
                sampler.phase = "manifest"
                return real_build_manifest(*a, **kw)

            shards.build_manifest = timed_build_manifest  # run() looks it up in the module at call time
            sampler.phase = "ray_data"
            sampler.mark_cpu("ray_data")
            try:
                manifest = shards.run(data_cfg, model_cfg, out_dir)
            finally:
                shards.build_manifest = real_build_manifest
            times["end"] = time.perf_counter()
    finally:
        sampler.finish()
    times.setdefault("manifest_start", times["end"])
    return manifest, {"ray_init": times["ray_ready"] - times["start"],
                      "ray_data": times["manifest_start"] - times["ray_ready"],
                      "manifest": times["end"] - times["manifest_start"]}


def main() -> None:
    args = parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"[bench] source: {args.n} images, {args.image_size} px RGB PNG, in {args.work_dir}", flush=True)
    source, dataset = make_source(args.work_dir, args.n, args.image_size, args.source_rows_per_file)
    print(f"[bench] source {'cached' if dataset['cached'] else 'generated'}: {dataset['files']} files, "
          f"{dataset['on_disk_bytes'] / MiB:.1f} MiB on disk, {dataset['decoded_bytes'] / MiB:.1f} MiB decoded", flush=True)

    out_dir = args.work_dir / f"out-{os.getpid()}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    sampler = Sampler(args.interval)
    data_cfg = DataConfig(source=str(source), rows_per_file=args.rows_per_file)
    data_cfg.validate()
    try:
        manifest, phases_s = measure(data_cfg, ModelConfig(image_size=args.image_size, channels=3), out_dir, sampler,
                                     num_cpus=args.num_cpus, object_store_memory=args.object_store_mb * MiB,
                                     include_dashboard=False)  # as its earlier results ran: comparable peaks
        seconds, ray_data_s = phases_s["ray_data"] + phases_s["manifest"], phases_s["ray_data"]
        baseline_mb = sampler.baseline_mb
        rows = sum(manifest["counts"].values())
        if rows != args.n:
            raise SystemExit(f"[bench] preprocess wrote {rows} rows, expected {args.n}: {manifest['counts']}")
        out_files = sorted(out_dir.rglob("*.parquet"))
        output = {"rows": rows, "counts": manifest["counts"], "files": len(out_files),
                  "on_disk_bytes": _dir_bytes(out_dir),
                  "largest_file_rows": max(pq.ParquetFile(f).metadata.num_rows for f in out_files),
                  # Ray names files <write uuid>_<task index>-<i>.parquet: distinct task indices = write tasks
                  "write_tasks": len({f.name.rsplit("-", 1)[0] for f in out_files})}
    finally:
        if not args.keep_output:
            shutil.rmtree(out_dir, ignore_errors=True)

    total, phases = sampler.peaks["total"], sampler.peaks
    decoded_mb = dataset["decoded_bytes"] / MiB

    def r(x: float | None, d: int = 1) -> float | None:
        return None if x is None else round(x, d)

    result = {
        "dataset": {k: v for k, v in dataset.items()},
        "object_store_mb": args.object_store_mb,
        "num_cpus": args.num_cpus,
        "rows_per_file": args.rows_per_file,
        "seconds": r(seconds, 2),
        "ray_data_seconds": r(ray_data_s, 2),
        "manifest_seconds": r(seconds - ray_data_s, 2),
        "rows_per_s": r(args.n / seconds),
        "ray_data_rows_per_s": r(args.n / ray_data_s),
        "peak_rss_mb": r(total["rss_mb"]),
        "peak_private_mb": r(total["private_mb"]),
        "peak_driver_rss_mb": r(total["driver_rss_mb"]),
        "peak_largest_ray_process_rss_mb": r(total["largest_ray_process_rss_mb"]),
        "driver_rss_before_mb": r(baseline_mb),
        "peak_by_phase": {phase: {k: r(v) for k, v in peak.items()} for phase, peak in phases.items() if phase != "total"},
        "peak_object_store_mb": r(total.get("store_used_mb")),
        "spilled_mb": r(total.get("spilled_mb")),
        "object_store_fallback_mb": r(total.get("store_fallback_mb")),
        "object_store_stats_error": sampler.store_error,
        "decoded_mb": r(decoded_mb),
        "decoded_over_object_store": r(decoded_mb / args.object_store_mb, 2),
        "peak_rss_over_decoded": r(total["rss_mb"] / decoded_mb, 2),
        "processes_at_peak_rss": sampler.at_peak,
        "samples": sampler.samples,
        "max_processes": sampler.max_processes,
        "output": output,
        "ray_init_seconds": r(phases_s["ray_init"], 2),
    }

    table = [
        ("images", f"{args.n}"),
        ("source on disk (PNG Parquet)", f"{dataset['on_disk_bytes'] / MiB:.1f} MiB"),
        ("decoded size (N*3*64*64)", f"{decoded_mb:.1f} MiB"),
        ("object store", f"{args.object_store_mb} MiB"),
        ("decoded / object store", f"{result['decoded_over_object_store']:.2f}x"),
        ("total time", f"{seconds:.1f} s ({result['rows_per_s']:.0f} rows/s)"),
        ("  Ray Data (read..write)", f"{ray_data_s:.1f} s ({result['ray_data_rows_per_s']:.0f} rows/s)"),
        ("  manifest (driver)", f"{seconds - ray_data_s:.1f} s"),
        ("peak RSS, driver + Ray", f"{total['rss_mb']:.0f} MiB"),
        ("peak RSS - shared", f"{total['private_mb']:.0f} MiB"),
        ("peak driver RSS", f"{total['driver_rss_mb']:.0f} MiB (before: {baseline_mb:.0f})"),
        ("peak RSS of one Ray process", f"{total['largest_ray_process_rss_mb']:.0f} MiB"),
        ("  peak RSS while starting Ray", f"{phases['setup']['rss_mb']:.0f} MiB"),
    ]
    for phase in ("ray_data", "manifest"):
        if phase in phases:
            peak = phases[phase]
            table.append((f"  peak RSS in {phase}", (f"{peak['rss_mb']:.0f} MiB (driver {peak['driver_rss_mb']:.0f}, "
                                                     f"largest Ray process {peak['largest_ray_process_rss_mb']:.0f})")))
    if "store_used_mb" in total:
        table.append(("peak object store used", f"{total['store_used_mb']:.0f} MiB"))
        table.append(("spilled to disk", f"{total['spilled_mb']:.0f} MiB"))
    table.append(("output", (f"{output['files']} files from {output['write_tasks']} write task(s), "
                             f"{output['on_disk_bytes'] / MiB:.1f} MiB, largest {output['largest_file_rows']} rows")))
    table.append(("split counts", f"{output['counts']}"))
    common.print_table(table)
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
