"""Near-dedup survives losing a worker node mid-job (issue 6, "Reliability").

A simulated cluster (`ray.cluster_utils.Cluster`: a head with no CPUs and two
1-CPU worker nodes) runs `run_near_dedup` on real Chinese text with edited copies;
a background thread kills one worker node 10 s into the job (30-50 s in all), so
its running tasks and actors are retried elsewhere and the blocks it held are
rebuilt from lineage (Ray logs "Attempting to recover N lost objects"). The job
must finish, and its kept ids, duplicates audit and drop counts must equal those of
a clean run of the same job on a local 2-CPU Ray.

Both runs are subprocesses under a timeout (the pytest session has its own local
Ray, and a cluster must never be started in the pytest process): a hang is a
failure, never a stuck test run. The cluster is always shut down, and the
/tmp/ray/ray_current_cluster file its head writes is removed if it still points at
it (a stale one makes later plain `ray.init()` calls join a dead cluster).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # per run; each takes 30-60 s on a busy 2-core VM
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")

JOB = r"""
import json, logging, os, sys, threading, time
from pathlib import Path
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
import ray

mode, cfg_json, delay_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
cluster, removal = None, {}
current = Path("/tmp/ray/ray_current_cluster")
try:
    if mode == "cluster":
        from ray.cluster_utils import Cluster

        mb = 1 << 20
        sys_cfg = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                   "health_check_initial_delay_ms": 0}
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, object_store_memory=100 * mb, include_dashboard=False, _system_config=sys_cfg))
        print("ADDRESS " + cluster.address, flush=True)
        workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * mb) for _ in range(2)]
        ray.init(address=cluster.address, **kw)
        cluster.wait_for_nodes()
        victim = workers[1]

        def remove():
            time.sleep(delay_s)
            removal["at_s"] = round(time.time() - started, 2)
            cluster.remove_node(victim, allow_graceful=False)
            removal["done_s"] = round(time.time() - started, 2)

        started = time.time()
        threading.Thread(target=remove, daemon=True).start()
    else:
        ray.init(address="local", num_cpus=2, **kw)
        started = time.time()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    from dataproc.near_dedup.run import NearDedupRunConfig, run_near_dedup

    stats = run_near_dedup(NearDedupRunConfig.model_validate(json.loads(cfg_json)), echo=lambda *_: None)
    elapsed = round(time.time() - started, 2)
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({"stats": stats, "elapsed_s": elapsed, "removal": removal, "alive_nodes": alive}),
          flush=True)
finally:
    ray.shutdown()
    if cluster is not None:
        address = cluster.address
        cluster.shutdown()
        # The head writes its address here; leave no pointer to this dead cluster.
        if current.exists() and current.read_text().strip() == address:
            current.unlink()
"""


def _corpus(shared_data: Path, path: Path) -> None:
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
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    # Own process group: on a timeout the driver AND the cluster's raylets/GCS go.
    proc = subprocess.Popen([sys.executable, "-c", JOB, mode, json.dumps(cfg), str(delay_s)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        # The script could not clean up: drop the head's pointer to the dead cluster.
        for address in [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("ADDRESS ")]:
            if CURRENT_CLUSTER.exists() and CURRENT_CLUSTER.read_text().strip() == address:
                CURRENT_CLUSTER.unlink()
        pytest.fail(f"{mode} run did not finish in {TIMEOUT_S}s:\n{stderr[-5000:]}")
    results = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"{mode} run failed ({proc.returncode}):\n{stderr[-5000:]}"
    return json.loads(results[-1][len("RESULT "):])


def _output(out: Path) -> tuple[list[str], list[tuple]]:
    kept = sorted(pq.read_table(out / "data", columns=["id"])["id"].to_pylist())
    audit = pq.read_table(out / "duplicates").to_pylist()
    rows = sorted((r["removed_id"], r["kept_id"], r["cluster_id"], round(r["estimated_jaccard"], 9)) for r in audit)
    return kept, rows


@pytest.mark.slow
def test_worker_node_removed_mid_job_gives_clean_output(shared_data, tmp_path):
    corpus = tmp_path / "corpus.txt"
    _corpus(shared_data, corpus)

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
    assert _output(tmp_path / "faulty") == _output(tmp_path / "clean")
