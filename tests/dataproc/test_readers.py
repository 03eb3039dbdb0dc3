"""Readers: every format, chunked == whole, and every kind of bad input becomes a
counted reject (never an exception, never silently lost). No Ray needed."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataproc.config import InputSpec
from dataproc.readers import read_task
from dataproc.sources import plan_read_tasks
from zerolm.errors import UserError

MAX_RECORD = 1 << 20


def read_all(path, chunk_bytes=32 << 20, max_record=MAX_RECORD, **spec):
    tasks = plan_read_tasks([InputSpec(path=str(path), **spec)], chunk_bytes)
    tables = [read_task(t.to_row(), max_record, 256) for t in tasks]
    return pa.concat_tables(tables).to_pandas(), tasks


def docs(df):
    return df[df["_drop"].isna()]


def rejects(df):
    return df[df["_drop"].notna()]


def test_txt_lines_chunked_equals_whole(shared_data):
    path = shared_data / "pretrain/zh/peoples_daily_199801.txt"
    whole, tasks1 = read_all(path)
    chunked, tasks2 = read_all(path, chunk_bytes=1 << 16)
    assert len(tasks1) == 1 and len(tasks2) > 50
    expected = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert docs(whole)["text"].tolist() == expected
    assert docs(chunked)["text"].tolist() == expected
    assert docs(chunked)["id"].tolist() == docs(whole)["id"].tolist()
    assert docs(whole)["id"].is_unique
    assert set(whole["source"]) == {"peoples_daily_199801"}


def test_jsonl_chunked_equals_whole_and_source_name(shared_data):
    path = shared_data / "pretrain/en/c4_demo.jsonl"
    whole, _ = read_all(path, source="c4")
    chunked, _ = read_all(path, chunk_bytes=1 << 16, source="c4")
    expected = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert docs(whole)["text"].tolist() == expected == docs(chunked)["text"].tolist()
    assert len(rejects(whole)) == 0
    assert whole["id"].iloc[0] == "c4/c4_demo.jsonl@0"


def test_json_array_with_text_field(shared_data):
    path = shared_data / "pretrain/zh/cmrc2018_trial.json"
    df, _ = read_all(path, text_field="context_text")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert docs(df)["text"].tolist() == [d["context_text"] for d in data]
    assert df["id"].iloc[1].endswith("#1")


def test_parquet_joined_fields(shared_data):
    path = shared_data / "pretrain/zh/zhihu_qa_3k.parquet"
    df, _ = read_all(path, text_field=["prompt", "response"], join_with="\n\n")
    table = pq.read_table(path)
    assert len(docs(df)) == table.num_rows
    first = table.slice(0, 1).to_pylist()[0]
    assert docs(df)["text"].iloc[0] == first["prompt"] + "\n\n" + first["response"]


def test_txt_separator_and_paragraph_modes(shared_data, tmp_path):
    fortunes = shared_data / "pretrain/zh/fortunes_zh.txt"
    df, _ = read_all(fortunes, txt_mode="separator", record_separator="%")
    raw = fortunes.read_text(encoding="utf-8")
    records = [r.strip("\n") for r in raw.split("\n%\n") if r.strip()]
    assert len(docs(df)) == len(records)
    assert docs(df)["text"].iloc[0] == records[0].removeprefix("%\n")
    p = tmp_path / "paras.txt"
    p.write_text("first para\nline two\n\n\n second\n  \nthird\n", encoding="utf-8")
    df, _ = read_all(p, txt_mode="paragraph")
    assert docs(df)["text"].tolist() == ["first para\nline two", " second", "third"]
    df, _ = read_all(p, txt_mode="file")
    assert len(docs(df)) == 1


def test_bad_jsonl_lines_are_rejected_with_line_numbers(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [b'{"text": "good one"}', b'{"text": ', b'{"text": 42}', b'{"body": "x"}', b'{"text": null}',
             b'[1, 2]', b'{"text": "bad \xff\xfe utf8"}', b'{"text": "nul \x00 inside"}', b'', b'{"text": "good two"}']
    p.write_bytes(b"\n".join(lines))
    df, _ = read_all(p)
    assert docs(df)["text"].tolist() == ["good one", "good two"]
    bad = rejects(df)
    reasons = dict(zip(bad["_line"].astype(int), bad["_drop"]))
    assert reasons == {2: "read:bad_json", 3: "read:bad_type", 4: "read:missing_field", 5: "read:missing_field",
                       6: "read:bad_type", 7: "read:invalid_utf8", 8: "read:nul_byte"}
    assert bad["_raw"].iloc[0] == b'{"text": '
    assert all(bad["_file"] == str(p))


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "b.json").write_bytes(bom + b'[{"text": "in an array"}]')
    (tmp_path / "c.txt").write_bytes(bom + "第一行\nsecond line\n".encode("utf-8"))
    df, _ = read_all(tmp_path / "a.jsonl")
    assert docs(df)["text"].tolist() == ["first", "second"] and rejects(df).empty
    df, _ = read_all(tmp_path / "b.json")
    assert docs(df)["text"].tolist() == ["in an array"] and rejects(df).empty
    df, _ = read_all(tmp_path / "c.txt")
    assert docs(df)["text"].tolist() == ["第一行", "second line"]
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "x"}\n' + bom + b'{"text": "y"}\n')  # not at the start: still bad
    df, _ = read_all(tmp_path / "d.jsonl")
    assert docs(df)["text"].tolist() == ["x"] and rejects(df)["_drop"].tolist() == ["read:bad_json"]


def test_reject_line_numbers_in_later_chunks(tmp_path):
    p = tmp_path / "big.jsonl"
    rows = [json.dumps({"text": f"document number {i} " * 20}) for i in range(3000)]
    rows[2500] = "{broken"
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    df, tasks = read_all(p, chunk_bytes=1 << 16)
    assert len(tasks) > 5
    assert len(docs(df)) == 2999
    assert rejects(df)["_line"].tolist() == [2501]


def test_oversized_record_is_rejected_not_loaded(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "small"}) + "\n")
        f.write('{"text": "' + "x" * (50 << 20) + '"}\n')
        f.write(json.dumps({"text": "after"}) + "\n")
    df, _ = read_all(p, max_record=8 << 20)
    assert docs(df)["text"].tolist() == ["small", "after"]
    bad = rejects(df)
    assert bad["_drop"].tolist() == ["read:record_too_large"] and len(bad["_raw"].iloc[0]) == 256


def test_empty_binary_unknown_and_corrupt_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "data.xyz").write_text("some text", encoding="utf-8")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "schema.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "types.parquet")
    df, _ = read_all(tmp_path / "*")
    got = dict(zip(df["id"].str.split("/").str[1].str.split("@|#").str[0], df["_drop"]))
    assert got == {"empty.txt": "read:empty_file", "blob.txt": "read:binary_file", "data.xyz": "read:unknown_format",
                   "broken.parquet": "read:bad_parquet", "schema.parquet": "read:schema_mismatch",
                   "types.parquet": "read:schema_mismatch"}


def test_gzip_glob_and_file_uri(tmp_path):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    with gzip.open(sub / "x.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "compressed doc"}) + "\n")
    (tmp_path / "a" / "y.txt").write_text("plain doc\n", encoding="utf-8")
    (tmp_path / "a" / "_SUCCESS").write_text("{}", encoding="utf-8")
    df, _ = read_all(f"file://{tmp_path}/a/**")
    assert sorted(docs(df)["text"]) == ["compressed doc", "plain doc"]
    assert set(df["source"]) == {"x", "y"}
    assert "b/x.jsonl.gz@0" in docs(df)["id"].iloc[0] + docs(df)["id"].iloc[1]


def test_missing_input_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plan_read_tasks([InputSpec(path=str(tmp_path / "nope.txt"))], 1 << 20)
    with pytest.raises(UserError, match="no files match"):
        plan_read_tasks([InputSpec(path=str(tmp_path / "*.jsonl"))], 1 << 20)


def test_same_file_twice_is_read_once(shared_data):
    path = str(shared_data / "pretrain/zh/news_sentences.txt")
    tasks = plan_read_tasks([InputSpec(path=path), InputSpec(path=os.path.dirname(path) + "/news_*.txt")], 1 << 20)
    assert len(tasks) == 1


def test_read_chunks_give_every_cpu_work(shared_data):
    """One big file is cut into >= 4 pieces per CPU (never below 1 MiB, never above
    chunk_bytes); several files count once each however they are cut."""
    from dataproc.sources import read_chunk_bytes

    path = shared_data / "pretrain" / "zh" / "peoples_daily_199801.txt"  # 5.5 MB
    whole = plan_read_tasks([InputSpec(path=str(path))], 32 << 20)
    assert len(whole) == 1
    chunk = read_chunk_bytes(32 << 20, whole, cpus=1)
    assert chunk == -(-path.stat().st_size // 4) and len(plan_read_tasks([InputSpec(path=str(path))], chunk)) == 4
    assert read_chunk_bytes(32 << 20, whole, cpus=8) == 1 << 20  # the floor: 32 pieces would be too small
    assert read_chunk_bytes(1 << 16, whole, cpus=1) == 1 << 16  # never above the configured size
    cut = plan_read_tasks([InputSpec(path=str(path))], 1 << 20)
    assert read_chunk_bytes(32 << 20, cut, cpus=1) == chunk  # the same file cut in six is still 5.5 MB
