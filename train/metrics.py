"""Metrics of a training run: RUN_DIR/metrics.jsonl and TensorBoard event files
(RUN_DIR/tb/), written by rank 0 only, plus a one-line progress print per log step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from zerolm.stage import write_json_atomic

# Dense bf16 peak TFLOP/s per device, for MFU when the config does not say.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


class StaleAttempt(RuntimeError):
    """A newer attempt (the same run resumed) owns RUN_DIR: this one must stop."""


class MetricsLogger:
    """Appends to metrics.jsonl for one attempt at a run. `begin(step)` makes this
    attempt the run's owner (RUN_DIR/attempt.json) and cuts rows after `step`, so a
    resumed run's file reads as one curve; an older attempt still running (a worker
    whose driver was killed) finds it no longer owns the run at its next log line and
    stops there instead of interleaving rows."""

    def __init__(self, run_dir: str | Path, enabled: bool, echo=print):
        self.enabled, self.echo = enabled, echo
        self.path = Path(run_dir) / "metrics.jsonl"
        self.attempt_file = Path(run_dir) / "attempt.json"
        self.attempt = f"{os.getpid()}-{time.time_ns()}"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional; metrics.jsonl always exists
                self.tb = None

    def begin(self, step: int) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.attempt_file, {"attempt": self.attempt, "from_step": step})
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _step_of(line) <= step]
            if len(kept) < len(lines):
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
                os.replace(tmp, self.path)

    def _owns_run(self) -> bool:
        try:
            return json.loads(self.attempt_file.read_text(encoding="utf-8"))["attempt"] == self.attempt
        except (OSError, ValueError, KeyError):
            return True  # begin() not called (a task's own logger) or the file is being replaced

    def log(self, step: int, values: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        if not self._owns_run():
            raise StaleAttempt(f"{self.attempt_file.parent} was resumed by another attempt; this one stops")
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value == value:
                    self.tb.add_scalar(key if "/" in key else f"{kind}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line (killed mid-write) is dropped too


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """Rows of metrics.jsonl; for a step logged twice (re-done after a crash), the
    last row wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if kind is None or row["kind"] == kind:
            rows[(row["kind"], row["step"])] = row
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]
