"""Simulated multi-node Ray clusters (`ray.cluster_utils.Cluster`) for tests, always run
in a child process under a timeout: the pytest session has its own local Ray, a cluster
must never be started in the pytest process, and a hang must be a failure, never a
stuck test run.

The child runs a script that uses `simulated_cluster()` and prints `RESULT {json}`;
the parent calls `run_job()`. The cluster is always shut down, and the
/tmp/ray/ray_current_cluster file its head writes is removed if it still points at
it (a stale one makes later plain `ray.init()` calls join a dead cluster).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
MB = 1 << 20
# Fast failure detection: a removed node is declared dead within ~2 s.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                      "health_check_initial_delay_ms": 0}


def _forget(address: str) -> None:
    if CURRENT_CLUSTER.exists() and CURRENT_CLUSTER.read_text().strip() == address:
        CURRENT_CLUSTER.unlink()


@contextlib.contextmanager
def simulated_cluster(workers: int, cpus_per_worker: int = 1):
    """(cluster, worker nodes), the driver connected: a head with no CPUs (so every task
    and training worker lands on a worker node) and `workers` nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=100 * MB, include_dashboard=False, _system_config=FAST_HEALTH_CHECKS))
    print("ADDRESS " + cluster.address, flush=True)
    try:
        nodes = [cluster.add_node(num_cpus=cpus_per_worker, object_store_memory=100 * MB) for _ in range(workers)]
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        ray.shutdown()
        address = cluster.address
        cluster.shutdown()
        _forget(address)


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def run_job(script: str, args: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Runs `python -c script *args` in its own process group; returns its last RESULT."""
    import pytest

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    # Own process group: on a timeout the driver AND the cluster's raylets/GCS go.
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        for address in [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("ADDRESS ")]:
            _forget(address)  # the script could not clean up
        pytest.fail(f"job did not finish in {timeout_s}s:\n{stderr[-5000:]}")
    results = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"job failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return json.loads(results[-1][len("RESULT "):])
