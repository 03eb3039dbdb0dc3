"""Where a Ray Data job spends its CPU: per-operator totals from Ray Data's own stats.

`enable()` before the job makes Ray Data log each dataset's execution stats (every
materialization, write and count of the job) and keeps those log records in memory;
`collect()` after the job parses them and sums, per operator
name, the tasks, blocks, remote CPU seconds, remote wall seconds and output bytes,
and reads the bytes the object store spilled to disk. Not a benchmark itself: the
bench scripts (bench/dedup_peers.py --profile) call it.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_SIZE = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9}
_HEADER = re.compile(r"^\s*(?:Operator \d+|Suboperator \d+) (?P<name>.+?): (?P<tasks>\d+) tasks executed, "
                     r"(?P<blocks>\d+) blocks produced")
_TOTAL = re.compile(r"\* Remote (?P<kind>wall|cpu) time: .*?, (?P<value>[\d.]+)(?P<unit>us|ms|s|min|h) total")
_BYTES = re.compile(r"\* Output size bytes per block: .*?, (?P<value>\d+) total")
_SPILLED = re.compile(r"Spilled (?P<value>[\d.]+) (?P<unit>\w+), (?P<objects>\d+) objects")


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_KEPT = _Keep()


def enable() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_auto_log_stats = True
    logger = logging.getLogger("ray.data")
    logger.addHandler(_KEPT)
    logger.setLevel(min(logger.level or logging.INFO, logging.INFO))


def parse(text: str) -> dict[str, dict]:
    """{operator name: {tasks, blocks, cpu_s, wall_s, output_bytes}} summed over every
    dataset execution in `text`. Fused operators keep Ray's fused name (Read->Map...)."""
    ops: dict[str, dict] = defaultdict(lambda: {"tasks": 0, "blocks": 0, "cpu_s": 0.0, "wall_s": 0.0,
                                                "output_bytes": 0})
    current = None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            current = ops[m["name"].strip()]
            current["tasks"] += int(m["tasks"])
            current["blocks"] += int(m["blocks"])
        elif current is not None and (m := _TOTAL.search(line)):
            current[f"{m['kind']}_s"] += float(m["value"]) * _UNIT[m["unit"]]
        elif current is not None and (m := _BYTES.search(line)):
            current["output_bytes"] += int(m["value"])
    return dict(ops)


def spilled_bytes() -> int:
    import ray
    from ray._private.internal_api import memory_summary

    # By address: other Ray instances may run on this machine.
    m = _SPILLED.search(memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True))
    return int(float(m["value"]) * _SIZE.get(m["unit"], 1)) if m else 0


def collect() -> dict:
    """Call in the driver after the job, before ray.shutdown()."""
    ops = parse("\n".join(_KEPT.messages))
    return {"operators": ops, "spilled_bytes": spilled_bytes(), "datasets": sum("Operator " in m for m in _KEPT.messages)}


def table(ops: dict[str, dict], top: int = 15) -> str:
    rows = sorted(ops.items(), key=lambda kv: -kv[1]["cpu_s"])[:top]
    total = sum(o["cpu_s"] for o in ops.values()) or 1.0
    out = [f"{'operator':<60} {'tasks':>6} {'blocks':>7} {'cpu s':>8} {'share':>6} {'out MB':>8}"]
    for name, o in rows:
        out.append(f"{name[:60]:<60} {o['tasks']:>6} {o['blocks']:>7} {o['cpu_s']:>8.1f} "
                   f"{o['cpu_s'] / total:>6.1%} {o['output_bytes'] / 1e6:>8.1f}")
    return "\n".join(out)
