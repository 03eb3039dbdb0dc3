"""Packing throughput (`zerolm pack`, dataproc.pack.run_pack) against the bare
tokenizer, in MB/s of text (UTF-8 bytes of the `text` column) and tokens/s.

    python3 bench/pack_throughput.py [--data DIR] [--repeat 2] [--scale 1]   (from the repository root)

Setup, once, in a temp dir: `run_data` on zh + en text of ../shared/data (People's
Daily, cmrc2018 contexts, reviews, wiki_demo, c4, tiny_shakespeare), a tokenizer of
vocab 8000 trained on it (`train_tokenizer`), then a corpus of `--scale` copies of the
clean documents, each copy's ids suffixed "~k" (distinct ids, so the train/val split
differs per copy as it would for new documents), and a tiny corpus (the first 256
documents) to measure the fixed cost of a pack run.

Measured in the same run:
  bare      `Tokenizer.encode_batch_fast` and `encode_batch` over the same texts in
            batches of PackConfig.batch_size, one process, tokenizer loaded like
            pack loads it; in a subprocess with RAYON_NUM_THREADS=1 (per-core limit)
            and one with default threads (all cores).
  pipeline  run_pack with num_workers=1 in a local Ray with num_cpus=1, then with
            num_workers=2 in a fresh Ray with num_cpus=2 (wall clock of run_pack in
            a started Ray), and the CPU seconds of the driver plus every Ray process
            (bench/common.py CpuMeter). "minus fixed cost" subtracts the
            tiny run's wall / CPU (planning, Ray Data start-up, task scheduling,
            manifest): the steady-state rate. One untimed tiny run first starts the
            workers.
Ratios (the issue's goal: >= 0.9): pipeline rate per worker / bare encode_batch_fast
rate with RAYON_NUM_THREADS=1, by wall clock (`wall`, `wall_adjusted`) and by CPU
seconds (`cpu`, `cpu_adjusted`: MB per CPU-second, what one core delivers whatever
else runs on the machine). That bare run is repeated right after every pack run
(paired: both see about the same load); the table gives the median of the per-pair
ratios. Tokens exclude the appended <|endoftext|>.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # `python3 bench/pack_throughput.py` (bench/ on sys.path) or `python3 -m bench.pack_throughput`
    from common import (DEFAULT_DATA, emit, inputs_for, load1, machine, print_table, ray_session,
                        CpuMeter, summary)
except ImportError:
    from bench.common import (DEFAULT_DATA, emit, inputs_for, load1, machine, print_table, ray_session,
                              CpuMeter, summary)

MB = 1e6
BATCH = 512  # PackConfig.batch_size default; the bare loop uses the same batches


def bare(tok_dir: str, corpus: str, repeat: int, fns: str) -> None:
    """Subprocess body: time the bare tokenizer, print one JSON object."""
    import pyarrow.parquet as pq

    from dataproc.tokenizer import load_tokenizer_dir

    texts = [t for f in sorted(Path(corpus, "data").glob("*.parquet"))
             for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tok = load_tokenizer_dir(tok_dir, encode_special_tokens=True)
    out = {"mb": nbytes / MB, "docs": len(texts)}
    for name in fns.split(","):
        fn, times, cpu = getattr(tok, name), [], []
        for _ in range(repeat):
            t, c, tokens = time.perf_counter(), time.process_time(), 0
            for i in range(0, len(texts), BATCH):
                tokens += sum(len(e.ids) for e in fn(texts[i:i + BATCH], add_special_tokens=False))
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[name] = {"walls": times, "cpu_s": round(min(cpu), 3), "tokens": tokens}
    print(json.dumps(out))


def run_bare(tok_dir: Path, corpus: Path, repeat: int, threads: str | None, fns: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    if threads:
        env["RAYON_NUM_THREADS"] = threads  # read when tokenizers starts its thread pool
    proc = subprocess.run([sys.executable, __file__, "--bare", str(tok_dir), str(corpus), str(repeat), fns],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_record(label: str, fn: str, mb: float, walls: list[float], tokens: int, cpu_s: float, rows: list) -> None:
    s = summary(walls)
    rec = {"bench": "pack", "kind": "bare", "fn": fn, "threads": label, "mb": round(mb, 2), "tokens": tokens, **s,
           "cpu_s": cpu_s, "mb_s": round(mb / s["best_s"], 3), "tok_s": round(tokens / s["best_s"]), "load1": load1()}
    emit(rec)
    rows.append({"measure": f"bare {fn} threads={label}", "best_s": s["best_s"], "MB/s": rec["mb_s"],
                 "Mtok/s": rec["tok_s"] / 1e6, "spread": s["spread"]})


def build_inputs(args, tmp: Path) -> tuple[Path, Path]:
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer

    clean, tok = tmp / "clean", tmp / "tok"
    t = time.perf_counter()
    with ray_session(2):
        inputs = inputs_for("zh", args.data) + inputs_for("en", args.data)
        cfg = {"output": str(clean), "read": {"inputs": inputs}}
        if "near_dedup" in DataRunConfig.model_fields:  # not what is measured here; saves setup time
            cfg["near_dedup"] = {"method": "off"}
        run_data(DataRunConfig.model_validate(cfg), echo=lambda *_: None)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    train_tokenizer(TokenizerConfig(input=str(clean), output=str(tok), vocab_size=8000), echo=lambda *_: None)
    emit({"bench": "pack", "kind": "setup", "data_run_s": round(setup_s, 1),
          "tokenizer_train_s": round(time.perf_counter() - t, 1)})
    return clean, tok


def copy_corpus(clean: Path, dest: Path, copies: int, limit: int | None = None) -> Path:
    """A clean-corpus folder holding `copies` copies of `clean`'s documents (ids
    suffixed "~k"), or its first `limit` documents; markers copied, counts scaled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (dest / "data").mkdir(parents=True)
    for name in ("_SUCCESS", "_ZEROLM_STAGE", "config.json"):
        if (clean / name).exists():
            shutil.copy(clean / name, dest / name)
    table = pa.concat_tables([pq.read_table(f, columns=["id", "text", "source"])
                              for f in sorted((clean / "data").glob("*.parquet"))])
    if limit:
        table = table.slice(0, limit)
    for k in range(copies):
        ids = pa.array([i + f"~{k}" for i in table.column("id").to_pylist()], type=table.schema.field("id").type)
        part = table.set_column(0, "id", ids)
        for j in range(0, part.num_rows, 200_000):  # ~the writer's rows_per_file
            pq.write_table(part.slice(j, 200_000), dest / "data" / f"part-{k:03d}-{j // 200_000:03d}.parquet")
    stats = json.loads((clean / "stats.json").read_text(encoding="utf-8"))
    per_source = table.group_by("source").aggregate([("id", "count")]).to_pylist()
    stats["sources"] = {r["source"]: {**stats["sources"][r["source"]], "rows_out": r["id_count"] * copies}
                        for r in per_source}
    (dest / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return dest


def pack_once(corpus: Path, tok: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of the driver and the local Ray, manifest) of one run_pack."""
    from dataproc.pack import PackConfig, run_pack

    cfg = PackConfig(input=str(corpus), tokenizer=str(tok), output=str(out), num_workers=workers, batch_size=BATCH)
    t = time.perf_counter()
    with CpuMeter() as cpu:
        manifest = run_pack(cfg, echo=lambda *_: None)
    wall = time.perf_counter() - t
    shutil.rmtree(out)
    manifest["_cpu_by_kind"] = cpu.by_kind
    return wall, cpu.total, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1, help="copies of the clean corpus packed")
    ap.add_argument("--bare", nargs=4, help=argparse.SUPPRESS)  # internal: the subprocess
    args = ap.parse_args()
    if args.bare:
        return bare(args.bare[0], args.bare[1], int(args.bare[2]), args.bare[3])
    emit({"bench": "pack", "kind": "machine", **machine(), "date": time.strftime("%Y-%m-%d %H:%M")})
    tmp = Path(tempfile.mkdtemp(prefix="zerolm-bench-pack-"))
    rows = []
    try:
        clean, tok = build_inputs(args, tmp)
        big = copy_corpus(clean, tmp / "big", args.scale)
        tiny = copy_corpus(clean, tmp / "tiny", 1, limit=256)

        for label, threads, fns in (("rayon1", "1", "encode_batch_fast,encode_batch"),
                                    ("default", None, "encode_batch_fast")):
            r = run_bare(tok, big, 1, threads, fns)  # for reference; the ratios use the paired runs below
            for fn in fns.split(","):
                bare_record(label, fn, r["mb"], r[fn]["walls"], r[fn]["tokens"], r[fn]["cpu_s"], rows)

        # The per-core reference (bare encode_batch_fast, RAYON_NUM_THREADS=1) runs right
        # after each pack run, so every pipeline/bare pair sees about the same load.
        paired, paired_cpu = [], []
        ratio_rows = []
        for workers in (1, 2):
            walls, cpus, fixed, fixed_cpu, pairs = [], [], [], [], []
            with ray_session(workers) as init_s:
                warmup_s = pack_once(tiny, tok, tmp / "out", workers)[0]  # starts workers, loads the tokenizer
                for _ in range(args.repeat):
                    w, c, _ = pack_once(tiny, tok, tmp / "out", workers)
                    fixed.append(w)
                    fixed_cpu.append(c)
                    wall, cpu, manifest = pack_once(big, tok, tmp / "out", workers)
                    walls.append(wall)
                    cpus.append(cpu)
                    emit({"bench": "pack", "kind": "pack_run", "workers": workers, "seconds": round(wall, 3),
                          "cpu_s": round(cpu, 3), "cpu_s_by_kind": manifest["_cpu_by_kind"],
                          "tiny_seconds": round(fixed[-1], 3), "tiny_cpu_s": round(fixed_cpu[-1], 3),
                          "load1": load1()})
                    r = run_bare(tok, big, 1, "1", "encode_batch_fast")["encode_batch_fast"]
                    paired.append(r["walls"][0])
                    paired_cpu.append(r["cpu_s"])
                    # pipeline rate per worker / bare rate, within the pair
                    pairs.append({"wall": r["walls"][0] / (wall * workers),
                                  "wall_adjusted": r["walls"][0] / ((wall - fixed[-1]) * workers),
                                  "cpu": r["cpu_s"] / cpu, "cpu_adjusted": r["cpu_s"] / (cpu - fixed_cpu[-1])})
            sp = manifest["splits"]
            nbytes = sum(v["bytes"] for s in sp.values() for v in s.values())
            docs = sum(v["docs"] for s in sp.values() for v in s.values())
            tokens = sum(v["tokens"] for s in sp.values() for v in s.values()) - docs  # without separators
            s, f = summary(walls), summary(fixed)
            steady = s["best_s"] - f["best_s"]
            mb = nbytes / MB
            rec = {"bench": "pack", "kind": "pipeline", "workers": workers, "ray_init_s": round(init_s, 2),
                   "warmup_s": round(warmup_s, 2), "mb": round(mb, 2), "docs": docs, "tokens": tokens, **s,
                   "cpu_runs_s": [round(x, 3) for x in cpus], "fixed_runs_s": f["runs_s"],
                   "fixed_cpu_runs_s": [round(x, 3) for x in fixed_cpu],
                   "bare_paired_runs_s": [round(x, 3) for x in paired[-args.repeat:]],
                   "bare_paired_cpu_s": [round(x, 3) for x in paired_cpu[-args.repeat:]],
                   "mb_s": round(mb / s["best_s"], 3), "tok_s": round(tokens / s["best_s"]),
                   "mb_s_adjusted": round(mb / steady, 3), "tok_s_adjusted": round(tokens / steady),
                   "mb_per_cpu_s": round(mb / min(cpus), 3),
                   "ratio_per_core_best": {  # best pipeline run / best paired bare run
                       "wall": round(mb / s["best_s"] / workers / (mb / min(paired[-args.repeat:])), 3),
                       "cpu": round((mb / min(cpus)) / (mb / min(paired_cpu[-args.repeat:])), 3)},
                   "ratio_per_core_median_of_pairs": {k: round(statistics.median(p[k] for p in pairs), 3)
                                                      for k in pairs[0]}}
            emit({**rec, "load1": load1()})
            rows.append({"measure": f"pack workers={workers}", "best_s": s["best_s"], "MB/s": mb / s["best_s"],
                         "MB/s/worker": mb / s["best_s"] / workers, "Mtok/s": tokens / s["best_s"] / 1e6,
                         "MB/cpu-s": mb / min(cpus), "spread": s["spread"]})
            rows.append({"measure": f"pack workers={workers} minus fixed cost", "best_s": steady, "MB/s": mb / steady,
                         "MB/s/worker": mb / steady / workers, "Mtok/s": tokens / steady / 1e6,
                         "MB/cpu-s": mb / (min(cpus) - min(fixed_cpu)), "spread": f["spread"]})
            for k, v in rec["ratio_per_core_median_of_pairs"].items():
                ratio_rows.append({"ratio (pipeline per worker / bare, median of pairs)": f"workers={workers} {k}",
                                   "value": v})
        s = summary(paired)
        rows.append({"measure": "bare encode_batch_fast rayon=1 (paired runs)", "best_s": s["best_s"],
                     "MB/s": mb / s["best_s"], "MB/s/worker": mb / s["best_s"], "Mtok/s": tokens / s["best_s"] / 1e6,
                     "MB/cpu-s": mb / min(paired_cpu), "spread": s["spread"]})
        emit({"bench": "pack", "kind": "bare_paired", "fn": "encode_batch_fast", "threads": "rayon1", "mb": round(mb, 2),
              "tokens": tokens, **s, "cpu_runs_s": [round(x, 3) for x in paired_cpu],
              "mb_s": round(mb / s["best_s"], 3), "mb_per_cpu_s": round(mb / min(paired_cpu), 3)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_table(rows, ["measure", "best_s", "MB/s", "MB/s/worker", "Mtok/s", "MB/cpu-s", "spread"])
    print()
    print_table(ratio_rows, list(ratio_rows[0]))


if __name__ == "__main__":
    main()
