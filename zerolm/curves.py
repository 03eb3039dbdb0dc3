"""Training curves as one PNG: for each run of a pipeline, the training loss by step
and, where the run evaluated, its validation metrics (bits per byte per source for
pretraining, held-out loss and rates for fine-tuning). `zerolm demo` writes it into
its work dir; the numbers come from each run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a run cut off mid-write
    return rows


def plot_curves(work: Path, runs_dir: Path, out: Path) -> Path | None:
    """One row of panels per run folder under runs_dir (in the order they finished):
    training loss, then validation metrics. Returns the PNG's path, None without runs."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    runs = sorted((p for p in runs_dir.iterdir() if _rows(p)), key=lambda p: (p / "metrics.jsonl").stat().st_mtime) \
        if runs_dir.is_dir() else []
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for (loss_ax, val_ax), run in zip(axes, runs):
        rows = _rows(run)
        train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
        loss_ax.set_title(f"{run.name}: training loss")
        loss_ax.set_xlabel("step")
        evals = [r for r in rows if r.get("kind") == "eval"]
        keys = sorted({k for r in evals for k in r if k.startswith("val/") and isinstance(r[k], (int, float))
                       and (k.endswith("bpb") or k.count("/") == 1)})
        for key in keys:
            points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            val_ax.plot(*zip(*points), marker="o", markersize=3, label=key.removeprefix("val/"))
        val_ax.set_title(f"{run.name}: validation" + ("" if keys else " (none recorded)"))
        val_ax.set_xlabel("step")
        if keys:
            val_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"zerolm training curves — {work}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
