"""Helpers shared by the bench/ scripts: where the test data is, the zh/en input sets,
timing summaries, machine/load snapshots, one local Ray session at a time, JSON-line
output and the closing table. Not a benchmark itself.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench is run from a checkout, not installed (as bench/train_step.py)
DEFAULT_DATA = REPO.parent / "shared" / "data"

# The corpora of the benchmarks, as `read.inputs` of a DataRunConfig (paths relative
# to DATA/pretrain). Every input names its source so copies in other folders keep it.
INPUTS = {
    "zh": [
        {"path": "zh/peoples_daily_199801.txt", "source": "peoples_daily"},
        {"path": "zh/cmrc2018_*.json", "source": "cmrc2018", "text_field": "context_text"},
        {"path": "zh/reviews_*.txt", "source": "reviews"},
    ],
    "en": [
        {"path": "en/wiki_demo.txt", "source": "wiki_demo"},
        {"path": "en/c4_demo.jsonl", "source": "c4"},
        {"path": "en/tiny_shakespeare.txt", "source": "tiny_shakespeare"},
    ],
}


def inputs_for(lang: str, data: Path) -> list[dict]:
    return [{**spec, "path": str(data / "pretrain" / spec["path"])} for spec in INPUTS[lang]]


def emit(record: dict) -> None:
    """One measurement = one JSON line on stdout."""
    print(json.dumps(record, ensure_ascii=False), flush=True)


def summary(seconds: list[float]) -> dict:
    """Best-of-N (the least disturbed run on a shared machine) plus the spread."""
    best = min(seconds)
    return {"runs_s": [round(s, 3) for s in seconds], "best_s": round(best, 3),
            "median_s": round(statistics.median(seconds), 3),
            "spread": round((max(seconds) - best) / best, 3)}  # (worst - best) / best


def _cpu_snapshot() -> dict:
    """{(pid, start time): (kind, CPU seconds so far)} of this process and every live
    process it started (a local Ray: GCS, raylet, workers). Kinds: "driver" (this
    process: planning, Ray Data's executor loop), "workers" (Ray task/actor processes,
    named ray::...), "ray_system" (GCS, raylet, agents, other helpers)."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me] + me.children(recursive=True):
        try:
            with proc.oneshot():
                t, created = proc.cpu_times(), proc.create_time()
                name = "" if proc is me else proc.name() + " " + " ".join(proc.cmdline()[:1])
        except psutil.Error:
            continue
        if proc is me:
            kind = "driver"
        elif "ray::" in name and "Agent" not in name:
            kind = "workers"
        else:
            kind = "ray_system"
        out[proc.pid, created] = (kind, t.user + t.system)
    return out


class CpuMeter:
    """CPU seconds (user + system) of this process and everything it started, between
    enter and exit, by kind (see _cpu_snapshot). Bytes per CPU-second are what a core
    delivers whatever else shares the machine; wall-clock rates on a busy machine are
    not. The process tree is sampled every `interval` seconds, because Ray ends idle
    workers (those of a task's runtime_env right after the job): a process that exits
    counts up to its last sample. Ray's idle polling is counted (part of the cost).

        with CpuMeter() as m:
            run()
        m.total, m.by_kind
    """

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self._stop, self._thread = interval, threading.Event(), None
        self.total, self.by_kind = 0.0, {}

    def _sample(self) -> None:
        for key, (kind, cpu) in _cpu_snapshot().items():
            self._seen[key] = (kind, max(cpu, self._seen.get(key, (kind, 0.0))[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuMeter":
        import threading

        self._base = _cpu_snapshot()
        self._seen = dict(self._base)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        by_kind = {"driver": 0.0, "workers": 0.0, "ray_system": 0.0}
        for key, (kind, cpu) in self._seen.items():
            by_kind[kind] += cpu - self._base.get(key, (kind, 0.0))[1]
        self.by_kind = {k: round(v, 3) for k, v in by_kind.items()}
        self.total = sum(by_kind.values())


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def machine() -> dict:
    import pyarrow
    import ray
    import tokenizers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kib = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "tokenizers": tokenizers.__version__, "load1_at_start": load1()}


@contextmanager
def ray_session(num_cpus: int):
    """A fresh local Ray with `num_cpus` CPUs; yields the seconds ray.init took.
    The project's ensure_ray() reuses it, so run_data / run_pack run inside it."""
    import time

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        ray.shutdown()
    t = time.perf_counter()
    # "local": always a fresh instance, never a cluster another process started with `ray start`
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    init_s = time.perf_counter() - t
    try:
        yield init_s
    finally:
        ray.shutdown()


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A short aligned table of the measurements (after the JSON lines)."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for k, row in enumerate(cells):
        print("  ".join(v.rjust(w) if k else v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def side_by_side(order: str, run, extra: dict, ratios: dict[str, str], columns: list[str]) -> list[dict]:
    """Run each of `order` ("ours,trl") in turn with run(which) -> row (or a list of
    rows: one per setting), add `extra` and the machine, emit each row, then the
    ratios {name: key} against trl's best row for that key, and the table."""
    rows = []
    for which in order.split(","):
        got = run(which)
        for row in got if isinstance(got, list) else [got]:
            row.update({**extra, **machine()})
            emit(row)
            rows.append(row)
    for name, key in ratios.items():
        base = max(r[key] for r in rows if r["what"] == "trl")
        for r in rows:
            r[name] = round(r[key] / base, 2)
    print_table(rows, columns)
    return rows
