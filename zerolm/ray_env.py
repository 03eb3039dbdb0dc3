"""Connecting to Ray: the same code runs on a laptop (local Ray) and on a cluster.

`--address` (or $RAY_ADDRESS) connects to a running cluster; otherwise a local Ray
instance is started with this machine's CPUs. If Ray is already initialised (a test
session, a Ray job's driver), it is reused as is.
"""

from __future__ import annotations

import logging
import os


# Ray's own chatter kept off the user's terminal unless asked for (`--verbose`, or
# ZEROLM_VERBOSE=1): Ray Data's progress lines (which count Ray's rows, not zerolm's:
# "27,914 rows written" for 24,198 documents), its execution plans, the token-auth notice.
QUIET_LOGGERS = {"ray.data": logging.WARNING, "ray.train": logging.WARNING, "ray.tune": logging.WARNING,
                 "ray._private.authentication": logging.ERROR}


def verbose() -> bool:
    return os.environ.get("ZEROLM_VERBOSE", "") not in ("", "0", "false")


def quiet_ray_logs() -> None:
    if verbose():
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """What workers print reaches the driver (training progress lines); Ray's own
    logging is kept to warnings, and its INFO chatter off unless --verbose."""
    import ray

    if ray.is_initialized():
        return
    import ray.data  # noqa: F401 - configures its loggers on import; quiet them after that

    quiet_ray_logs()
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(log_to_driver=True, logging_level=logging.INFO if verbose() else logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    elif num_cpus:
        # A sized instance of our own: a plain init would join a cluster that `ray start`
        # left on this machine and then refuse num_cpus.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, **kwargs)
    else:
        # A private local instance: a bare ray.init() would join whatever cluster `ray
        # start` left on this machine (another user's, another job's). The dashboard
        # process also serves Ray's State API, which Ray Train's placement group
        # cleaner polls; without it that actor logs a warning every few seconds.
        ray.init(address="local", include_dashboard=True, **kwargs)
    quiet_ray_logs()  # init may have configured Ray's loggers again


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
