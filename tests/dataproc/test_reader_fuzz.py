"""A bounded fuzz suite for the readers: seeded random files of good records mixed
with every kind of damage (deep nesting, lone surrogates, invalid UTF-8, NUL bytes,
BOMs, CRLF, oversized and truncated records, wrong types, random bytes), read whole
and in small chunks that cut records. Checked for every case: no exception; every
non-blank line is exactly one document or one reject (counted here, independently of
the readers); ids are unique; every document is valid Unicode that parquet can write.
Then one full `data run` over a sample checks the job's own accounting."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataproc.config import InputSpec
from dataproc.readers import read_task
from dataproc.sources import plan_read_tasks

CASES = 60
MAX_RECORD = 2048
WORDS = "the of model data 数据 模型 训练 中文 text café naïve 😀 line record".split()


def _good(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))


def _damaged_json(rng: random.Random) -> bytes:
    kind = rng.randrange(12)
    if kind == 0:
        depth = rng.choice([50, 5000, 20000])
        return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 1:
        return json.dumps({"text": _good(rng) + "\ud800" + _good(rng)}).encode()  # escaped lone surrogate
    if kind == 2:
        return json.dumps({"text": _good(rng)}, ensure_ascii=False).encode()[:-3] + b"\xff\xfe"  # invalid UTF-8
    if kind == 3:
        return b'{"text": "a\x00b"}'
    if kind == 4:
        return json.dumps({"text": "x" * (MAX_RECORD + rng.randint(1, 5000))}).encode()
    if kind == 5:
        return json.dumps({"text": _good(rng)}).encode()[: rng.randint(1, 20)]  # truncated
    if kind == 6:
        return json.dumps(rng.choice([[1, 2], "text", 3, None, {"text": 5}, {"text": None}, {"other": "x"}])).encode()
    if kind == 7:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\n", b" ")
    if kind == 8:
        return json.dumps({"text": _good(rng)}).encode() + b"\r"  # CRLF line ending
    if kind == 9:
        return json.dumps({"text": _good(rng), "meta": {"a" * 3: [1] * 50}}, ensure_ascii=False).encode()
    if kind == 10:
        return b'{"text": "' + "\\u00e9".encode() * 40 + b'"}'
    return json.dumps({"text": _good(rng)}, ensure_ascii=rng.random() < 0.5).encode()


def _case(rng: random.Random) -> tuple[bytes, int]:
    """One jsonl file's bytes and its number of non-blank lines (what must be accounted for)."""
    lines = [_damaged_json(rng) if rng.random() < 0.4 else json.dumps({"text": _good(rng)}).encode()
             for _ in range(rng.randint(1, 40))]
    body = b"\n".join(lines)
    if rng.random() < 0.3:
        body = b"\xef\xbb\xbf" + body
    if rng.random() < 0.5:
        body += b"\n"
    non_blank = sum(1 for line in body.split(b"\n") if line.strip(b" \t\r\xef\xbb\xbf"))
    return body, non_blank


def _read(path, chunk_bytes: int) -> pa.Table:
    tasks = plan_read_tasks([InputSpec(path=str(path))], chunk_bytes)
    return pa.concat_tables([read_task(t.to_row(), MAX_RECORD, 256) for t in tasks])


@pytest.mark.parametrize("seed", range(CASES))
def test_reader_fuzz_case(seed, tmp_path):
    rng = random.Random(seed)
    body, expected = _case(rng)
    path = tmp_path / "f.jsonl"
    path.write_bytes(body)
    outputs = [_read(path, chunk) for chunk in (1 << 20, rng.randint(16, 400))]
    for table in outputs:
        df = table.to_pandas()
        assert len(df) == expected, (seed, len(df), expected)
        assert df["id"].is_unique
        kept = df[df["_drop"].isna()]
        for text in kept["text"]:
            text.encode("utf-8")  # raises on a lone surrogate
        pq.write_table(table, io.BytesIO())  # what the writer does with it
    # chunked reading cuts records at arbitrary bytes and must give the same rows
    whole, chunked = (t.to_pandas().sort_values("id").reset_index(drop=True) for t in outputs)
    assert whole[["id", "text", "_drop"]].equals(chunked[["id", "text", "_drop"]])


@pytest.mark.slow
def test_data_run_over_fuzzed_files_keeps_its_accounting(ray_session, tmp_path):
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data

    expected = 0
    for seed in range(20):
        body, n = _case(random.Random(1000 + seed))
        (tmp_path / "in" / f"{seed:02d}").mkdir(parents=True)
        (tmp_path / "in" / f"{seed:02d}" / "f.jsonl").write_bytes(body)
        expected += n
    cfg = DataRunConfig.model_validate({"output": str(tmp_path / "out"),
                                        "read": {"inputs": [{"path": str(tmp_path / "in" / "**" / "*.jsonl")}],
                                                 "max_record_bytes": MAX_RECORD}})
    stats = run_data(cfg, echo=lambda *_: None)
    rejects = pq.read_table(tmp_path / "out" / "rejects").num_rows
    data = pq.read_table(tmp_path / "out" / "data").num_rows
    assert stats["rows_in"] == expected and stats["rejected"] == rejects and stats["rows_out"] == data
    assert stats["rows_in"] == stats["rows_out"] + stats["rejected"] + sum(stats["dropped"].values())
    assert not (tmp_path / "out" / ".read_counts").exists()


def test_accounting_check_fails_a_stage_that_lost_rows(tmp_path):
    from dataproc.pipeline import check_accounting, read_reports

    (tmp_path / "a.json").write_text(json.dumps({"rows": {"s": 7, "t": 2}}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": {"s": 3}}))
    reports = read_reports(tmp_path)
    check_accounting({"sources": {"s": {"rows_in": 10}, "t": {"rows_in": 2}}}, reports)
    with pytest.raises(RuntimeError, match="s: read 10, written 9"):
        check_accounting({"sources": {"s": {"rows_in": 9}, "t": {"rows_in": 2}}}, reports)
    with pytest.raises(RuntimeError, match="t: read 2, written 0"):
        check_accounting({"sources": {"s": {"rows_in": 10}}}, reports)
