"""Ray's own INFO lines stay off the user's terminal unless --verbose: a Ray Data job
in a fresh process (its own local Ray) prints none of them; with ZEROLM_VERBOSE=1 it does.
Lines workers print reach the driver, less the known noise (Ray's C++ warnings, DeepSpeed's
"built successfully")."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

INFO = re.compile(r"\sINFO\s")  # Ray's log lines: "<time>\tINFO <file>:<line> -- ..."
JOB = """
from zerolm.ray_env import ensure_ray
ensure_ray(num_cpus=1)
import ray, time
print("rows", ray.data.range(1000).map_batches(lambda b: b).count())

@ray.remote
def chatter():
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    print("[2026-12-07 23:07:06,654 W 18744 18778] core_worker.cc:2465: a warning nobody can act on")
    print("[2026-12-08 00:35:41,681 E 31291 31291] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor 0f")
    print("step 1/2 loss 7.0", flush=True)

ray.get(chatter.remote())
time.sleep(2)  # worker lines reach the driver asynchronously
"""


def run(verbose: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ZEROLM_VERBOSE")}
    if verbose:
        env["ZEROLM_VERBOSE"] = "1"
    return subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, timeout=300, env=env)


def test_ray_info_lines_only_when_verbose():
    quiet = run(False)
    assert quiet.returncode == 0 and "rows 1000" in quiet.stdout, quiet.stderr[-2000:]
    assert not INFO.search(quiet.stdout + quiet.stderr), (quiet.stdout + quiet.stderr)[-2000:]
    assert "Token authentication" not in quiet.stderr
    assert "step 1/2 loss 7.0" in quiet.stdout and "built successfully" not in quiet.stdout + quiet.stderr
    assert "nobody can act on" not in quiet.stdout + quiet.stderr and "Failed to kill" not in quiet.stdout
    loud = run(True)
    assert loud.returncode == 0 and INFO.search(loud.stdout + loud.stderr)
    assert "built successfully" in loud.stdout and "step 1/2 loss 7.0" in loud.stdout
