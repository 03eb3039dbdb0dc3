"""Reading one planned task into rows (runs on a worker; never imports ray).

Every record becomes a row of SCHEMA: a document (id, text, source) or a reject (DROP
= "reject:<reason>" with file, line/row, byte offset, detail and the first raw bytes).
Nothing raises for bad data: bad JSON, invalid UTF-8 (or text invalid in the file's
chosen encoding, see dataproc/encodings.py), NUL bytes, a missing or non-string text
field, an empty or binary file, an oversized record, a parquet file with the wrong
schema, a truncated or corrupt compressed file (its intact records before the damage
are kept, see dataproc/decompress.py) all become reject rows, so the writer can count
them.

Ids are stable: `<source>/<relpath>@<byte offset>` for line/paragraph records and
`<source>/<relpath>#<row>` for rows of JSON arrays and parquet files.
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dataproc.base import CHARS_IN, DROP, ID, R_DETAIL, R_FILE, R_LINE, R_OFFSET, R_RAW, REJECT_PREFIX, SOURCE, TEXT
from dataproc.decompress import DamagedStream, open_compressed
from dataproc.encodings import SAMPLE, EncodingSetting, Transcoder, ascii_compatible, bom_of, choose
from dataproc.sources import filesystem_for
from zerolm.text import lone_surrogate

SCHEMA = pa.schema([
    (ID, pa.string()), (TEXT, pa.string()), (SOURCE, pa.string()), (DROP, pa.string()), (CHARS_IN, pa.int64()),
    (R_FILE, pa.string()), (R_LINE, pa.int64()), (R_OFFSET, pa.int64()),
    (R_DETAIL, pa.string()), (R_RAW, pa.binary()),
])
BLOCK = 4 << 20  # bytes read from storage at a time
BINARY_SNIFF = 8192
MAX_JSON_FILE = 1 << 30  # a JSON array is parsed whole; beyond this, ask for jsonl


class _Rows:
    """Column-wise accumulator for one task's output."""

    def __init__(self, task: dict, raw_cap: int):
        self.task, self.raw_cap = task, raw_cap
        self.cols = {name: [] for name in SCHEMA.names}

    def doc(self, key: str, text: str) -> None:
        t = self.task
        for name, value in ((ID, f"{t['source']}/{t['relpath']}{key}"), (TEXT, text), (SOURCE, t["source"]),
                            (DROP, None), (CHARS_IN, len(text)), (R_FILE, None), (R_LINE, None), (R_OFFSET, None),
                            (R_DETAIL, None), (R_RAW, None)):
            self.cols[name].append(value)

    def reject(self, reason: str, detail: str, raw: bytes | None = None, *, key: str = "",
               line=None, offset: int | None = None) -> None:
        """`line` may be a callable: counting lines is only paid for rejects."""
        t = self.task
        if callable(line):
            line = line()
        for name, value in ((ID, f"{t['source']}/{t['relpath']}{key}"), (TEXT, None), (SOURCE, t["source"]),
                            (DROP, REJECT_PREFIX + reason), (CHARS_IN, 0), (R_FILE, t["fs_uri"] + t["path"]), (R_LINE, line),
                            (R_OFFSET, offset), (R_DETAIL, detail[:500]),
                            (R_RAW, None if raw is None else bytes(raw[: self.raw_cap]))):
            self.cols[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=SCHEMA)


def read_task(task: dict, max_record_bytes: int, raw_cap: int, encoding: EncodingSetting = "utf-8",
              info: dict | None = None) -> pa.Table:
    """Read one planned task (see dataproc.sources.ReadTask) into a table of SCHEMA.
    `encoding` is the read.encoding setting (dataproc/encodings.py); the encoding
    chosen for the file is put in `info["encoding"]` when `info` is given."""
    rows = _Rows(task, raw_cap)
    fs = filesystem_for(task["fs_uri"])
    fmt = task["format"]
    spec = task["spec"] = json.loads(task["spec"]) if isinstance(task["spec"], str) else task["spec"]
    try:
        if fmt == "unknown":
            rows.reject("unknown_format", "unknown file extension; set format: jsonl|json|parquet|txt for this input")
        elif fmt == "parquet":
            _read_parquet(fs, task, rows)
        elif task["size"] == 0:
            rows.reject("empty_file", "file is empty (0 bytes)")
        else:
            head = _head(fs, task, SAMPLE)
            enc, skip = choose(head, encoding, whole_file=len(head) < SAMPLE)
            if info is not None:
                info["encoding"] = enc
            surely_text = bom_of(head) is not None or not ascii_compatible(enc)  # UTF-16/32 hold NULs
            if not surely_text and _looks_binary(head[:BINARY_SNIFF]):
                if task["start"] == 0:  # reported once, by the file's first chunk
                    rows.reject("binary_file", "file looks binary (NUL bytes / not text)", head[:BINARY_SNIFF])
            elif fmt == "json":
                _read_json_array(fs, task, spec, rows, enc, skip)
            else:
                _read_lines_or_paragraphs(fs, task, spec, rows, max_record_bytes, enc, skip)
                if not rows.cols[ID] and task["start"] == 0 and (task["compression"] or task["end"] >= task["size"]):
                    what = "decompresses to no bytes" if task["compression"] and not head else "holds only blank lines"
                    rows.reject("empty_file", f"no records: the file {what}")
    except (OSError, pa.ArrowException) as exc:
        # The file vanished or the storage failed mid-read; report it instead of
        # killing the job. Rows already read from this task are kept.
        rows.reject("read_error", f"{type(exc).__name__}: {exc}")
    return rows.table()


def _open_stream(fs, task):
    """The file's bytes, decompressed (damage raises DamagedStream after the intact part)."""
    if task["compression"]:
        return open_compressed(fs, task["path"], task["compression"])
    return fs.open_input_stream(task["path"], compression=None)


def _head(fs, task, n: int = BINARY_SNIFF) -> bytes:
    with _open_stream(fs, task) as f:
        try:
            return f.read(n)
        except DamagedStream:
            return b""  # damaged before any byte: the read itself reports it


def _looks_binary(head: bytes) -> bool:
    if b"\x00" not in head:
        return False
    # Text with a stray NUL is still text (its records are rejected one by one);
    # a file with NULs whose bytes are mostly not printable UTF-8 is binary.
    text = head.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f"))
    return bad > 0.1 * max(1, len(text))


# ---------------------------------------------------------------- line-based files


def _iter_lines(f, start: int, end: int, max_bytes: int) -> Iterator[tuple[int, int, bytes, bool]]:
    """Yield (offset, line index from the first yielded line, line without newline,
    oversized) for lines that START in [start, end). An oversized line is cut to
    max_bytes while being streamed past, so a 50 MB line never sits in memory whole."""
    pos = start
    if start > 0:
        # The line crossing `start` belongs to the previous chunk: skip to its end.
        scan = start - 1
        f.seek(scan)
        while True:
            block = f.read(BLOCK)
            if not block:
                return
            nl = block.find(b"\n")
            if nl >= 0:
                pos = scan + nl + 1
                break
            scan += len(block)
        f.seek(pos)
    pending, pending_len, line_start, index = [], 0, pos, 0
    while True:
        try:
            block = f.read(BLOCK)
        except DamagedStream as damage:  # the line being read is incomplete: lost with the rest
            damage.record_offset = line_start
            raise
        if not block:
            break
        cut = 0
        while True:
            nl = block.find(b"\n", cut)
            piece = block[cut:] if nl < 0 else block[cut:nl]
            if pending_len <= max_bytes:
                pending.append(piece[: max_bytes + 1 - pending_len])
            pending_len += len(piece)
            if nl < 0:
                break
            if line_start >= end:
                return
            yield line_start, index, b"".join(pending), pending_len > max_bytes
            line_start += pending_len + 1
            index += 1
            pending, pending_len, cut = [], 0, nl + 1
    if pending_len and line_start < end:
        yield line_start, index, b"".join(pending), pending_len > max_bytes


def _read_lines_or_paragraphs(fs, task, spec, rows: _Rows, max_bytes: int, enc: str, skip: int) -> None:
    mode = "jsonl" if task["format"] == "jsonl" else spec["txt_mode"]
    transcode = not ascii_compatible(enc)
    if transcode and task["start"] > 0:
        return  # a UTF-16/32 file is read whole by its first task (byte ranges would cut characters)
    whole = bool(task["compression"]) or transcode
    with (_open_stream(fs, task) if whole else fs.open_input_file(task["path"])) as f:
        if transcode:
            f, enc = Transcoder(f, enc, skip), "utf-8"
        try:
            _read_records(f, task, mode, spec, rows, max_bytes, enc, float("inf") if whole else task["end"])
        except DamagedStream as damage:
            at = damage.record_offset
            rows.reject(damage.reason, f"{damage.detail}; the records from byte {at} on are lost",
                        key=f"@{at}", offset=at)


def _read_records(f, task, mode: str, spec, rows: _Rows, max_bytes: int, enc: str, end: float) -> None:
    lines = _iter_lines(f, task["start"], end, max_bytes)
    records = lines if mode in ("jsonl", "line") else _group_records(lines, mode, spec, max_bytes)
    first_line = [1 if task["start"] == 0 else None]  # later chunks: counted on demand

    def line_of(offset: int, index: int) -> int:
        if first_line[0] is None:
            first_line[0] = _line_number(task, offset) - index
        return first_line[0] + index

    for offset, index, raw, oversized in records:
        if mode in ("jsonl", "line") and not raw.strip():
            continue  # blank lines separate records; they are not records
        line = lambda o=offset, i=index: line_of(o, i)  # noqa: E731 - resolved only for rejects
        _emit(rows, raw, oversized, mode, spec, max_bytes, enc, key=f"@{offset}", line=line, offset=offset)


def _group_records(lines, mode: str, spec, max_bytes: int):
    """Turn lines into paragraphs (blank-line separated), separator-delimited records
    or one whole-file record; yields (offset, line index, bytes, oversized)."""
    sep = spec["record_separator"].encode("utf-8")
    buf, size, first, oversized = [], 0, None, False
    try:
        for offset, index, raw, too_big in lines:
            boundary = (mode == "paragraph" and not raw.strip()) or (mode == "separator" and raw.strip() == sep)
            if boundary:
                if buf and any(part.strip() for part in buf):
                    yield first[0], first[1], b"\n".join(buf), oversized
                buf, size, first, oversized = [], 0, None, False
                continue
            if first is None:
                first = (offset, index)
            oversized = oversized or too_big or size + len(raw) > max_bytes
            if not oversized:
                buf.append(raw)
                size += len(raw) + 1
            elif not buf:
                buf.append(raw[:max_bytes])
    except DamagedStream as damage:
        if first is not None:  # the record being gathered is incomplete: it is lost from its start
            damage.record_offset = first[0]
        raise
    if buf and any(part.strip() for part in buf):
        yield first[0], first[1], b"\n".join(buf), oversized


def _line_number(task, offset: int) -> int:
    """1-based line of a byte offset, by counting newlines before it. Only called for
    rejects in later chunks of a split file, where line numbers are not tracked."""
    count, pos = 0, 0
    with filesystem_for(task["fs_uri"]).open_input_file(task["path"]) as f:
        while pos < offset:
            block = f.read(min(BLOCK, offset - pos))
            if not block:
                break
            count += block.count(b"\n")
            pos += len(block)
    return count + 1


_BOM = b"\xef\xbb\xbf"


def _emit(rows: _Rows, raw: bytes, oversized: bool, mode: str, spec, max_bytes: int, enc: str, **where) -> None:
    if where.get("offset") == 0 and raw.startswith(_BOM):  # a UTF-8 byte-order mark opens the file, not the record
        raw = raw[len(_BOM):]
    if oversized:
        rows.reject("record_too_large", f"record larger than max_record_bytes={max_bytes}", raw, **where)
        return
    if b"\x00" in raw:
        rows.reject("nul_byte", "record contains NUL bytes", raw, **where)
        return
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as exc:
        rows.reject(*_undecodable(enc, exc), raw, **where)
        return
    if mode != "jsonl":
        rows.doc(where["key"], text.removesuffix("\r"))
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        rows.reject("bad_json", f"{exc.msg} at column {exc.colno}", raw, **where)
        return
    except RecursionError:  # json's decoder recurses per nesting level
        rows.reject("bad_json", _TOO_DEEP, raw, **where)
        return
    _emit_value(rows, value, spec, raw, **where)


_TOO_DEEP = "JSON nested too deeply to parse"


def _undecodable(enc: str, exc: UnicodeDecodeError) -> tuple[str, str]:
    """(reason, detail) of a record that does not decode in its file's encoding."""
    if enc == "utf-8":
        return "invalid_utf8", f"invalid UTF-8 at byte {exc.start}"
    return "invalid_encoding", f"not valid {enc} at byte {exc.start} (the encoding chosen for this file)"


def _emit_value(rows: _Rows, value, spec, raw: bytes | None, **where) -> None:
    if not isinstance(value, dict):
        rows.reject("bad_type", f"record is a JSON {type(value).__name__}, expected an object", raw, **where)
        return
    fields = spec["text_field"] if isinstance(spec["text_field"], list) else [spec["text_field"]]
    parts = []
    for name in fields:
        part = value.get(name)
        if part is None:
            rows.reject("missing_field", f"field {name!r} missing or null", raw, **where)
            return
        if not isinstance(part, str):
            rows.reject("bad_type", f"field {name!r} is {type(part).__name__}, expected string", raw, **where)
            return
        bad = lone_surrogate(part)
        if bad is not None:
            rows.reject("invalid_unicode", f"field {name!r} has a lone surrogate at character {bad}", raw, **where)
            return
        parts.append(part)
    rows.doc(where["key"], spec["join_with"].join(parts))


# ---------------------------------------------------------------- whole-value files


def _read_json_array(fs, task, spec, rows: _Rows, enc: str, skip: int) -> None:
    if task["size"] > MAX_JSON_FILE:
        rows.reject("record_too_large", f"JSON file over {MAX_JSON_FILE} bytes; convert it to jsonl")
        return
    with _open_stream(fs, task) as f:
        try:
            raw = f.read()
        except DamagedStream as damage:  # one value: nothing of it can be kept
            rows.reject(damage.reason, f"{damage.detail}; the JSON value is lost", offset=damage.offset)
            return
    if not raw.strip():
        rows.reject("empty_file", "file is empty")
        return
    try:
        data = json.loads(raw[skip:].decode(enc))  # skip: a byte-order mark
    except UnicodeDecodeError as exc:
        reason, detail = _undecodable(enc, exc)
        rows.reject(reason, detail, raw[skip + max(0, exc.start - 64):])
        return
    except json.JSONDecodeError as exc:
        rows.reject("bad_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}",
                    raw[max(0, exc.pos - 64):], line=exc.lineno, offset=exc.pos)
        return
    except RecursionError:
        rows.reject("bad_json", _TOO_DEEP, raw[:256])
        return
    items = data if isinstance(data, list) else [data]
    for i, value in enumerate(items):
        item_raw = None
        if not (isinstance(value, dict) and all(isinstance(value.get(f), str) for f in _fields(spec))):
            # ensure_ascii: a lone surrogate stays an escape, so the raw bytes are valid UTF-8
            item_raw = json.dumps(value).encode("utf-8")
        _emit_value(rows, value, spec, item_raw, key=f"#{i}", line=None, offset=None)


def _fields(spec) -> list[str]:
    return spec["text_field"] if isinstance(spec["text_field"], list) else [spec["text_field"]]


def _read_parquet(fs, task, rows: _Rows) -> None:
    spec, fields = task["spec"], _fields(task["spec"])
    try:
        with fs.open_input_file(task["path"]) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            bad = [n for n in fields if n not in schema.names or not _is_string(schema.field(n).type)]
            if bad:
                if task["start"] == 0:  # one reject for the whole file, from its first task
                    got = ", ".join(f"{n}: {schema.field(n).type}" for n in schema.names)
                    rows.reject("schema_mismatch", f"needs string column(s) {bad}; file has {got}")
                return
            first_row = sum(pf.metadata.row_group(i).num_rows for i in range(task["start"]))
            groups = list(range(task["start"], task["end"]))
            if not groups:
                if pf.metadata.num_rows == 0:
                    rows.reject("empty_file", "parquet file has no rows")
                return
            table = pf.read_row_groups(groups, columns=fields)
    except pa.ArrowInvalid as exc:
        rows.reject("bad_parquet", f"not a readable parquet file: {exc}", _head(fs, task))
        return
    columns = [table.column(n).to_pylist() for n in fields]
    for i, values in enumerate(zip(*columns)):
        key = f"#{first_row + i}"
        if any(v is None for v in values):
            missing = [n for n, v in zip(fields, values) if v is None]
            rows.reject("missing_field", f"null in {missing}", key=key, line=first_row + i, offset=None)
        elif any("\x00" in v for v in values):
            rows.reject("nul_byte", "text contains NUL characters", values[0].encode("utf-8"),
                        key=key, line=first_row + i, offset=None)
        else:
            rows.doc(key, spec["join_with"].join(values))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
