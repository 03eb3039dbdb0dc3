"""Accounting for a data stage: counts by source and by drop reason, merged across
write tasks, plus the human summary table.

The invariant every data stage keeps, per source and overall:
    rows_in = rows_out + sum(dropped.values()) + rejected
Rows are counted where they are written, from the DROP column; the read tasks count
what they read on their own (dataproc.pipeline.ReadTasks), and the stage fails if the
two disagree for any source (pipeline.check_accounting), so a row lost or duplicated
between steps cannot go unnoticed.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from dataproc.base import CHARS_IN, DROP, READ_STEP, SOURCE, TEXT, split_drop


def count_batch(batch: pd.DataFrame) -> dict:
    """Partial counts of one written batch: {source: {"drop": {value: n}, "rows_out",
    "chars_in", "chars_out"}} (plain types: it travels back to the driver)."""
    out: dict = {}
    if len(batch) == 0:
        return out
    drops = batch[DROP].fillna("").to_numpy(dtype=object)
    chars_in = batch[CHARS_IN].fillna(0).to_numpy(dtype=np.int64) if CHARS_IN in batch else np.zeros(len(batch), np.int64)
    for source, idx in batch.groupby(SOURCE, sort=False).indices.items():
        live = drops[idx] == ""
        texts = batch[TEXT].to_numpy(dtype=object)[idx[live]]
        out[str(source)] = {
            "drop": dict(Counter(d for d in drops[idx] if d)),
            "rows_out": int(live.sum()),
            "chars_in": int(chars_in[idx].sum()),
            "chars_out": int(sum(len(t) for t in texts)),
        }
    return out


def merge_counts(parts) -> dict:
    merged: dict = defaultdict(lambda: {"drop": Counter(), "rows_out": 0, "chars_in": 0, "chars_out": 0})
    for part in parts:
        for source, c in part.items():
            m = merged[source]
            m["drop"].update(c["drop"])
            for key in ("rows_out", "chars_in", "chars_out"):
                m[key] += c[key]
    return merged


def plain_counts(merged: dict) -> dict:
    return {s: {**c, "drop": dict(c["drop"])} for s, c in merged.items()}


def _summarise(c: dict) -> dict:
    rejected = Counter()
    dropped = Counter()
    for value, n in c["drop"].items():
        step, reason = split_drop(value)
        (rejected if step == READ_STEP else dropped)[reason] += n
    rows_out = c["rows_out"]
    return {
        "rows_in": rows_out + sum(dropped.values()) + sum(rejected.values()),
        "rows_out": rows_out,
        "rejected": sum(rejected.values()),
        "dropped": dict(sorted(dropped.items())),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "chars_in": c["chars_in"],
        "chars_out": c["chars_out"],
    }


def build_stats(parts, step_order: list[str]) -> dict:
    """stats.json content from the write tasks' partial counts."""
    merged = merge_counts(parts)
    total = {"drop": Counter(), "rows_out": 0, "chars_in": 0, "chars_out": 0}
    for c in merged.values():
        total["drop"].update(c["drop"])
        for key in ("rows_out", "chars_in", "chars_out"):
            total[key] += c[key]
    stats = _summarise(total)
    stats["sources"] = {s: _summarise(c) for s, c in sorted(merged.items())}
    stats["steps"] = _steps(total["drop"], stats["rows_in"], step_order)
    return stats


def _steps(drops: Counter, rows_in: int, order: list[str]) -> list[dict]:
    by_step: dict = defaultdict(Counter)
    for value, n in drops.items():
        step, reason = split_drop(value)
        by_step[step][reason] += n
    names = list(order) + sorted(set(by_step) - set(order))
    steps, remaining = [], rows_in
    for name in names:
        removed = sum(by_step[name].values())
        steps.append({"step": name, "in": remaining, "out": remaining - removed, "dropped": dict(by_step[name])})
        remaining -= removed
    return steps


def format_summary(stats: dict) -> str:
    """Short table: one line per step, then one per source."""
    lines = [f"{'step':<14}{'in':>10}{'out':>10}  dropped by reason"]
    for s in stats["steps"]:
        why = ", ".join(f"{r}={n}" for r, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"{s['step']:<14}{s['in']:>10}{s['out']:>10}  {why}")
    lines.append("")
    lines.append(f"{'source':<28}{'rows_in':>9}{'rows_out':>9}{'rejected':>9}{'dropped':>9}{'MB in':>8}{'MB out':>8}")
    for name, s in stats["sources"].items():
        lines.append(
            f"{name[:27]:<28}{s['rows_in']:>9}{s['rows_out']:>9}{s['rejected']:>9}{sum(s['dropped'].values()):>9}"
            f"{s['chars_in'] / 1e6:>8.2f}{s['chars_out'] / 1e6:>8.2f}"
        )
    lines.append(
        f"{'TOTAL':<28}{stats['rows_in']:>9}{stats['rows_out']:>9}{stats['rejected']:>9}"
        f"{sum(stats['dropped'].values()):>9}{stats['chars_in'] / 1e6:>8.2f}{stats['chars_out'] / 1e6:>8.2f}"
    )
    lines.append("(MB = millions of characters)")
    return "\n".join(lines)
