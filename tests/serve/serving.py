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


def decode_steps(url: str, headers: dict | None = None) -> tuple[float, float]:
    """(decode steps so far, sequences decoded summed over them), from /metrics."""
    lines = httpx.get(url + "/metrics", headers=headers, timeout=10).text.splitlines()
    value = lambda name: float(next(ln.split()[-1] for ln in lines if ln.startswith(name)))  # noqa: E731
    return value("zerolm_batch_size_count"), value("zerolm_batch_size_sum")


def wait_idle(url: str, quiet: float = 1.0, timeout: float = 60, headers: dict | None = None) -> float:
    """Decode steps so far, once no step has run for `quiet` seconds."""
    deadline, last = time.time() + timeout, decode_steps(url, headers)[0]
    while time.time() < deadline:
        time.sleep(quiet)
        now = decode_steps(url, headers)[0]
        if now == last:
            return now
        last = now
    raise AssertionError(f"the engine still decodes after {timeout} s")


def running_server(model_dir: Path, *args: str):
    """A generator for a module fixture: start `zerolm serve` on the model with extra
    flags, yield its URL once healthy, stop it afterwards."""
    proc, url = start_server(model_dir, *args)
    try:
        wait_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
