"""`zerolm submit`: run a zerolm command on a Ray cluster as a Ray job, and manage jobs.

    zerolm submit [--address URL] [--working-dir DIR] [--no-wait] -- data run ...
    zerolm submit --list | --status JOB_ID | --logs JOB_ID | --stop JOB_ID

The same as `ray job submit -- zerolm ...`, streaming the job's logs until it ends and
exiting with the job's outcome (0 succeeded, 1 failed or stopped). The cluster's nodes
must have zerolm installed (docs/cluster.md, ray_cluster.yaml); `--working-dir`
uploads configs alongside the job.

Clusters started by Ray 2.60 use token authentication whenever a token exists on the
head (`~/.ray/auth_token`). Ray's own client sends the token only when its process is
in token mode, so a plain client gets "Missing authentication token" from such a
cluster. Here the token is looked up explicitly and sent as a bearer header:
`--token-file`, else $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH names, else
`~/.ray/auth_token`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path

from zerolm.errors import UserError

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    """The dashboard (Jobs API) address: --address, else $RAY_API_SERVER_ADDRESS, else an
    http(s) $RAY_ADDRESS. A `ray://` or GCS address is not the Jobs API: say so."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard) "
                        "or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise UserError(f"{address} is not a Ray dashboard address: jobs are submitted to "
                        "http://HEAD:8265 (the dashboard port), not to ray:// or the GCS port")
    return address.rstrip("/")


def find_token(token_file: str | None) -> str | None:
    """The cluster's auth token, or None where none is configured (an open cluster)."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise UserError(f"--token-file {token_file}: no such file")
        return _read_token(path)
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={named}: no such file")
        return _read_token(path)
    default = DEFAULT_TOKEN_FILE.expanduser()
    return _read_token(default) if default.is_file() else None


def _read_token(path: Path) -> str:
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    if not token:
        raise UserError(f"{path} is empty: it should hold the cluster's auth token")
    return token


def connect(address: str | None, token_file: str | None = None):
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # noqa: BLE001 - connection and auth problems are the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if token else " (a cluster with token authentication needs RAY_AUTH_TOKEN or --token-file)"
        raise UserError(f"cannot reach the Ray cluster at {address}: {first}{hint}")


def submit_job(client, command: list[str], *, working_dir: str | None = None, wait: bool = True,
               echo=print) -> int:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("nothing to submit: give the zerolm command after --, e.g. -- data run --input ...")
    if command[0] == "zerolm":  # `-- zerolm data run ...` means the same as `-- data run ...`
        command = command[1:]
    if working_dir and not Path(working_dir).is_dir():
        raise UserError(f"--working-dir {working_dir}: no such folder")
    runtime_env = {"working_dir": working_dir} if working_dir else None
    job_id = _submit_retrying(client, "zerolm " + shlex.join(command), runtime_env, echo)
    echo(f"submitted Ray job {job_id}")
    if not wait:
        echo(f"follow it with: zerolm submit --logs {job_id}   (--status, --stop)")
        return 0
    return follow(client, job_id, echo=echo)


def _submit_retrying(client, entrypoint: str, runtime_env, echo, patience_s: float = 90.0) -> str:
    """A head that has just started (`ray up`, a test's `ray start`) answers "No available
    agent to submit job, please try again later" until its job agent is up: wait for it,
    as the message asks, instead of failing the user's command."""
    deadline = time.time() + patience_s
    waited = False
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "try again later" not in str(exc) or time.time() > deadline:
                raise UserError(f"the cluster refused the job: {str(exc).strip().splitlines()[0]}") from None
            if not waited:
                echo("the cluster's job agent is not up yet; waiting for it")
                waited = True
            time.sleep(2)


def follow(client, job_id: str, *, echo=print) -> int:
    """Stream the job's logs until it ends; the exit code is the job's outcome. Ctrl-C
    stops following, not the job."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        echo(f"\nstopped following; job {job_id} goes on (zerolm submit --stop {job_id} stops it)")
        return 130
    return report_status(client, job_id, echo=echo)


def report_status(client, job_id: str, *, echo=print) -> int:
    info = _job_info(client, job_id)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    message = f": {info.message}" if info.message and status != "SUCCEEDED" else ""
    echo(f"job {job_id}: {status}{message}")
    if status == "SUCCEEDED":
        return 0
    return 1 if status in TERMINAL else 0


def show_logs(client, job_id: str) -> int:
    _job_info(client, job_id)
    print(client.get_job_logs(job_id), end="", flush=True)
    return 0


def stop_job(client, job_id: str, *, echo=print) -> int:
    info = _job_info(client, job_id)
    if str(getattr(info.status, "value", info.status)) in TERMINAL:
        echo(f"job {job_id} has already ended: {getattr(info.status, 'value', info.status)}")
        return 0
    client.stop_job(job_id)
    echo(f"stop requested for job {job_id}")
    return 0


def list_jobs(client, *, echo=print) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        echo("no jobs")
        return 0
    echo(f"{'job id':<28}{'status':<11}entrypoint")
    for job in jobs:
        status = str(getattr(job.status, "value", job.status))
        echo(f"{(job.submission_id or job.job_id or '?'):<28}{status:<11}{job.entrypoint}")
    return 0


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise UserError(f"no job {job_id} on this cluster (zerolm submit --list shows them)")
        raise
