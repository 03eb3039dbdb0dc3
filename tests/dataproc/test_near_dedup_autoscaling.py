"""Near-dedup on an autoscaling cluster (issue 16, "Autoscaling and failures").

A real Ray head (`ray start --head`, isolated: tests/ray_head.py) with no CPUs of its
own and Ray's fake multi-node provider as its autoscaler: a `cpu_data` node type of
1 CPU, 0 to 2 nodes, idle timeout 6 s. `zerolm data near-dedup --address HEAD` is
run against it as a user runs it; its tasks need CPUs the head does not have, so the
autoscaler must start `cpu_data` nodes; the job must end with the same kept ids and
duplicates audit as a run on the session's local Ray; and once idle, the nodes must
be removed again.

`ray.cluster_utils.AutoscalingCluster` is not used: its start() runs `ray stop
--force` (it would stop every Ray on the machine, this session's included) and reads
a fake-provider example.yaml that the ray 2.60 wheel does not ship. The same setup is
written here: RAY_FAKE_CLUSTER=1 and the fake head's node id, so the provider's
view of the head matches the node the autoscaler sees, and `use_node_id_as_ip`
because every fake node has the same IP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from tests.dataproc.test_near_dedup_cluster import dedup_output, edited_corpus
from tests.ray_head import start_head
from tests.serve.serving import free_port

pytestmark = pytest.mark.slow
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's
MB = 1 << 20


def autoscaler_config(gcs: str) -> dict:
    return {
        "cluster_name": "zerolm-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_data": {"resources": {"CPU": 1, "object_store_memory": 100 * MB}, "node_config": {},
                         "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def worker_nodes(dashboard: str) -> tuple[int, int]:
    """(alive, ever seen) nodes other than the head, from Ray's state API."""
    nodes = httpx.get(dashboard + "/api/v0/nodes", params={"limit": 100}, timeout=10).json()["data"]["result"]["result"]
    workers = [n for n in nodes if not n["is_head_node"]]
    return sum(n["state"] == "ALIVE" for n in workers), len(workers)


def test_autoscaler_adds_cpu_nodes_for_near_dedup_and_removes_them_idle(ray_session, shared_data, tmp_path):
    from dataproc.near_dedup.run import NearDedupRunConfig, run_near_dedup

    corpus = tmp_path / "corpus.txt"
    edited_corpus(shared_data, corpus)

    def cfg(out: str) -> dict:
        return {"output": str(tmp_path / out),
                "read": {"inputs": [{"path": str(corpus), "source": "news"}], "chunk_bytes": 64 << 10},
                "near_dedup": {"num_partitions": 4}, "ray": {"batch_size": 256}}

    run_near_dedup(NearDedupRunConfig.model_validate(cfg("local")), echo=lambda *_: None)

    gcs_port = free_port()
    config_path = tmp_path / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(autoscaler_config(f"127.0.0.1:{gcs_port}")))
    head = start_head(tmp_path / "head", num_cpus=0, token=False, gcs_port=gcs_port,
                      extra_args=(f"--autoscaling-config={config_path}",),
                      extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                 "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
    try:
        assert worker_nodes(head.dashboard) == (0, 0)
        job_cfg = tmp_path / "near_dedup.yaml"
        job_cfg.write_text(yaml.safe_dump(cfg("cluster")))
        seen, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    seen.append(worker_nodes(head.dashboard)[0])
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                stop.wait(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        env = {k: v for k, v in head.env().items() if not k.startswith("RAY_")}
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "zerolm", "data", "near-dedup", "--config", str(job_cfg),
                               "--address", head.gcs], env=env, capture_output=True, text=True, timeout=600)
        job_s = time.time() - started
        stop.set()
        watcher.join()
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert max(seen) >= 1, f"the autoscaler never added a node: {seen}"
        assert dedup_output(tmp_path / "cluster") == dedup_output(tmp_path / "local")
        stats = json.loads((tmp_path / "cluster" / "stats.json").read_text())
        assert stats["near_dedup"]["removed"] > 100
        deadline, alive = time.time() + 180, None
        while time.time() < deadline:
            alive, ever = worker_nodes(head.dashboard)
            if alive == 0:
                break
            time.sleep(2)
        print(json.dumps({"job_s": round(job_s, 1), "max_worker_nodes": max(seen), "nodes_started": ever,
                          "idle_removed_after_s": round(time.time() - started - job_s, 1)}))
        assert alive == 0, "idle cpu_data nodes were not removed"
    finally:
        head.stop()
