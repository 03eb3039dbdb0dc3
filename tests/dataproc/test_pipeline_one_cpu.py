"""`zerolm data run` on a machine with ONE CPU (a small VM or a container).

Ray Data's actor-based hash shuffle (exact dedup, the groupbys) used to wait forever
there: its aggregator actors keep part of the only CPU while each partitioning task
needs all of it. The job runs in a subprocess with its own `ray.init(num_cpus=1)`
(the test session's Ray has 2 CPUs) under a timeout, so a hang is a failure, not a
stuck test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataproc.config import DataRunConfig
from dataproc.pipeline import shuffle_strategy

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900  # the job takes a minute or two even on a busy 2-core VM; a hang never ends

JOB = """
import json, logging, os, sys
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
import ray
# "local": a fresh 1-CPU instance, never a cluster that `ray start` left on this machine
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
         logging_level=logging.WARNING, configure_logging=False)
from ray.data import DataContext
from dataproc.config import DataRunConfig
from dataproc.pipeline import run_data
cfg = DataRunConfig.model_validate(json.loads(sys.argv[1]))
stats = run_data(cfg, echo=lambda *_: None)
print("RESULT " + json.dumps({"stats": stats, "cpus": ray.cluster_resources().get("CPU"),
                              "shuffle": DataContext.get_current().shuffle_strategy.value}))
"""


def test_shuffle_strategy_from_node_cpus():
    assert shuffle_strategy([1.0]) == "shuffle_v2"
    assert shuffle_strategy([0.0, 1.0, 1.0]) == "shuffle_v2"  # a CPU-less head and 1-CPU workers
    assert shuffle_strategy([]) == "shuffle_v2"
    assert shuffle_strategy([2.0]) == "hash_shuffle"
    assert shuffle_strategy([0.0, 32.0]) == "hash_shuffle"


@pytest.mark.slow
def test_data_run_finishes_with_one_cpu_and_dedups_exactly(shared_data, tmp_path):
    lines = [ln for ln in (shared_data / "pretrain/zh/news_sentences.txt").read_text(encoding="utf-8").splitlines()
             if ln.strip()][:150]
    assert len(set(lines)) == len(lines)
    # b.txt holds every line of a.txt again (reversed): 150 planted exact duplicates.
    # Ids start with the source, "a/..." < "b/...", so every kept copy must be a's.
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = {"output": str(out), "read": {"inputs": [
        {"path": str(tmp_path / "a.txt"), "source": "a"}, {"path": str(tmp_path / "b.txt"), "source": "b"}]}}
    DataRunConfig.model_validate(cfg)  # a config error fails here, not in the subprocess
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the session's Ray
    try:
        proc = subprocess.run([sys.executable, "-c", JOB, json.dumps(cfg)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        pytest.fail(f"`data run` with num_cpus=1 did not finish in {TIMEOUT_S}s (hang):\n{tail!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["cpus"] == 1 and result["shuffle"] == "shuffle_v2"
    stats = result["stats"]
    a, b = stats["sources"]["a"], stats["sources"]["b"]
    assert a["rows_in"] == b["rows_in"] == 150
    for scope in (stats, a, b):
        assert scope["rows_in"] == scope["rows_out"] + sum(scope["dropped"].values()) + scope["rejected"]
    # Filters judge the text alone, so they drop the same lines from a and b; every b
    # line that survives them is an exact copy of an a line and goes as a duplicate.
    filtered_b = {r: n for r, n in b["dropped"].items() if r != "exact_duplicate"}
    assert all(a["dropped"].get(r) == n for r, n in filtered_b.items()), (a, b)
    assert b["rows_out"] == 0 and b["dropped"]["exact_duplicate"] == 150 - sum(filtered_b.values()) > 100
    assert a["dropped"].get("exact_duplicate", 0) == 0
    df = pa.concat_tables([pq.read_table(f) for f in sorted((out / "data").glob("*.parquet"))]).to_pandas()
    assert len(df) == stats["rows_out"] == a["rows_out"] > 100
    assert df["text"].is_unique and df["id"].str.startswith("a/").all()
