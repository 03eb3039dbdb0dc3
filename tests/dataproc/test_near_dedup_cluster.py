"""Near-dedup survives losing a worker node mid-job (issue 6, "Reliability").

A simulated cluster (`ray.cluster_utils.Cluster`: a head with no CPUs and two
1-CPU worker nodes) runs `run_near_dedup` on real Chinese text with edited copies;
a background thread kills one worker node 10 s into the job (30-50 s in all), so
its running tasks and actors are retried elsewhere and the blocks it held are
rebuilt from lineage (Ray logs "Attempting to recover N lost objects"). The job
must finish, and its kept ids, duplicates audit and drop counts must equal those of
a clean run of the same job on a local 2-CPU Ray.

Both runs are subprocesses under a timeout (tests/sim_cluster.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.sim_cluster import run_job

TIMEOUT_S = 300  # per run; each takes 30-60 s on a busy 2-core VM

JOB = r"""
import json, os, sys, threading, time
import ray
from ray.data import DataContext
from tests.sim_cluster import alive_nodes, simulated_cluster
from dataproc.near_dedup.run import NearDedupRunConfig, run_near_dedup

mode, cfg_json, delay_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = NearDedupRunConfig.model_validate(json.loads(cfg_json))


def run(started, removal):
    DataContext.get_current().enable_progress_bars = False
    stats = run_near_dedup(cfg, echo=lambda *_: None)
    print("RESULT " + json.dumps({"stats": stats, "elapsed_s": round(time.time() - started, 2), "removal": removal,
                                  "alive_nodes": alive_nodes()}), flush=True)


if mode == "cluster":
    with simulated_cluster(workers=2) as (cluster, workers):
        removal, started = {}, time.time()

        def remove():
            time.sleep(delay_s)
            removal["at_s"] = round(time.time() - started, 2)
            cluster.remove_node(workers[1], allow_graceful=False)
            removal["done_s"] = round(time.time() - started, 2)

        threading.Thread(target=remove, daemon=True).start()
        run(started, removal)
else:
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False)
    try:
        run(time.time(), {})
    finally:
        ray.shutdown()
"""


def edited_corpus(shared_data: Path, path: Path) -> None:
    """Real zh text (news sentences + People's Daily paragraphs) and, for a third of
    the documents, copies with small realistic edits: near-duplicates to find."""
    from dataproc.near_dedup.labelled import edit

    pre = shared_data / "pretrain" / "zh"
    news = [ln.strip() for ln in (pre / "news_sentences.txt").open(encoding="utf-8")]
    daily = [ln.strip() for ln in (pre / "peoples_daily_199801.txt").open(encoding="utf-8")]
    docs = [t for t in dict.fromkeys(news + [t for t in daily if len(t) >= 80][:1200]) if len(t) >= 30]
    rng = random.Random(0)
    copies = []
    for text in rng.sample(docs, len(docs) // 3):
        op = rng.choice(("insert", "delete", "substitute", "boilerplate"))
        copies.append(edit(text, "zh", op, rng.choice((0.01, 0.02, 0.03)), rng.choice(docs), rng))
    lines = docs + copies
    rng.shuffle(lines)
    path.write_text("\n".join(t.replace("\n", " ") for t in lines) + "\n", encoding="utf-8")


def _job(mode: str, cfg: dict, delay_s: float = 0.0) -> dict:
    return run_job(JOB, [mode, json.dumps(cfg), str(delay_s)], TIMEOUT_S)


def dedup_output(out: Path) -> tuple[list[str], list[tuple]]:
    kept = sorted(pq.read_table(out / "data", columns=["id"])["id"].to_pylist())
    audit = pq.read_table(out / "duplicates").to_pylist()
    rows = sorted((r["removed_id"], r["kept_id"], r["cluster_id"], round(r["estimated_jaccard"], 9)) for r in audit)
    return kept, rows


@pytest.mark.slow
def test_worker_node_removed_mid_job_gives_clean_output(shared_data, tmp_path):
    corpus = tmp_path / "corpus.txt"
    edited_corpus(shared_data, corpus)

    def cfg(out: str) -> dict:
        return {"output": str(tmp_path / out),
                "read": {"inputs": [{"path": str(corpus), "source": "news"}], "chunk_bytes": 64 << 10},
                "near_dedup": {"num_partitions": 4}, "ray": {"batch_size": 256}}

    clean = _job("clean", cfg("clean"))
    faulty = _job("cluster", cfg("faulty"), delay_s=10.0)
    print(json.dumps({"clean_s": clean["elapsed_s"], "faulty_s": faulty["elapsed_s"], "removal": faulty["removal"]}))
    # The node really went away while the job ran (else this test proves nothing).
    assert faulty["removal"].get("done_s") is not None and faulty["removal"]["at_s"] < faulty["elapsed_s"]
    assert faulty["alive_nodes"] == 2
    assert clean["stats"]["near_dedup"]["removed"] > 100
    for key in ("rows_in", "rows_out", "dropped"):
        assert faulty["stats"][key] == clean["stats"][key], key
    assert faulty["stats"]["near_dedup"]["removed"] == clean["stats"]["near_dedup"]["removed"]
    assert dedup_output(tmp_path / "faulty") == dedup_output(tmp_path / "clean")
