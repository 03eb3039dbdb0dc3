"""The demo's PNG of training curves: one row per run, from metrics.jsonl alone."""

from __future__ import annotations

import json

from zerolm.curves import plot_curves


def test_a_png_of_every_run_that_logged(tmp_path):
    runs = tmp_path / "runs"
    for name, evals in (("pretrain", {"val/loss": 5.0, "val/news/bpb": 2.5, "val/bpb": 2.4}), ("sft", {})):
        run = runs / name
        run.mkdir(parents=True)
        rows = [{"kind": "train", "step": s, "loss": 7.0 - s / 10} for s in (10, 20, 30)]
        rows += [{"kind": "eval", "step": 30, **evals}] if evals else []
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')  # torn line
    (runs / "empty").mkdir()  # a run that never logged is left out
    out = plot_curves(tmp_path, runs, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000 and not list(tmp_path.glob("*.tmp.png"))
    assert plot_curves(tmp_path, tmp_path / "nothing", tmp_path / "none.png") is None
