"""Listing inputs (issue 15): a `**` glob follows links but reads each directory and
file once, reports the links it skipped, and two inputs never give rows the same id."""

from __future__ import annotations

import json
import os

import pytest

from dataproc.config import DataRunConfig, InputSpec
from dataproc.sources import plan_read_tasks
from tests.dataproc.test_readers import docs, read_all
from zerolm.errors import UserError


@pytest.fixture()
def c4_records(shared_data) -> list[str]:
    with open(shared_data / "pretrain/en/c4_demo.jsonl", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()][:60]


def _tree_with_links(root, records):
    """root/a/x.jsonl, root/a/b/y.jsonl, and links: a loop back to root, a self-link,
    a broken link, a second path to a file and to a directory."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "x.jsonl").write_text("\n".join(records[:20]) + "\n", encoding="utf-8")
    (root / "a" / "b" / "y.jsonl").write_text("\n".join(records[20:55]) + "\n", encoding="utf-8")
    os.symlink(root, root / "a" / "b" / "loop")
    os.symlink(root / "a" / "self", root / "a" / "self")
    os.symlink(root / "missing.jsonl", root / "a" / "broken.jsonl")
    os.symlink(root / "a" / "x.jsonl", root / "a" / "z_copy.jsonl")
    os.symlink(root / "a" / "b", root / "a" / "c_dir")


def test_a_link_loop_is_walked_once_and_skipped_links_are_reported(tmp_path, c4_records):
    _tree_with_links(tmp_path / "in", c4_records)
    skipped: list = []
    tasks = plan_read_tasks([InputSpec(path=str(tmp_path / "in" / "**" / "*.jsonl"))], 1 << 30, skipped)
    assert sorted(t.relpath for t in tasks) == ["a/b/y.jsonl", "a/x.jsonl"]
    why = {os.path.relpath(s["path"], tmp_path / "in"): s["why"] for s in skipped}
    assert set(why) == {"a/b/loop", "a/c_dir", "a/self", "a/broken.jsonl", "a/z_copy.jsonl"}
    assert "already listed" in why["a/b/loop"] and "already listed" in why["a/c_dir"]
    assert "self-referencing" in why["a/self"] and "self-referencing" in why["a/broken.jsonl"]
    assert why["a/z_copy.jsonl"] == f"same file as {tmp_path / 'in' / 'a' / 'x.jsonl'}"
    df, _ = read_all(tmp_path / "in" / "**" / "*.jsonl")
    assert len(docs(df)) == 55 and df["id"].is_unique


def test_data_run_counts_each_record_once_and_lists_skipped_links(ray_session, tmp_path, c4_records):
    from dataproc.pipeline import run_data

    _tree_with_links(tmp_path / "in", c4_records)
    cfg = DataRunConfig.model_validate({"output": str(tmp_path / "out"),
                                        "read": {"inputs": [{"path": str(tmp_path / "in" / "**")}]},
                                        "exact_dedup": {"enabled": False}, "outlier": {"enabled": False}})
    stats = run_data(cfg, echo=lambda *_: None)
    assert stats["rows_in"] == 55
    assert stats["read"]["skipped_links_total"] == 5
    assert {os.path.basename(s["path"]) for s in stats["read"]["skipped_links"]} == {
        "loop", "c_dir", "self", "broken.jsonl", "z_copy.jsonl"}


def test_two_inputs_with_the_same_relative_path_get_distinct_ids(tmp_path, c4_records):
    for part, lines in (("en", c4_records[:10]), ("zh", c4_records[10:25])):
        (tmp_path / part).mkdir()
        (tmp_path / part / "part-0.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    inputs = [InputSpec(path=str(tmp_path / "en" / "part-0.jsonl")), InputSpec(path=str(tmp_path / "zh" / "part-0.jsonl"))]
    tasks = plan_read_tasks(inputs, 1 << 30)
    assert [(t.source, t.relpath) for t in tasks] == [("part-0", "en/part-0.jsonl"), ("part-0", "zh/part-0.jsonl")]
    from dataproc.readers import read_task
    import pyarrow as pa

    ids = pa.concat_tables([read_task(t.to_row(), 1 << 20, 64) for t in tasks]).column("id").to_pylist()
    assert len(ids) == 25 and len(set(ids)) == 25


def test_ids_that_cannot_be_made_distinct_stop_the_job(tmp_path, c4_records):
    for top in ("r1", "r2", "u/r1"):
        (tmp_path / top / "a").mkdir(parents=True)
        (tmp_path / top / "a" / "x.jsonl").write_text(json.dumps({"text": top}) + "\n", encoding="utf-8")
    # r1/** and r2/** both give relpath a/x.jsonl (made r1/a/x.jsonl, r2/a/x.jsonl);
    # u/** gives r1/a/x.jsonl under the same source: no unique id is left for it.
    inputs = [InputSpec(path=str(tmp_path / d / "**"), source="web") for d in ("r1", "r2", "u")]
    with pytest.raises(UserError, match="the same ids web/r1/a/x.jsonl@"):
        plan_read_tasks(inputs, 1 << 30)
    # different sources keep them apart
    inputs[2] = InputSpec(path=str(tmp_path / "u" / "**"), source="web2")
    assert len(plan_read_tasks(inputs, 1 << 30)) == 3
