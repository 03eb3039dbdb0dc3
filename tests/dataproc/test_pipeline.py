"""`zerolm data run` end to end on real Ray: accounting, rejects, dedup, reruns."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataproc.config import DataRunConfig
from dataproc.pipeline import run_data
from zerolm.errors import UserError
from zerolm.stage import OWNER, SUCCESS, require_done


def shared_inputs(data):
    p = data / "pretrain"
    return [
        {"path": str(p / "en/*.txt")},
        {"path": str(p / "en/c4_demo.jsonl"), "source": "c4"},
        {"path": str(p / "zh/cmrc2018_*.json"), "source": "cmrc2018", "text_field": "context_text"},
        {"path": str(p / "zh/zhihu_qa_3k.parquet"), "source": "zhihu", "text_field": ["prompt", "response"]},
        {"path": str(p / "zh/fortunes_zh.txt"), "source": "fortunes", "txt_mode": "separator"},
        {"path": str(p / "zh/tang300.txt"), "source": "tang300", "txt_mode": "paragraph"},
        {"path": str(p / "zh/peoples_daily_199801.txt"), "source": "peoples_daily"},
        {"path": str(p / "zh/reviews_*.txt"), "source": "reviews"},
        {"path": str(p / "zh/news_sentences.txt"), "source": "news"},
    ]


def read_output(out):
    files = sorted((out / "data").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas() if files else None


def check_invariant(stats):
    for scope in [stats] + list(stats["sources"].values()):
        assert scope["rows_in"] == scope["rows_out"] + sum(scope["dropped"].values()) + scope["rejected"]


@pytest.fixture(scope="module")
def shared_run(ray_session, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    cfg = DataRunConfig.model_validate({"output": str(out), "read": {"inputs": shared_inputs(shared_data)}})
    stats = run_data(cfg, echo=lambda *_: None)
    return cfg, out, stats


def test_accounting_on_all_shared_pretrain_text(shared_run, shared_data):
    cfg, out, stats = shared_run
    check_invariant(stats)
    # Independent count of what went in: non-blank lines of line files (blank = ASCII
    # whitespace only; a line of U+3000 is a record, dropped later as too short),
    # records of the others.
    p = shared_data / "pretrain"
    lines = lambda f: sum(1 for line in f.read_bytes().split(b"\n") if line.strip())  # noqa: E731
    assert stats["sources"]["peoples_daily"]["rows_in"] == lines(p / "zh/peoples_daily_199801.txt")
    assert stats["sources"]["reviews"]["rows_in"] == lines(p / "zh/reviews_pos.txt") + lines(p / "zh/reviews_neg.txt")
    assert stats["sources"]["c4"]["rows_in"] == 300
    assert stats["sources"]["zhihu"]["rows_in"] == 3000
    cmrc = sum(len(json.loads(f.read_text(encoding="utf-8"))) for f in p.glob("zh/cmrc2018_*.json"))
    assert stats["sources"]["cmrc2018"]["rows_in"] == cmrc
    assert stats["rejected"] == 0
    df = read_output(out)
    assert len(df) == stats["rows_out"] > 0.5 * stats["rows_in"]
    assert list(df.columns[:3]) == ["id", "text", "source"]
    assert df["id"].is_unique and df["text"].is_unique  # exact dedup
    assert stats["dropped"].get("exact_duplicate", 0) > 0  # reviews repeat themselves
    assert stats["chars_out"] == int(df["text"].str.len().sum())
    # every source keeps most of its clean text
    for name in ("peoples_daily", "c4", "cmrc2018", "wiki_demo", "zhihu"):
        s = stats["sources"][name]
        assert s["rows_out"] >= 0.8 * s["rows_in"], (name, s)
    assert require_done(out, "data")["rows_out"] == len(df)
    assert json.loads((out / "stats.json").read_text(encoding="utf-8"))["rows_out"] == len(df)
    steps = stats["steps"]
    assert steps[0]["step"] == "read" and steps[-1]["out"] == stats["rows_out"]


def test_rerun_same_config_is_noop_and_other_config_refused(shared_run):
    cfg, out, stats = shared_run
    mtime = (out / SUCCESS).stat().st_mtime_ns
    again = run_data(cfg, echo=lambda *_: None)
    assert again == stats and (out / SUCCESS).stat().st_mtime_ns == mtime
    other = cfg.model_copy(update={"rows_per_file": 7})
    with pytest.raises(UserError, match="another config"):
        run_data(other, echo=lambda *_: None)


def test_bad_inputs_land_in_rejects_and_job_finishes(ray_session, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = "A perfectly ordinary English sentence that is long enough to keep around."
    (raw / "mixed.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": good}).encode(), b"{not json", b'{"text": 3}', b'{"txt": "x"}',
        b'{"text": "bad \xff utf8"}', b'{"text": "nul\x00"}']))
    (raw / "empty.txt").write_bytes(b"")
    (raw / "binary.txt").write_bytes(bytes(range(256)) * 100)
    (raw / "huge.jsonl").write_text('{"text": "' + "y" * (9 << 20) + '"}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["x"]}), raw / "wrong.parquet")
    out = tmp_path / "out"
    cfg = DataRunConfig.model_validate({"output": str(out), "read": {"inputs": [{"path": str(raw / "*")}]}})
    stats = run_data(cfg, echo=lambda *_: None)
    check_invariant(stats)
    assert stats["rows_out"] == 1 and stats["rejected"] == 9
    assert stats["rejected_by_reason"] == {"bad_json": 1, "bad_type": 1, "missing_field": 1, "invalid_utf8": 1,
                                           "nul_byte": 1, "empty_file": 1, "binary_file": 1,
                                           "record_too_large": 1, "schema_mismatch": 1}
    rejects = pa.concat_tables([pq.read_table(f) for f in (out / "rejects").glob("*.parquet")]).to_pandas()
    assert len(rejects) == 9
    bad_json = rejects[rejects["reason"] == "bad_json"].iloc[0]
    assert bad_json["file"].endswith("mixed.jsonl") and bad_json["line"] == 2 and bad_json["raw"] == b"{not json"


def test_exact_dedup_keeps_smallest_id_and_is_deterministic(ray_session, tmp_path):
    texts = [f"Document number {i} has enough words to pass the length filter easily." for i in range(200)]
    for name, order in (("b.txt", texts), ("a.txt", texts[::-1])):
        (tmp_path / name).write_text("\n".join(order) + "\n", encoding="utf-8")
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        cfg = DataRunConfig.model_validate({
            "output": str(out), "read": {"inputs": [{"path": str(tmp_path / "*.txt"), "source": "s"}],
                                         "chunk_bytes": 1 << 16},
            # near dedup off: these templated lines differ in one number only, and the
            # default word 3-grams at Jaccard 0.5 rightly take them for near-duplicates
            "exact_dedup": {"num_partitions": 5}, "near_dedup": {"method": "off"}, "ray": {"batch_size": 16}})
        stats = run_data(cfg, echo=lambda *_: None)
        check_invariant(stats)
        assert stats["dropped"]["exact_duplicate"] == 200 and stats["rows_out"] == 200
        df = read_output(out)
        assert all(i.startswith("s/a.txt@") for i in df["id"])  # "s/a.txt" < "s/b.txt"
        # Byte-identical files, in name order (the order later stages read them in),
        # although the shuffle hands partitions to tasks in a different order each run.
        outputs.append([(p.name, p.read_bytes()) for p in sorted((out / "data").glob("*.parquet"))])
    assert len(outputs[0]) > 1 and outputs[0] == outputs[1]


def test_interrupted_output_is_cleaned_and_redone(ray_session, tmp_path, shared_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / OWNER).write_text("{}", encoding="utf-8")
    (out / "data").mkdir()
    (out / "data" / "part-stale.parquet").write_bytes(b"half written")
    cfg = DataRunConfig.model_validate({"output": str(out), "read": {
        "inputs": [{"path": str(shared_data / "pretrain/zh/news_sentences.txt")}]}})
    stats = run_data(cfg, echo=lambda *_: None)
    assert not (out / "data" / "part-stale.parquet").exists()
    assert len(read_output(out)) == stats["rows_out"] > 700  # 729 non-blank lines


def test_cli_errors_are_one_line_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "zerolm", "data", "run", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    r = subprocess.run(cmd + ["--set", "filters.lenght.min_chars=3"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "zerolm: error: config error: filters.lenght: unknown key"
    r = subprocess.run(cmd + ["--set", "exact_dedup.enabled=maybe"], capture_output=True, text=True)
    assert r.returncode == 2 and "exact_dedup.enabled" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and ("no files match" in r.stderr or "not found" in r.stderr), r.stderr
