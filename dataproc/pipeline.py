"""`zerolm data run`: wires the dataproc steps into one Ray Data job.

    plan (driver: paths and byte ranges only)
      -> read tasks (one Ray task each; bad records become reject rows)
      -> normalize -> filters -> exact-dedup hash key      (fused, whole batches)
      -> hash shuffle on the key -> keep the smallest id per key
      -> near-duplicates (MinHash-LSH / SimHash, dataproc/near_dedup/job.py)
      -> [materialize; first pass: mean/σ per source -> outlier filter]
      -> CorpusSink: data/*.parquet, rejects/*.parquet, counts -> stats.json
      -> _SUCCESS (config hash + input fingerprint)

The driver never holds the corpus: it holds the plan, per-task counts and the
outlier moments (a few numbers per source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

from dataproc.base import Step
from dataproc.config import DataRunConfig, ReadConfig
from dataproc.dedup_exact import HASH, AddHashKey, KeepMinId
from dataproc.filters import build_filters
from dataproc.near_dedup.job import near_dedup
from dataproc.filters.outlier import OutlierFilter, partial_moments, thresholds_from_moments
from dataproc.normalize import Normalizer
from dataproc.quality.stage import add_model_steps, check_models, model_step_names
from dataproc.readers import read_task
from dataproc.sources import plan_read_tasks, read_chunk_bytes
from dataproc.stats import build_stats, format_summary
from dataproc.writer import make_sink
from zerolm.config import config_hash
from zerolm.errors import UserError
from zerolm.ray_env import cluster_cpus, ensure_ray
from zerolm.lineage import describe, raw_files
from zerolm.stage import StageDir, write_json_atomic

STAGE = "data"


READ_COUNTS = ".read_counts"


class ReadTasks:
    """map_batches callable: a batch of planned tasks -> their rows. Each task also
    writes how many rows it read per source to OUT/.read_counts/ (named by the task, so
    a retried task overwrites its own file): rows_in is counted where rows are read,
    independently of the writer's counts, and `check_accounting` compares the two."""

    def __init__(self, read: ReadConfig, counts_dir: str):
        self.read, self.counts_dir = read, counts_dir

    def __call__(self, tasks: pa.Table) -> pa.Table:
        tables = []
        for t in tasks.to_pylist():
            info: dict = {}
            table = read_task(t, self.read.max_record_bytes, self.read.reject_raw_bytes, self.read.encoding, info)
            report = {"rows": dict(Counter(table.column("source").to_pylist()))}
            if t["start"] == 0 and "encoding" in info:  # one file, one choice: reported by its first task
                report.update(file=f"{t['source']}/{t['relpath']}", encoding=info["encoding"])
            name = hashlib.blake2b(json.dumps([t["fs_uri"], t["path"], t["start"]]).encode(), digest_size=12)
            Path(self.counts_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(self.counts_dir) / f"{name.hexdigest()}.json", report)
            tables.append(table)
        return pa.concat_tables(tables)


def read_reports(counts_dir: Path) -> list[dict]:
    return [json.loads(f.read_text(encoding="utf-8")) for f in sorted(counts_dir.glob("*.json"))]


MAX_LISTED = 100  # files named in stats.json's read section; the counts cover all


def read_summary(reports: list[dict], skipped_links: list[dict]) -> dict:
    """stats.json's `read` section: the encoding chosen per file (counted; files not in
    UTF-8 named) and the links the file listing skipped."""
    chosen = {r["file"]: r["encoding"] for r in reports if "encoding" in r}
    other = {f: e for f, e in sorted(chosen.items()) if e != "utf-8"}
    return {"encodings": dict(sorted(Counter(chosen.values()).items())),
            "files_not_utf8": dict(list(other.items())[:MAX_LISTED]),
            "skipped_links": skipped_links[:MAX_LISTED], "skipped_links_total": len(skipped_links)}


def check_accounting(stats: dict, reports: list[dict]) -> None:
    """rows_in as the read tasks counted it must equal rows_out + dropped + rejected as
    the writer counted them, per source; a step that lost or duplicated rows fails the
    stage here (no _SUCCESS) instead of reporting numbers that cannot be trusted."""
    read: dict = {}
    for report in reports:
        for source, n in report["rows"].items():
            read[source] = read.get(source, 0) + n
    written = {s: v["rows_in"] for s, v in stats["sources"].items()}
    if {s: n for s, n in read.items() if n} != {s: n for s, n in written.items() if n}:
        diff = ", ".join(f"{s}: read {read.get(s, 0)}, written {written.get(s, 0)}"
                         for s in sorted(set(read) | set(written)) if read.get(s, 0) != written.get(s, 0))
        raise RuntimeError(f"data stage accounting broken (rows read != rows written + dropped + rejected): {diff}")


class StepChain(Step):
    """Several steps in one map_batches call (one pandas conversion, not one per step)."""

    def __init__(self, steps: list[Step]):
        self.steps = steps

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        for step in self.steps:
            batch = step(batch)
        return batch


def step_order(cfg: DataRunConfig) -> list[str]:
    names = ["read"]
    if cfg.normalize.enabled:
        names.append("normalize")
    names += [f.name for f in build_filters(cfg.filters)]
    if cfg.exact_dedup.enabled:
        names.append("exact_dedup")
    if cfg.near_dedup.method != "off":
        names.append("near_dedup")
    names += model_step_names(cfg)
    if cfg.outlier.enabled:
        names.append("outlier")
    return names


def shuffle_strategy(node_cpus: list[float]) -> str:
    """The Ray Data shuffle for exact dedup and the groupbys, from each node's CPUs.

    "hash_shuffle" (aggregator actors) is the faster one at this job's sizes, but every
    aggregator holds a slice of a CPU (together up to 1/4 of the cluster's) for the
    whole shuffle, while every partitioning task needs a whole CPU on one node. On a
    machine or container with 1 CPU both never fit and the job waits forever.
    "shuffle_v2" runs the shuffle as plain map/reduce tasks (no actors), which always
    get scheduled; it is used when no node has 2 CPUs.
    """
    return "hash_shuffle" if max(node_cpus, default=0) >= 2 else "shuffle_v2"


def run_data(cfg: DataRunConfig, *, overwrite: bool = False, echo=print) -> dict:
    if not cfg.output:
        raise UserError("no output folder: give --output DIR")
    skipped: list = []  # links the file listing did not follow (stats.json's read section)
    tasks = plan_read_tasks(cfg.read.inputs, cfg.read.chunk_bytes, skipped)
    for link in skipped[:5]:
        echo(f"skipped {link['path']}: {link['why']}")
    fingerprint = hashlib.sha256(
        json.dumps(sorted((t.fs_uri + t.path, t.size, t.mtime) for t in tasks)).encode()
    ).hexdigest()
    models = check_models(cfg)  # a bad model file fails here, before any output or Ray
    chash = config_hash({"config": cfg.model_dump(mode="json", exclude={"ray", "output"}), "inputs": fingerprint,
                         **models})
    out = StageDir(Path(cfg.output), STAGE, chash)
    if not out.begin(overwrite=overwrite):
        echo(f"{cfg.output} is already done with this config and these inputs (nothing to do)")
        return json.loads((out.path / "stats.json").read_text(encoding="utf-8"))

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    import ray
    from ray.data.context import DataContext, ShuffleStrategy

    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    chunk = read_chunk_bytes(cfg.read.chunk_bytes, tasks, cluster_cpus())
    if chunk < cfg.read.chunk_bytes:  # one big file would be a few read tasks for many CPUs
        tasks = plan_read_tasks(cfg.read.inputs, chunk)
    ctx = DataContext.get_current()
    ctx.shuffle_strategy = ShuffleStrategy(shuffle_strategy(node_cpus))
    # Blocks in input order (and shuffled partitions sorted by id): the same inputs and
    # config give byte-identical data/ files, so later stages reproduce too.
    ctx.execution_options.preserve_order = True
    started = time.time()
    rows = [t.to_row() for t in tasks]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    counts_dir = out.path.resolve() / READ_COUNTS
    ds = ds.map_batches(ReadTasks(cfg.read, str(counts_dir)), batch_size=1, batch_format="pyarrow")
    steps: list[Step] = [Normalizer(cfg.normalize)] if cfg.normalize.enabled else []
    steps += build_filters(cfg.filters)
    if cfg.exact_dedup.enabled:
        steps.append(AddHashKey())
    if steps:
        ds = ds.map_batches(StepChain(steps), batch_size=cfg.ray.batch_size, batch_format="pandas")
    if cfg.exact_dedup.enabled:
        parts = cfg.exact_dedup.num_partitions or 2 * cluster_cpus()
        # All copies of a text hash to the same partition, and a partition is one
        # block (Ray does not split blocks of a keyed shuffle), so KeepMinId sees them all.
        ds = ds.repartition(parts, keys=[HASH]).map_batches(KeepMinId(), batch_size=None, batch_format="pandas")
    if cfg.near_dedup.method != "off":
        # MinHash/SimHash near-duplicates -> DROP "near_dedup:near_duplicate"; audit in DIR/duplicates/.
        ds, near_info = near_dedup(ds, cfg.near_dedup, out_dir=str(out.path.resolve()), batch_size=cfg.ray.batch_size)
    ds, model_info = add_model_steps(ds, cfg, cfg.ray.batch_size)
    if cfg.outlier.enabled:
        ds = ds.materialize()  # the first pass and the filter read it; compute it once
        o = cfg.outlier
        moments = ds.map_batches(lambda b: partial_moments(b, o.stats, o.per_source),
                                 batch_size=None, batch_format="pandas")
        totals = moments.groupby(["group", "stat"]).sum(["n", "s1", "s2"]).to_pandas()
        totals = totals.rename(columns={"sum(n)": "n", "sum(s1)": "s1", "sum(s2)": "s2"})
        thresholds = thresholds_from_moments(totals, o.k, o.min_docs) if len(totals) else {}
        ds = ds.map_batches(OutlierFilter(o.stats, thresholds, o.per_source),
                            batch_size=cfg.ray.batch_size, batch_format="pandas")
    sink = make_sink(str(out.path.resolve()), cfg.rows_per_file)
    ds.write_datasink(sink)

    stats = build_stats(sink.parts, step_order(cfg))
    reports = read_reports(counts_dir)
    check_accounting(stats, reports)
    stats["read"] = read_summary(reports, skipped)
    shutil.rmtree(counts_dir, ignore_errors=True)
    if cfg.near_dedup.method != "off":
        stats["near_dedup"] = near_info  # band layout, edges, components path/rounds
    stats.update(elapsed_s=round(time.time() - started, 2), read_tasks=len(tasks), config_hash=chash,
                 inputs=[spec.path for spec in cfg.read.inputs])
    if model_info:
        stats["models"] = model_info
    write_json_atomic(out.path / "stats.json", stats)
    (out.path / "config.json").write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
    # Local files by their real path (a symlinked data folder names the same file as
    # lineage records of other stages do); remote ones by their URI.
    inputs = raw_files("raw", ((t.fs_uri + t.path if t.fs_uri else os.path.realpath(t.path), t.size, t.mtime)
                               for t in tasks))
    inputs += [describe(f"{step}.model", getattr(cfg, step).model) for step in models.get("models", {})]
    out.finish(rows_out=stats["rows_out"], inputs=inputs)
    echo(format_summary(stats))
    return stats
