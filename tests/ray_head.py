"""A real Ray head for tests that talk to a cluster (`ray start --head`), isolated from
every other Ray on the machine: its own temp dir, free ports, and its own HOME, so the
auth token it reads (HOME/.ray/auth_token: Ray 2.60 turns token authentication on
whenever one exists) is the test's. It is stopped by killing exactly its own processes
(those whose environment has that HOME), never with `ray stop`, which would stop every
Ray instance on the machine."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.serve.serving import free_port


@dataclass
class RayHead:
    home: Path  # HOME of the head's processes; .ray/auth_token inside
    token: str | None
    dashboard: str  # http://127.0.0.1:PORT, the Jobs API
    gcs: str  # 127.0.0.1:PORT, for drivers on this machine

    def env(self, **extra) -> dict:
        """The environment of a client on another machine: no token unless given."""
        # RAY_AUTH_MODE too: a local ray.init() earlier in the test process (the session's
        # Ray) sets it to "token", and such a client would word its refusals differently.
        env = {k: v for k, v in os.environ.items() if k not in (
            "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
        return {**env, "HOME": str(self.home.parent / "client-home"), **extra}

    def stop(self) -> None:
        mine = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("HOME") == str(self.home):
                    mine.append(proc)
            except psutil.Error:
                continue
        for proc in mine:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(mine, timeout=20)


def start_head(root: Path, *, num_cpus: int = 2, token: bool = True, gcs_port: int | None = None,
               extra_args: tuple = (), extra_env: dict | None = None) -> RayHead:
    home = root / "head-home"
    (home / ".ray").mkdir(parents=True)
    (root / "client-home").mkdir()
    secret = secrets.token_hex(32) if token else None
    if secret:
        (home / ".ray" / "auth_token").write_text(secret)
    # Ray's socket paths must stay under 107 bytes: a short temp dir of its own.
    temp = Path(f"/tmp/zh-{secrets.token_hex(4)}")
    dashboard_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **(extra_env or {}))
    gcs_port = gcs_port or free_port()
    cmd = ["ray", "start", "--head", "--temp-dir", str(temp), "--port", str(gcs_port), "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus),
           # Ray's fixed default ports (the job agent's 52365, metrics, runtime env) may be
           # taken by another Ray on this machine: then the head starts but never accepts
           # a job ("No available agent"). Every port is a free one of its own.
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
           "--disable-usage-stats", *extra_args]
    head = RayHead(home, secret, f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start failed: {out.stderr[-2000:]}")
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    deadline = time.time() + 120
    while time.time() < deadline:  # the Jobs API answers some seconds after ray start returns
        try:
            if httpx.get(head.dashboard + "/api/jobs/", headers=headers, timeout=5).status_code == 200:
                return head
        except httpx.HTTPError:
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError("the Ray head's Jobs API never answered")
