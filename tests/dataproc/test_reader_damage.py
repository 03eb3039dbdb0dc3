"""Damaged compressed files and other text encodings (issue 15): a truncated or
corrupt .gz/.bz2 keeps every complete record before the damage and rejects the rest
with its byte offset; empty compressed files are counted; `read.encoding` decodes
other encodings per file and UTF-16/32 files with a BOM are text. No Ray needed,
except in the last test (a data run reports the encodings it chose)."""

from __future__ import annotations

import bz2
import gzip
import json
import zlib

import pyarrow.parquet as pq
import pytest

from dataproc.config import DataRunConfig, ReadConfig
from tests.dataproc.test_readers import docs, read_all, rejects



@pytest.fixture(scope="module")
def c4_lines(shared_data) -> list[bytes]:
    with open(shared_data / "pretrain/en/c4_demo.jsonl", "rb") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert len(lines) > 200
    return lines


def _complete_prefix(decompressed: bytes) -> tuple[int, int]:
    """(complete lines, byte length of them) in a decompressed prefix."""
    cut = decompressed.rfind(b"\n") + 1
    return decompressed[:cut].count(b"\n"), cut


@pytest.mark.parametrize("codec", ["gzip", "bz2"])
def test_truncated_file_keeps_every_complete_record_before_the_cut(tmp_path, c4_lines, codec):
    body = b"\n".join(c4_lines) + b"\n"
    packed = gzip.compress(body) if codec == "gzip" else bz2.compress(body, 1)  # 100 kB blocks
    cut = packed[: int(len(packed) * 0.6)]
    ext = ".gz" if codec == "gzip" else ".bz2"
    path = tmp_path / f"c4.jsonl{ext}"
    path.write_bytes(cut)
    # What survives, computed independently (one-shot decompression of the prefix).
    prefix = zlib.decompressobj(wbits=31).decompress(cut) if codec == "gzip" else bz2.BZ2Decompressor().decompress(cut)
    n_complete, lost_at = _complete_prefix(prefix)
    assert 0.4 * len(c4_lines) < n_complete < len(c4_lines)

    df, _ = read_all(path)
    kept, bad = docs(df), rejects(df)
    assert kept["text"].tolist() == [json.loads(line)["text"] for line in c4_lines[:n_complete]]
    assert bad["_drop"].tolist() == ["read:truncated_file"]
    assert bad["_offset"].iloc[0] == lost_at
    assert f"from byte {lost_at} on are lost" in bad["_detail"].iloc[0]


def test_truncated_txt_gz_in_paragraph_mode_loses_only_the_open_paragraph(tmp_path, shared_data):
    text = (shared_data / "pretrain/zh/peoples_daily_199801.txt").read_bytes()[:400_000]
    paragraphs = [p for p in text.replace(b"\r", b"").split(b"\n") if p.strip()][:800]
    body = b"\n\n".join(paragraphs) + b"\n"
    packed = gzip.compress(body)
    (tmp_path / "pd.txt.gz").write_bytes(packed[: len(packed) // 2])
    df, _ = read_all(tmp_path / "pd.txt.gz", txt_mode="paragraph")
    kept, bad = docs(df), rejects(df)
    assert bad["_drop"].tolist() == ["read:truncated_file"]
    assert kept["text"].tolist() == [p.decode("utf-8") for p in paragraphs[: len(kept)]]
    assert len(kept) > 0.3 * len(paragraphs)
    # The lost paragraph's start is the reject's offset: the kept text ends right before it.
    assert bad["_offset"].iloc[0] == sum(len(p) + 2 for p in paragraphs[: len(kept)])


def test_corrupt_gzip_keeps_the_records_before_the_damage(tmp_path, c4_lines):
    body = b"\n".join(c4_lines) + b"\n"
    packed = bytearray(gzip.compress(body))
    middle = len(packed) // 2
    packed[middle: middle + 64] = bytes(64)  # zeroed bytes inside the deflate stream
    (tmp_path / "c4.jsonl.gz").write_bytes(bytes(packed))
    df, _ = read_all(tmp_path / "c4.jsonl.gz")
    kept, bad = docs(df), rejects(df)
    # A corrupt block can decode into wrong bytes before zlib notices: those become
    # record rejects; everything before is kept as it was, and nothing raises.
    texts = [json.loads(line)["text"] for line in c4_lines]
    good = kept["text"].tolist()
    assert good[: len(good) // 2] == texts[: len(good) // 2] and len(good) > 0.3 * len(c4_lines)
    assert "read:corrupt_file" in bad["_drop"].tolist()
    assert len(df) <= len(c4_lines) + 1


def test_empty_compressed_files_are_counted_and_members_concatenate(tmp_path, c4_lines):
    (tmp_path / "zero.jsonl.gz").write_bytes(b"")
    (tmp_path / "member.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "blank.txt.gz").write_bytes(gzip.compress(b"\n\n  \n"))
    # Three members, the middle one empty, then zero padding: read as one stream.
    a, b = b"\n".join(c4_lines[:10]) + b"\n", b"\n".join(c4_lines[10:20]) + b"\n"
    (tmp_path / "multi.jsonl.gz").write_bytes(gzip.compress(a) + gzip.compress(b"") + gzip.compress(b) + bytes(512))
    df, _ = read_all(tmp_path / "*.gz")
    by_file = df.groupby(df["id"].str.split("@").str[0].str.split("/").str[1])
    got = {name: sorted(set(g["_drop"].fillna("doc"))) for name, g in by_file}
    assert got == {"zero.jsonl.gz": ["read:empty_file"], "member.jsonl.gz": ["read:empty_file"],
                   "blank.txt.gz": ["read:empty_file"], "multi.jsonl.gz": ["doc"]}
    assert len(docs(df)) == 20
    assert "decompresses to no bytes" in df[df["id"].str.contains("member")]["_detail"].iloc[0]


# ------------------------------------------------------------------ encodings


@pytest.fixture(scope="module")
def zh_lines(shared_data) -> list[str]:
    text = (shared_data / "pretrain/zh/peoples_daily_199801.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()][:300]


@pytest.fixture(scope="module")
def en_lines(c4_lines) -> list[str]:
    # c4 text re-encodable in cp1252, with accents (the point of the encoding)
    out = []
    for line in c4_lines:
        t = json.loads(line)["text"].replace("\n", " ")
        try:
            t.encode("cp1252")
        except UnicodeEncodeError:
            continue
        out.append(t + " café")
    return out[:300]


def _write_encoded(tmp_path, zh_lines, en_lines):
    (tmp_path / "zh_gb.txt").write_bytes("\n".join(zh_lines).encode("gb18030") + b"\n")
    (tmp_path / "en_1252.txt").write_bytes("\n".join(en_lines).encode("cp1252") + b"\n")
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in zh_lines[:50])
    (tmp_path / "zh_16le.jsonl").write_bytes(body.encode("utf-16"))  # utf-16 writes a BOM
    (tmp_path / "zh_16be.txt").write_bytes(b"\xfe\xff" + "\n".join(zh_lines[:40]).encode("utf-16-be"))
    (tmp_path / "utf8.txt").write_bytes("\n".join(zh_lines[:30]).encode("utf-8"))


def _texts_by_file(df) -> dict:
    kept = docs(df)
    return {name: g["text"].tolist() for name, g in kept.groupby(kept["id"].str.split("@").str[0].str.split("/").str[1])}


def test_auto_encoding_decodes_each_file_in_its_own_encoding(tmp_path, zh_lines, en_lines):
    _write_encoded(tmp_path, zh_lines, en_lines)
    df, tasks = read_all_with_encoding(tmp_path / "*", "auto")
    assert rejects(df).empty, rejects(df)[["_drop", "_detail"]]
    got = _texts_by_file(df)
    assert got["zh_gb.txt"] == zh_lines and got["en_1252.txt"] == en_lines
    assert got["zh_16le.jsonl"] == zh_lines[:50] and got["zh_16be.txt"] == zh_lines[:40]
    assert got["utf8.txt"] == zh_lines[:30]


def test_default_utf8_rejects_other_encodings_but_reads_utf16_with_a_bom(tmp_path, zh_lines, en_lines):
    _write_encoded(tmp_path, zh_lines, en_lines)
    df, _ = read_all(tmp_path / "*")
    got = _texts_by_file(df)
    assert got["zh_16le.jsonl"] == zh_lines[:50] and got["zh_16be.txt"] == zh_lines[:40]  # not binary_file
    bad = rejects(df)
    assert set(bad["_drop"]) == {"read:invalid_utf8"}
    assert set(bad["id"].str.split("/").str[1].str.split("@").str[0]) == {"zh_gb.txt", "en_1252.txt"}


def test_an_encoding_list_is_tried_in_order_and_what_fits_none_is_rejected(tmp_path, zh_lines, en_lines):
    _write_encoded(tmp_path, zh_lines, en_lines)
    (tmp_path / "mixed.txt").write_bytes("ok line\n".encode() + "中文".encode("gb18030") + b"\n" + b"\xff\xfe\xfd\n")
    df, _ = read_all_with_encoding(tmp_path / "*.txt", ["utf-8", "gb18030"])
    got = _texts_by_file(df)
    assert got["zh_gb.txt"] == zh_lines
    # cp1252 is not in the list: its accented lines decode under neither and are rejected
    bad = rejects(df)
    en_bad = bad[bad["id"].str.contains("en_1252")]
    assert len(en_bad) == len(en_lines) and set(en_bad["_drop"]) == {"read:invalid_utf8"}
    # a file that fits none as a whole falls back to the first encoding, record by record
    mixed = bad[bad["id"].str.contains("mixed")]
    assert got["mixed.txt"] == ["ok line"] and len(mixed) == 2


def test_split_files_agree_on_their_encoding(tmp_path, zh_lines):
    many = (zh_lines * 3)[:900]
    (tmp_path / "big_gb.txt").write_bytes("\n".join(many).encode("gb18030") + b"\n")
    (tmp_path / "big_16.txt").write_bytes("\n".join(many).encode("utf-16"))
    df, tasks = read_all_with_encoding(tmp_path / "*", "auto", chunk_bytes=1 << 16)
    assert all(sum(t.relpath == name for t in tasks) > 1 for name in ("big_gb.txt", "big_16.txt"))  # both split
    got = _texts_by_file(df)
    assert got["big_gb.txt"] == many and got["big_16.txt"] == many  # UTF-16: read whole by the first task
    assert rejects(df).empty and docs(df)["id"].is_unique


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        ReadConfig(encoding=["utf-8", "klingon"])


def read_all_with_encoding(path, encoding, chunk_bytes=32 << 20):
    import pyarrow as pa

    from dataproc.config import InputSpec
    from dataproc.readers import read_task
    from dataproc.sources import plan_read_tasks

    tasks = plan_read_tasks([InputSpec(path=str(path))], chunk_bytes)
    tables = [read_task(t.to_row(), 1 << 20, 256, encoding) for t in tasks]
    return pa.concat_tables(tables).to_pandas(), tasks


def test_data_run_reports_the_encodings_it_chose(ray_session, tmp_path, zh_lines, en_lines):
    from dataproc.pipeline import run_data

    (tmp_path / "in").mkdir()
    _write_encoded(tmp_path / "in", zh_lines, en_lines)
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "whole record"}\n{"text": "cut')[:-10])
    cfg = DataRunConfig.model_validate({
        "output": str(tmp_path / "out"), "read": {"inputs": [{"path": str(tmp_path / "in" / "*")}], "encoding": "auto"},
        "exact_dedup": {"enabled": False}, "outlier": {"enabled": False}})
    stats = run_data(cfg, echo=lambda *_: None)
    assert stats["read"]["encodings"] == {"cp1252": 1, "gb18030": 1, "utf-16-be": 1, "utf-16-le": 1, "utf-8": 2}
    assert stats["read"]["files_not_utf8"] == {"en_1252/en_1252.txt": "cp1252", "zh_gb/zh_gb.txt": "gb18030",
                                               "zh_16be/zh_16be.txt": "utf-16-be",
                                               "zh_16le/zh_16le.jsonl": "utf-16-le"}
    rejected = pq.read_table(tmp_path / "out" / "rejects").to_pandas()
    assert rejected["reason"].tolist() == ["truncated_file"]
    assert stats["rows_in"] == stats["rows_out"] + stats["rejected"] + sum(stats["dropped"].values())
