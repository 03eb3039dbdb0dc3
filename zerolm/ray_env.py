"""Connecting to Ray: the same code runs on a laptop (local Ray) and on a cluster.

`--address` (or $RAY_ADDRESS) connects to a running cluster; otherwise a local Ray
instance is started with this machine's CPUs. If Ray is already initialised (a test
session, a Ray job's driver), it is reused as is.
"""

from __future__ import annotations

import logging
import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """What workers print reaches the driver (training progress lines); Ray's own
    logging is kept to warnings."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
