"""Evaluation reports: the JSON written to disk / returned over HTTP, and a short
markdown table for people (what `zerolm eval` prints)."""

from __future__ import annotations

from pathlib import Path

from zerolm.stage import write_json_atomic


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    if report["task"] == "bpb":
        cols = ["docs", "tokens", "bytes", "bpb"]
        base = report.get("baselines")
        if base:
            cols += [f"{name}_bpb" for name in base["models"]]
        cols.append("ppl")
        rows = [[name] + [s.get(c) for c in cols] for name, s in report["sources"].items()]
        rows.append(["**overall**"] + [report["overall"].get(c) for c in cols])
        title = (f"bits per byte — model {report['model']}, context {report['context']}, "
                 f"stride {report['stride']} (ppl is per token of the model's tokenizer)")
        note = ""
        if base:
            note = (f"\n\nbaselines on the same tokens and bytes, trained on {base['train_docs']:,} documents "
                    f"({base['train_tokens']:,} tokens): " + "; ".join(f"{k}: {v}" for k, v in base["models"].items()))
        elif "baselines" in report:
            note = "\n\nno n-gram baselines: no pack among --data; give --baseline-train TOKENS_DIR"
        return f"{title}\n\n" + _table(["source"] + cols, rows) + note
    cols = ["n", "acc", "acc_norm", "chance"]
    rows = [[name] + [s[c] for c in cols] for name, s in report["subjects"].items()]
    overall = report["overall"]
    rows.append(["**overall**"] + [overall[c] for c in cols])
    title = f"{report['task']} — model {report['model']}, {report['shots']}-shot" + (
        f", {report['split']} split" if report.get("split") else "")
    cut = report.get("items_truncated", sum(1 for it in report.get("items", []) if it.get("truncated")))
    fewer = report.get("items_with_fewer_shots",
                       sum(1 for it in report.get("items", []) if it.get("shots", 0) < report["shots"]))
    notes = []
    if len(report["subjects"]) > 1 and overall.get("acc_macro") is not None:
        notes.append(f"mean over subjects: acc {overall['acc_macro']:.4f}")
    if fewer:
        notes.append(f"{fewer} item(s) kept fewer shots to fit the context")
    if cut:
        notes.append(f"{cut} item(s) cut on the left to fit the context")
    if report.get("note"):
        notes.append(report["note"])
    return f"{title}\n\n" + _table(["subject"] + cols, rows) + ("\n\n" + "; ".join(notes) if notes else "")


def write_report(report: dict, path: str | Path) -> Path:
    """Written atomically (temp file + rename): a killed run never leaves half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    return path
