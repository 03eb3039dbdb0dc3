"""Throughput of the cleaning stage (normalize + filters), zh and en, in MB/s of input
text (UTF-8 bytes of the `text` column as read, before normalization).

    python3 bench/clean_throughput.py [--data DIR] [--repeat 2] [--full-repeat 0] [--scale 1] [--en-scale N]
    (from the repository root: Ray's workers import dataproc from there)

Measures, separately for zh (People's Daily, cmrc2018 contexts, reviews) and en
(wiki_demo, c4, tiny_shakespeare) from ../shared/data:

  inprocess  one core, no Ray: `Normalizer` + the default filter chain
             (`build_filters(FiltersConfig())`) over pandas batches of 1024 rows as
             the reader makes them (conversion to pandas is outside the timing); wall
             and CPU-time rates, and seconds per step. This is the per-core limit.
  read       the reader alone (`read_task` on every planned task), one core.
  pipeline   `run_data` end to end in a local Ray with num_cpus=1, then a fresh Ray
             with num_cpus=2; variants `clean_only` (read, normalize, filters,
             parquet write: exact dedup, near dedup and the outlier rule disabled, so
             no shuffle and no materialize; the scaling the issue asks for) and
             `full` (the default config: also exact dedup, near dedup when the config
             has it, the outlier rule; only with --full-repeat N, as it takes
             minutes). Wall clock of run_data inside a started Ray, after one untimed
             warm-up job (ray.init time reported apart), and the CPU seconds of the
             driver plus every Ray process (bench/common.py CpuMeter): MB per
             CPU-second is the per-core rate that survives a shared machine. `full`
             uses the task-based shuffle at num_cpus=1 and the actor-based one at 2
             (dataproc.pipeline.shuffle_strategy), so its 1 -> 2 ratio compares two
             shuffles.

Pipeline input: the inputs copied `--scale` times (en: `--en-scale`, default chosen
so en has about as many bytes as zh) into a temp dir, and every record of copy k
prefixed with "k " so copies are NOT exact duplicates of each other. Plain copies would
make exact dedup drop (N-1)/N of the corpus and skip most of the write; the prefix
keeps each copy's own duplicate rate (reviews repeat themselves) and the same work per
document, so both variants run on the same realistic input.

Runs in rounds (`--repeat`): each round measures in-process, then num_cpus=1, then
num_cpus=2, so load drift on a shared machine hits every side alike. Rates use the
best of the rounds (the least disturbed); ratios are taken within a round (paired)
and the median over rounds is reported. `spread` = (worst - best) / best.
Prints one JSON line per measurement, then two tables (rates, ratios).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa

try:  # `python3 bench/clean_throughput.py` (bench/ on sys.path) or `python3 -m bench.clean_throughput`
    from common import (DEFAULT_DATA, emit, inputs_for, load1, machine, print_table, ray_session,
                        CpuMeter, summary)
except ImportError:
    from bench.common import (DEFAULT_DATA, emit, inputs_for, load1, machine, print_table, ray_session,
                              CpuMeter, summary)

MB = 1e6


def read_rows(inputs: list[dict]) -> pa.Table:
    from dataproc.config import DataRunConfig
    from dataproc.readers import read_task
    from dataproc.sources import plan_read_tasks

    cfg = DataRunConfig.model_validate({"read": {"inputs": inputs}})
    tasks = plan_read_tasks(cfg.read.inputs, cfg.read.chunk_bytes)
    return pa.concat_tables([read_task(t.to_row(), cfg.read.max_record_bytes, cfg.read.reject_raw_bytes)
                             for t in tasks])


def text_bytes(table: pa.Table) -> int:
    return sum(len(t.encode("utf-8")) for t in table.column("text").to_pylist() if t)


def inprocess(lang: str, inputs: list[dict], repeat: int) -> dict:
    from dataproc.filters import FiltersConfig, build_filters
    from dataproc.normalize import NormalizeConfig, Normalizer

    reads = []
    for _ in range(repeat):
        t = time.perf_counter()
        table = read_rows(inputs)
        reads.append(time.perf_counter() - t)
    nbytes = text_bytes(table)
    emit({"bench": "clean", "kind": "read", "lang": lang, "mb": round(nbytes / MB, 3), "rows": table.num_rows,
          **summary(reads), "mb_s": round(nbytes / MB / min(reads), 3), "load1": load1()})
    walls, cpus, per_step = [], [], None
    for _ in range(repeat):
        # Fresh batches each time: the steps rewrite their batch in place.
        batches = [table.slice(i, 1024).to_pandas() for i in range(0, table.num_rows, 1024)]
        steps = [Normalizer(NormalizeConfig())] + build_filters(FiltersConfig())
        spent = dict.fromkeys((s.name for s in steps), 0.0)
        w0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            for step in steps:
                t = time.perf_counter()
                batch = step(batch)
                spent[step.name] += time.perf_counter() - t
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        if walls[-1] == min(walls):
            per_step = spent
    rec = {"bench": "clean", "kind": "inprocess", "lang": lang, "mb": round(nbytes / MB, 3),
           "rows": table.num_rows, **summary(walls), "mb_s": round(nbytes / MB / min(walls), 3),
           "mb_s_cpu": round(nbytes / MB / min(cpus), 3),
           "step_s": {k: round(v, 3) for k, v in per_step.items()}, "load1": load1()}
    emit(rec)
    return rec


def perturbed_copy(src: Path, dst: Path, k: int, spec: dict) -> None:
    """Copy `src` with every record's text prefixed by "k " (same format)."""
    prefix = f"{k} "
    if src.suffix == ".json":
        items = json.loads(src.read_text(encoding="utf-8"))
        for item in items:
            if isinstance(item.get(spec["text_field"]), str):
                item[spec["text_field"]] = prefix + item[spec["text_field"]]
        dst.write_text(json.dumps(items), encoding="utf-8")
    elif src.suffix == ".jsonl":
        with src.open(encoding="utf-8") as f, dst.open("w", encoding="utf-8") as out:
            for line in f:
                rec = json.loads(line)
                rec["text"] = prefix + rec["text"]
                out.write(json.dumps(rec) + "\n")
    else:  # one record per line
        p = prefix.encode()
        lines = src.read_bytes().split(b"\n")
        dst.write_bytes(b"\n".join(p + line if line.strip() else line for line in lines))


def replicate(inputs: list[dict], dest: Path, copies: int) -> list[dict]:
    out = []
    for spec in inputs:
        pattern = Path(spec["path"]).name
        for k in range(copies):
            folder = dest / f"copy{k:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted(glob.glob(spec["path"])):
                perturbed_copy(Path(f), folder / Path(f).name, k, {"text_field": "text", **spec})
        out.append({**spec, "path": str(dest / "copy*" / pattern)})
    return out


def pipeline_run(inputs: list[dict], out: Path, variant: str) -> tuple[float, float, dict]:
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data

    cfg = {"output": str(out), "read": {"inputs": inputs}}
    if variant == "clean_only":
        cfg.update(exact_dedup={"enabled": False}, outlier={"enabled": False})
        if "near_dedup" in DataRunConfig.model_fields:
            cfg["near_dedup"] = {"method": "off"}
    t = time.perf_counter()
    with CpuMeter() as cpu:
        stats = run_data(DataRunConfig.model_validate(cfg), echo=lambda *_: None)
    wall = time.perf_counter() - t
    shutil.rmtree(out)
    stats["_cpu_by_kind"] = cpu.by_kind
    return wall, cpu.total, stats


def shuffle_in_use() -> str:
    from ray.data import DataContext

    return DataContext.get_current().shuffle_strategy.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of in-process + clean_only pipeline runs")
    ap.add_argument("--full-repeat", type=int, default=0,
                    help="rounds (of --repeat) that also run `full` (minutes each at num_cpus=1)")
    ap.add_argument("--scale", type=int, default=1, help="copies of the zh inputs in the pipeline runs")
    ap.add_argument("--en-scale", type=int, default=0, help="copies of the en inputs (0: match zh bytes)")
    ap.add_argument("--cpus", default="1,2", help="Ray num_cpus of the pipeline sessions")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()
    emit({"bench": "clean", "kind": "machine", **machine(), "date": time.strftime("%Y-%m-%d %H:%M")})
    cpus_list = [int(c) for c in args.cpus.split(",")]
    langs = ("zh", "en")

    rows: list = []
    inproc: dict = {lang: [] for lang in langs}
    times: dict = {}
    cpu_times: dict = {}
    rows_io: dict = {}
    shuffles: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="zerolm-bench-clean-"))
    try:
        data, size, scale = {}, {}, {}
        # Rounds: in-process (1 core), then a Ray session per CPU count. Every round
        # measures every side, so load drift on a shared machine hits all of them.
        for rnd in range(args.repeat):
            for lang in langs:
                inproc[lang].append(inprocess(lang, inputs_for(lang, args.data), 1))
            if args.skip_pipeline:
                continue
            if rnd == 0:
                zh_mb, en_mb = inproc["zh"][0]["mb"], inproc["en"][0]["mb"]
                scale = {"zh": args.scale, "en": args.en_scale or max(1, round(args.scale * zh_mb / en_mb))}
                for lang in langs:
                    data[lang] = replicate(inputs_for(lang, args.data), tmp / "in" / lang, scale[lang])
                    size[lang] = text_bytes(read_rows(data[lang])) / MB
            variants = ("clean_only", "full") if rnd < args.full_repeat else ("clean_only",)
            for cpus in cpus_list:
                with ray_session(cpus) as init_s:
                    # Untimed: the first Ray Data job of a session starts its helper actors
                    # and worker processes (seconds of CPU that are no part of the rate).
                    warm = pipeline_run([{"path": str(args.data / "pretrain/zh/news_sentences.txt")}],
                                        tmp / "out", "clean_only")
                    emit({"bench": "clean", "kind": "ray_init", "round": rnd, "num_cpus": cpus,
                          "seconds": round(init_s, 2), "warmup_s": round(warm[0], 2), "warmup_cpu_s": round(warm[1], 2)})
                    for variant in variants:
                        for lang in langs:
                            wall, cpu, stats = pipeline_run(data[lang], tmp / "out", variant)
                            times.setdefault((lang, variant, cpus), []).append(wall)
                            cpu_times.setdefault((lang, variant, cpus), []).append(cpu)
                            rows_io[lang, variant] = (stats["rows_in"], stats["rows_out"])
                            shuffles[variant, cpus] = shuffle_in_use()
                            emit({"bench": "clean", "kind": "pipeline_run", "round": rnd, "lang": lang,
                                  "variant": variant, "num_cpus": cpus, "seconds": round(wall, 3),
                                  "cpu_s": round(cpu, 3), "cpu_s_by_kind": stats["_cpu_by_kind"],
                                  "load1": load1()})

        for lang in langs:
            walls = [r["best_s"] for r in inproc[lang]]
            s = summary(walls)
            mb = inproc[lang][0]["mb"]
            rec = {"bench": "clean", "kind": "inprocess_summary", "lang": lang, "mb": mb, **s,
                   "mb_s": round(mb / s["best_s"], 3), "mb_per_cpu_s": round(max(r["mb_s_cpu"] for r in inproc[lang]), 3)}
            emit(rec)
            rows.append({"measure": f"in-process normalize+filter {lang} (1 core)", "MB": mb, "best_s": s["best_s"],
                         "MB/s": rec["mb_s"], "MB/s/cpu": rec["mb_s"], "MB/cpu-s": rec["mb_per_cpu_s"],
                         "spread": s["spread"]})
        for (lang, variant, cpus), walls in sorted(times.items(), key=lambda kv: (kv[0][1] != "clean_only", kv[0])):
            s = summary(walls)
            rate = size[lang] / s["best_s"]
            per_cpu_s = size[lang] / min(cpu_times[lang, variant, cpus])
            emit({"bench": "clean", "kind": "pipeline", "lang": lang, "variant": variant, "num_cpus": cpus,
                  "copies": scale[lang], "mb": round(size[lang], 2), "rows_in_out": rows_io[lang, variant],
                  "shuffle": shuffles[variant, cpus] if variant == "full" else None, **s,
                  "cpu_runs_s": [round(c, 3) for c in cpu_times[lang, variant, cpus]],
                  "mb_s": round(rate, 3), "mb_s_per_cpu": round(rate / cpus, 3), "mb_per_cpu_s": round(per_cpu_s, 3)})
            rows.append({"measure": f"data run {variant} {lang} cpus={cpus}", "MB": size[lang],
                         "best_s": s["best_s"], "MB/s": rate, "MB/s/cpu": rate / cpus, "MB/cpu-s": per_cpu_s,
                         "spread": s["spread"]})
        ratio_rows = []
        for lang in langs:
            ratios = {}
            ip_cpu = max(r["mb_s_cpu"] for r in inproc[lang])
            t1s, t2s = times.get((lang, "clean_only", 1), []), times.get((lang, "clean_only", 2), [])
            if t1s and t2s:
                # Within a round (paired: about the same load), then the median of the rounds.
                ratios["clean_only_wall_speedup_2_over_1"] = statistics.median(a / b for a, b in zip(t1s, t2s))
                ip = [r["best_s"] for r in inproc[lang]]
                ratios["clean_only_1cpu_wall_rate_over_inprocess"] = statistics.median(
                    (size[lang] / t) / (inproc[lang][0]["mb"] / w) for t, w in zip(t1s, ip))
            for cpus in (1, 2):
                c = cpu_times.get((lang, "clean_only", cpus))
                if c:
                    ratios[f"clean_only_{cpus}cpu_per_cpu_s_over_inprocess"] = size[lang] / min(c) / ip_cpu
            f1, f2 = times.get((lang, "full", 1), []), times.get((lang, "full", 2), [])
            if f1 and f2:
                ratios["full_wall_speedup_2_over_1"] = statistics.median(a / b for a, b in zip(f1, f2))
            fc, cc = cpu_times.get((lang, "full", 2)), cpu_times.get((lang, "clean_only", 2))
            if fc and cc:
                # What exact + near dedup and the outlier pass (shuffles, materialize, groupby) cost.
                ratios["full_over_clean_only_cpu_s_2cpu"] = min(fc) / min(cc)
            emit({"bench": "clean", "kind": "ratio", "lang": lang, **{k: round(v, 3) for k, v in ratios.items()}})
            ratio_rows += [{"ratio": f"{lang} {k}", "value": round(v, 3)} for k, v in ratios.items()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_table(rows, ["measure", "MB", "best_s", "MB/s", "MB/s/cpu", "MB/cpu-s", "spread"])
    if ratio_rows:
        print()
        print_table(ratio_rows, ["ratio", "value"])


if __name__ == "__main__":
    main()
