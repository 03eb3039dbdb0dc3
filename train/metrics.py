"""Metrics of a training run: RUN_DIR/metrics.jsonl and TensorBoard event files
(RUN_DIR/tb/), written by rank 0 only, plus a one-line progress print per log step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

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


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, echo=print):
        self.enabled, self.echo = enabled, echo
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional; metrics.jsonl always exists
                self.tb = None

    def log(self, step: int, values: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
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
