"""`zerolm submit --address http://HEAD:8265 -- data run ...`: run a zerolm command on
a Ray cluster as a Ray job (the same as `ray job submit -- zerolm ...`), streaming
its logs until it ends. The cluster's nodes must have zerolm installed (see
ray_cluster.yaml); `--working-dir` uploads configs alongside the job.
"""

from __future__ import annotations

import shlex

from zerolm.errors import UserError


def submit_job(address: str, command: list[str], *, working_dir: str | None = None, wait: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("nothing to submit: give the zerolm command after --, e.g. -- data run --input ...")
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection problems are the user's to fix
        raise UserError(f"cannot reach the Ray cluster at {address}: {exc}")
    runtime_env = {"working_dir": working_dir} if working_dir else None
    job_id = client.submit_job(entrypoint="zerolm " + shlex.join(command), runtime_env=runtime_env)
    print(f"submitted Ray job {job_id} to {address}")
    if not wait:
        return 0
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1
