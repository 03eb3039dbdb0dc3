"""Connecting to Ray: the same code runs on a laptop (local Ray) and on a cluster.

`--address` (or $RAY_ADDRESS) connects to a running cluster; otherwise a local Ray
instance is started with this machine's CPUs. If Ray is already initialised (a test
session, a Ray job's driver), it is reused as is.
"""

from __future__ import annotations

import logging
import os
import re


# Ray's own chatter kept off the user's terminal unless asked for (`--verbose`, or
# ZEROLM_VERBOSE=1): Ray Data's progress lines (which count Ray's rows, not zerolm's:
# "27,914 rows written" for 24,198 documents), its execution plans, the token-auth notice.
QUIET_LOGGERS = {"ray.data": logging.WARNING, "ray.train": logging.WARNING, "ray.tune": logging.WARNING,
                 "ray._private.authentication": logging.ERROR}


def verbose() -> bool:
    return os.environ.get("ZEROLM_VERBOSE", "") not in ("", "0", "false")


# Lines that workers print and Ray forwards to the driver (log_to_driver, which carries
# the training progress lines) but that say nothing a user can act on.
WORKER_NOISE = re.compile("|".join((
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIW] \d+ \d+\] ",  # Ray's C++ core log below error level
    r"has constructor arguments in the object store and max_restarts > 0",  # ray#53727, Ray Train's own actor
    r"\(gcs_server\) gcs_actor_scheduler\.cc:\d+: Failed to kill actor",  # an actor Ray Data already ended
    r"^DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",
    r"FutureWarning: `torch\.distributed\.all_gather_into_tensor` is deprecated",  # DeepSpeed's calls
    r"^\s+return func\(\*args, \*\*kwargs\)$",  # the source line of that warning
)))


def quiet_ray_logs() -> None:
    if verbose():
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    _filter_worker_lines()


def _filter_worker_lines() -> None:
    """Drop WORKER_NOISE from the lines Ray forwards from workers (a private Ray API,
    pinned to 2.60.x; if it changes, the lines are simply shown)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def filtered(handle):
        def emit(data):
            lines = [ln for ln in data.get("lines", []) if not WORKER_NOISE.search(ln)]
            if lines:
                handle({**data, "lines": lines})
        emit.zerolm_filtered = True
        return emit

    with dispatcher._lock:
        dispatcher.handlers = [(name, h if name != "ray_print_logs" or getattr(h, "zerolm_filtered", False)
                                else filtered(h)) for name, h in dispatcher.handlers]


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
