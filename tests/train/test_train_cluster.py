"""Pretraining survives losing a node mid-run (issue 16, "Autoscaling and failures").

A simulated cluster (tests/sim_cluster.py: a head with no CPUs, three 1-CPU worker
nodes) runs `zerolm train pretrain` with 2 Ray Train workers and
`scaling.max_failures: 1`. After step 5 (the last checkpoint is step 3) rank 0 writes
its node id and waits; the test removes that node, raylet and all. Ray Train sees the
worker group fail, starts a new one on the two nodes left, which resumes from the
step-3 checkpoint; the one command must finish with the loss curve of an
uninterrupted run on the session's local Ray, bit for bit.
"""

from __future__ import annotations

import json

import pytest

from tests.sim_cluster import run_job
from tests.train.test_pretrain import config, losses
from train.checkpoint import list_checkpoints

TIMEOUT_S = 400

JOB = r"""
import json, os, sys, threading, time
from pathlib import Path
from tests.sim_cluster import alive_nodes, simulated_cluster
from train.config import PretrainConfig
from train.runner import run_stage

cfg, marker = PretrainConfig.model_validate(json.loads(sys.argv[1])), sys.argv[2]
with simulated_cluster(workers=3) as (cluster, nodes):
    removal, started = {}, time.time()

    def remove_held_node():
        while not os.path.exists(marker):
            time.sleep(0.2)
        node_id = Path(marker).read_text()
        removal["at_s"] = round(time.time() - started, 2)
        victim = [n for n in nodes if n.node_id == node_id]
        removal["found"] = len(victim)
        if victim:
            cluster.remove_node(victim[0], allow_graceful=False)
        removal["done_s"] = round(time.time() - started, 2)

    threading.Thread(target=remove_held_node, daemon=True).start()
    result = run_stage("pretrain", cfg, echo=lambda *_: None)
    print("RESULT " + json.dumps({"steps": result["steps"], "elapsed_s": round(time.time() - started, 2),
                                  "removal": removal, "alive_nodes": alive_nodes()}), flush=True)
"""


@pytest.mark.slow
def test_node_lost_mid_run_restarts_the_group_from_its_checkpoint(ray_session, tokens_dir, tmp_path):
    from train.runner import run_stage

    reference = tmp_path / "reference"
    run_stage("pretrain", config(tokens_dir, reference), echo=lambda *_: None)
    out, marker = tmp_path / "run", tmp_path / "held"
    cfg = config(tokens_dir, out, scaling={"num_workers": 2, "max_failures": 1})
    got = run_job(JOB, [cfg.model_dump_json(), str(marker)], TIMEOUT_S,
                  env={"ZEROLM_CRASH_AT_STEP": "5", "ZEROLM_CRASH_MARKER": str(marker), "ZEROLM_CRASH_MODE": "hold"})
    print(json.dumps(got))
    # The node that held rank 0 really went away during the run (else this proves nothing).
    assert marker.exists() and got["removal"]["found"] == 1 and got["removal"]["done_s"] < got["elapsed_s"]
    assert got["alive_nodes"] == 3 and got["steps"] == 8  # the head and the two nodes left
    assert losses(out) == losses(reference) and len(losses(out)) == 8
    assert [s for s, _ in list_checkpoints(out)] == [6, 8]
