#!/usr/bin/env python3
"""Near-dedup, zerolm against the tools users would run instead, on one corpus in one run.

The corpus (issue 20): real zh and en documents from ../shared/data/pretrain (People's
Daily, reviews, cmrc2018 contexts, c4, wikitext), edited copies of a third of them
(~5% of words or characters changed, seeded), then `--copies` copies of all that, each
with a distinct short prefix; one jsonl file. `--scale` takes a fraction of the
originals (1.0 ~ 22 MB before copies, ~90 MB with 4 copies).

Each tool runs in a child process (wall time and the peak RSS of its whole process
tree, polled): `zerolm data near-dedup` on a local Ray with `--cpus` CPUs (at the
peers' 5-grams and threshold 0.8), a datasketch script (MinHash 128 + MinHashLSH(0.8) + union-find, one
process), a rensa script (RMinHash + RMinHashLSH, one process), and datatrove's MinHash
pipeline when it is installed (`pip install datatrove`; skipped otherwise). The peers
shingle as zerolm's default does: character 5-grams for Chinese, word 5-grams for
other text. Prints one JSON line per run and a table with MB/s per CPU and the ratio
to the datasketch script.

    python3 bench/dedup_peers.py [--scale 0.25] [--copies 4] [--cpus 1,2] [--tools zerolm,datasketch,rensa]
                                 [--profile]   # + zerolm's CPU seconds per Ray Data operator
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data"
CJK = re.compile(r"[\u3400-\u9fff]")
NUM_PERM, THRESHOLD, NGRAM = 128, 0.8, 5


# ------------------------------------------------------------------ corpus
def originals(data: Path) -> list[tuple[str, str]]:
    pre = data / "pretrain"
    zh = [ln.strip() for ln in (pre / "zh" / "peoples_daily_199801.txt").open(encoding="utf-8")]
    for name in ("reviews_pos.txt", "reviews_neg.txt"):
        zh += [ln.strip() for ln in (pre / "zh" / name).open(encoding="utf-8")]
    for name in ("cmrc2018_dev.json", "cmrc2018_trial.json"):
        zh += [rec["context_text"] for rec in json.loads((pre / "zh" / name).read_text(encoding="utf-8"))]
    en = [json.loads(ln)["text"] for ln in (pre / "en" / "c4_demo.jsonl").open(encoding="utf-8")]
    for name in ("wikitext2_valid.txt", "wikitext2_test.txt"):
        en += [ln.strip() for ln in (pre / "en" / name).open(encoding="utf-8") if not ln.strip().startswith("=")]
    docs = [("zh", t) for t in dict.fromkeys(zh) if len(t) >= 30] + [("en", t) for t in dict.fromkeys(en) if len(t) >= 100]
    random.Random(0).shuffle(docs)
    return docs


def build_corpus(data: Path, out: Path, scale: float, copies: int) -> dict:
    from dataproc.near_dedup.labelled import edit

    docs = originals(data)
    docs = docs[:max(1, int(len(docs) * scale))]
    rng = random.Random(1)
    edited = [(lang, edit(text, lang, rng.choice(("substitute", "insert", "delete")), 0.05, rng.choice(docs)[1], rng))
              for lang, text in rng.sample(docs, len(docs) // 3)]
    base = docs + edited
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for k in range(copies):
            for lang, text in base:
                fh.write(json.dumps({"id": f"d{n}", "text": f"[{k}] {text}"}, ensure_ascii=False) + "\n")
                n += 1
    return {"docs": n, "MB": round(out.stat().st_size / 1e6, 2), "originals": len(docs), "edited": len(edited)}


# ------------------------------------------------------------------ children (one tool each)
def read_corpus(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(ln)["text"] for ln in fh]


def shingles(text: str) -> list[str]:
    """zerolm's default: character 5-grams for Chinese, lowercased word 5-grams otherwise."""
    if len(CJK.findall(text[:500])) > 0.3 * min(len(text), 500):
        units, sep = list(text), ""
    else:
        units, sep = text.lower().split(), " "
    if len(units) < NGRAM:
        return [sep.join(units)]
    return list({sep.join(units[i:i + NGRAM]) for i in range(len(units) - NGRAM + 1)})


def components(n: int, pairs) -> int:
    from dataproc.near_dedup.labelled import union_find_labels

    return len(set(union_find_labels(n, pairs).tolist()))


def child_datasketch(path: str) -> int:
    from datasketch import MinHash, MinHashLSH

    texts = read_corpus(path)
    lsh, pairs = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM), []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        pairs += [(i, j) for j in lsh.query(m)]
        lsh.insert(i, m)
    return len(texts) - components(len(texts), pairs)


def child_rensa(path: str) -> int:
    from rensa import RMinHash, RMinHashLSH

    texts = read_corpus(path)
    lsh, pairs = RMinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, num_bands=16), []
    for i, text in enumerate(texts):
        m = RMinHash(num_perm=NUM_PERM, seed=42)
        m.update(shingles(text))
        pairs += [(i, j) for j in lsh.query(m)]
        lsh.insert(i, m)
    return len(texts) - components(len(texts), pairs)


def child_zerolm(path: str, cpus: int, out: str, profile: bool = False) -> int:
    import logging
    import resource

    import ray

    import ray_data_profile
    from dataproc.near_dedup.run import NearDedupRunConfig, run_near_dedup

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False)
    if profile:
        ray_data_profile.enable()
    try:
        # The peers' settings (5-grams, Jaccard 0.8), not zerolm's defaults (3-grams at 0.5,
        # chosen by bench/near_dedup_quality.py): the same work for every tool.
        cfg = NearDedupRunConfig.model_validate({
            "output": out, "read": {"inputs": [{"path": path}]},
            "near_dedup": {"shingles": {"char_ngram": NGRAM, "word_ngram": NGRAM}, "minhash": {"threshold": THRESHOLD}}})
        stats = run_near_dedup(cfg, overwrite=True, echo=lambda *_: None)
        if profile:
            prof = ray_data_profile.collect()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            prof["driver_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
            prof["near_dedup"] = stats.get("near_dedup")
            print("PROFILE " + json.dumps(prof), flush=True)
        return stats["dropped"].get("near_duplicate", 0)
    finally:
        ray.shutdown()


def child_datatrove(path: str, cpus: int, out: str) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, \
        MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg, o = MinhashConfig(n_grams=NGRAM, num_buckets=16, hashes_per_bucket=8), Path(out)
    steps = [[JsonlReader(str(Path(path).parent), glob_pattern=Path(path).name),
              MinhashDedupSignature(output_folder=str(o / "sigs"), config=cfg)],
             [MinhashDedupBuckets(input_folder=str(o / "sigs"), output_folder=str(o / "buckets"), config=cfg)],
             [MinhashDedupCluster(input_folder=str(o / "buckets"), output_folder=str(o / "ids"), config=cfg)],
             [JsonlReader(str(Path(path).parent), glob_pattern=Path(path).name),
              MinhashDedupFilter(input_folder=str(o / "ids"), exclusion_writer=JsonlWriter(str(o / "removed"))),
              JsonlWriter(str(o / "kept"))]]
    for i, pipeline in enumerate(steps):
        tasks = cpus if i in (0, 3) else (cfg.num_buckets if i == 1 else 1)
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=cpus, logging_dir=str(o / f"logs{i}")).run()
    import gzip

    return sum(sum(1 for _ in gzip.open(f, "rt")) for f in (o / "removed").glob("*.gz"))


def child(tool: str, path: str, cpus: int, out: str, profile: bool = False) -> None:
    t0 = time.perf_counter()
    if tool == "zerolm":
        removed = child_zerolm(path, cpus, out, profile)
    elif tool == "datatrove":
        removed = child_datatrove(path, cpus, out)
    else:
        removed = {"datasketch": child_datasketch, "rensa": child_rensa}[tool](path)
    print("RESULT " + json.dumps({"removed": removed, "inner_s": round(time.perf_counter() - t0, 2)}), flush=True)


# ------------------------------------------------------------------ parent
def run_tool(tool: str, corpus: Path, cpus: int, work: Path, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--corpus", str(corpus), "--cpus", str(cpus),
           "--out", str(work / f"{tool}-{cpus}")] + (["--profile"] if profile else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    result = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not result:
        raise SystemExit(f"{tool} failed ({proc.returncode}):\n{err[-3000:]}")
    row = {"tool": tool, "cpus": cpus, "wall_s": round(wall, 1), **json.loads(result[-1][7:]),
           "peak_rss_MB": round(peak / 1e6)}
    prof = [ln for ln in out.splitlines() if ln.startswith("PROFILE ")]
    if prof:
        row["profile"] = json.loads(prof[-1][8:])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--cpus", default="1,2", help="CPU counts for zerolm and datatrove (peers: 1)")
    ap.add_argument("--tools", default="zerolm,datatrove,datasketch,rensa")
    ap.add_argument("--profile", action="store_true",
                    help="zerolm: CPU seconds per Ray Data operator, blocks, spilled bytes (bench/ray_data_profile.py)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.corpus, int(a.cpus), a.out, a.profile)
        return
    with tempfile.TemporaryDirectory(prefix="dedup-peers-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        info = build_corpus(a.data, corpus, a.scale, a.copies)
        print(json.dumps({"corpus": info, "date": time.strftime("%Y-%m-%d"), "cpu_count": psutil.cpu_count()}))
        rows = []
        tools = a.tools.split(",")
        if "datatrove" in tools:
            try:
                import datatrove  # noqa: F401 (only whether it is installed)
            except ImportError:
                print(json.dumps({"tool": "datatrove", "skipped": "not installed (pip install datatrove)"}))
                tools.remove("datatrove")
        for tool in tools:
            for cpus in ([int(c) for c in a.cpus.split(",")] if tool in ("zerolm", "datatrove") else [1]):
                row = run_tool(tool, corpus, cpus, work, a.profile)
                row["MB_per_s_per_cpu"] = round(info["MB"] / row["wall_s"] / cpus, 3)
                print(json.dumps(row), flush=True)
                if "profile" in row:
                    import ray_data_profile

                    p = row["profile"]
                    print(f"zerolm at {cpus} CPU(s): driver {p['driver_cpu_s']} CPU s, spilled "
                          f"{p['spilled_bytes'] / 1e6:.1f} MB\n" + ray_data_profile.table(p["operators"]), flush=True)
                rows.append(row)
        ref = next((r["MB_per_s_per_cpu"] for r in rows if r["tool"] == "datasketch"), None)
        print(f"\n{info['MB']} MB, {info['docs']:,} docs\n{'tool':<12}{'CPUs':>5}{'wall s':>9}{'MB/s/CPU':>10}"
              f"{'removed':>10}{'peak RSS MB':>13}{'x datasketch':>14}")
        for r in rows:
            ratio = f"{r['MB_per_s_per_cpu'] / ref:.2f}" if ref else "-"
            print(f"{r['tool']:<12}{r['cpus']:>5}{r['wall_s']:>9}{r['MB_per_s_per_cpu']:>10}{r['removed']:>10,}"
                  f"{r['peak_rss_MB']:>13,}{ratio:>14}")


if __name__ == "__main__":
    main()
