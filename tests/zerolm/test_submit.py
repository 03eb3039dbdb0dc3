"""`zerolm submit` against a real Ray head started in the test (`ray start --head
--dashboard-host 127.0.0.1`, token authentication on, as Ray 2.60 sets it up when a
token exists): a data job submitted and its output checked, the job's outcome as the
exit code, --list/--status/--logs/--stop, and the token found where users keep it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.ray_head import start_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("rayhead"))
    yield head
    head.stop()


def zerolm(head, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "zerolm", "submit", "--address", head.dashboard, *args],
                          capture_output=True, text=True, timeout=timeout, env=env or head.env())


def test_without_the_token_it_is_a_one_line_error(head):
    r = zerolm(head, "--list")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "authentication" in r.stderr.lower() and "RAY_AUTH_TOKEN" in r.stderr, r.stderr
    wrong = head.env(RAY_AUTH_TOKEN="0" * 64)
    r = zerolm(head, "--list", env=wrong)
    assert r.returncode == 2 and "Invalid authentication token" in r.stderr, r.stderr


def test_a_data_job_runs_on_the_cluster_and_its_outcome_is_the_exit_code(head, shared_data, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    lines = (shared_data / "pretrain" / "en" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "in.txt").write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
    out = tmp_path / "clean"
    r = zerolm(head, "--token-file", str(token_file), "--", "data", "run", "--input", str(tmp_path / "in.txt"),
               "--output", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout and "clean corpus:" in r.stdout  # the job's own log, streamed
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "_SUCCESS").is_file() and stats["rows_out"] > 0
    job_id = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("submitted Ray job"))

    env = head.env(RAY_AUTH_TOKEN=head.token)  # the environment variable works as well as the file
    listed = zerolm(head, "--list", env=env)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = zerolm(head, "--status", job_id, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = zerolm(head, "--logs", job_id, env=env)
    assert logs.returncode == 0 and "clean corpus:" in logs.stdout

    # A job whose command fails: the exit code says so, and so does --status.
    failed = zerolm(head, "--", "data", "run", "--input", str(tmp_path / "missing.txt"), "--output",
                    str(tmp_path / "nothing"), env=env)
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout[-2000:]
    failed_id = next(line.split()[-1] for line in failed.stdout.splitlines() if line.startswith("submitted"))
    assert zerolm(head, "--status", failed_id, env=env).returncode == 1
    unknown = zerolm(head, "--status", "raysubmit_nosuchjob", env=env)
    assert unknown.returncode == 2 and "no job raysubmit_nosuchjob" in unknown.stderr, unknown.stderr


def test_no_wait_then_stop(head, shared_data, tmp_path):
    env = head.env(RAY_AUTH_TOKEN=head.token)
    source = shared_data / "pretrain" / "en" / "wiki_demo.txt"  # tens of seconds of work on the head
    r = zerolm(head, "--no-wait", "--", "data", "run", "--input", str(source), "--output", str(tmp_path / "o"),
               env=env)
    assert r.returncode == 0 and "zerolm submit --logs" in r.stdout, r.stderr
    job_id = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("submitted Ray job"))
    stop = zerolm(head, "--stop", job_id, env=env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.time() + 120
    while "STOPPED" not in (status := zerolm(head, "--status", job_id, env=env)).stdout:
        assert time.time() < deadline, status.stdout
        time.sleep(1)
    assert status.returncode == 1  # stopped is not success
    assert not (tmp_path / "o" / "_SUCCESS").exists()
    again = zerolm(head, "--stop", job_id, env=env)
    assert again.returncode == 0 and "already ended" in again.stdout
