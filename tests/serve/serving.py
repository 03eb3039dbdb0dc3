"""`zerolm serve` in a subprocess for tests: a free port, the server, and a wait until
/health answers (or a failure that shows the server's output)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *args: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """The server on a free port, its output to `log` (else a pipe); (process, base URL)."""
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen([sys.executable, "-m", "zerolm", "serve", "--model", f"tiny={model_dir}",
                             "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    output = log.read_text()[-2000:] if log else proc.stdout.read()
    raise RuntimeError(f"server did not start (exit code {proc.poll()}): {output}")
