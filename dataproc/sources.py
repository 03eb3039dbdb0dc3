"""Finding input files and planning read tasks (runs on the driver; no file contents).

Inputs are local paths, globs (`**` recurses) or filesystem URIs (s3://, gs://,
hdfs://, file://, anything pyarrow or fsspec knows). Each file becomes one or more
read tasks: line-based files (jsonl, txt per line) larger than `chunk_bytes` are split
into byte ranges, parquet into groups of row groups; other formats are read whole.
The plan holds only paths and offsets, so the driver's memory does not grow with the
corpus.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from zerolm.errors import UserError

COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "txt", ".text": "txt", ".md": "txt",
}
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class ReadTask:
    """One unit of reading work; plain data so it travels to Ray workers as a row."""

    path: str  # path inside the filesystem (absolute for local files)
    fs_uri: str  # "" for the local filesystem, else the URI used to rebuild the fs
    relpath: str  # path relative to the input's base, used in ids and rejects
    source: str
    format: str  # jsonl | json | parquet | txt | unknown
    compression: str  # "" or a pyarrow codec name
    size: int
    mtime: float  # seconds since epoch (0 if unknown); part of the input fingerprint
    start: int  # byte offset (line formats) or first row group (parquet)
    end: int  # end byte offset (exclusive) or row group end (exclusive)
    spec: dict  # the InputSpec this file came from (text_field, txt_mode, ...)

    def to_row(self) -> dict:
        # The spec travels as JSON: its fields vary in type (str or list), which an
        # Arrow column of tasks could not hold.
        return {**asdict(self), "spec": json.dumps(self.spec)}


def split_uri(path: str) -> tuple[pafs.FileSystem, str, str]:
    """Return (filesystem, path inside it, uri prefix to rebuild it on a worker)."""
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), ""
    scheme = path.split("://", 1)[0]
    base = path if not GLOB_CHARS.search(path) else path[: GLOB_CHARS.search(path).start()]
    try:
        fs, inner = pafs.FileSystem.from_uri(base)
        return fs, inner + path[len(base):], path
    except Exception:  # noqa: BLE001 - unknown to pyarrow: try fsspec below
        pass
    try:  # fsspec knows more schemes (memory://, gcs via gcsfs, ...)
        import fsspec

        fsspec_fs, inner = fsspec.core.url_to_fs(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs)), inner, path
    except Exception as exc:  # noqa: BLE001 - any failure is a user-facing "can't open"
        raise UserError(f"cannot open filesystem for {path!r} ({scheme}://): {exc}")


def filesystem_for(fs_uri: str) -> pafs.FileSystem:
    """Rebuild the filesystem on a worker from the URI recorded in the task."""
    if not fs_uri:
        return pafs.LocalFileSystem()
    return split_uri(fs_uri)[0]


def glob_to_regex(pattern: str) -> re.Pattern:
    """Translate a glob relative to its base (`**` = any depth) into a regex."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def expand(path: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """Files matched by a path/glob/URI: (fs, base dir for relpaths, [FileInfo])."""
    fs, inner, _ = split_uri(path)
    match = GLOB_CHARS.search(inner)
    if match is None:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"input not found: {path}")
        if info.type == pafs.FileType.File:
            return fs, str(PurePosixPath(inner).parent), [info]
        base, regex = inner.rstrip("/"), None
    else:
        base = inner[: match.start()].rsplit("/", 1)[0] if "/" in inner[: match.start()] else "."
        regex = glob_to_regex(inner[len(base) + 1:] if base != "." else inner)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files and markers (_SUCCESS) are not data
        if regex is None or regex.match(rel):
            files.append(info)
    if not files:
        raise UserError(f"no files match {path}")
    files.sort(key=lambda i: i.path)
    return fs, base, files


def detect_format(name: str, declared: str) -> tuple[str, str]:
    """(format, compression) from the declared format or the file name."""
    stem, compression = name, ""
    for ext, codec in COMPRESSED.items():
        if name.lower().endswith(ext):
            stem, compression = name[: -len(ext)], codec
            break
    if declared != "auto":
        return declared, compression
    return FORMATS.get(PurePosixPath(stem).suffix.lower(), "unknown"), compression


def default_source(relpath: str) -> str:
    name = PurePosixPath(relpath).name
    for ext in list(COMPRESSED) + list(FORMATS):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "input"
    return name


def parquet_row_group_ranges(fs: pafs.FileSystem, path: str, target_bytes: int) -> list[tuple[int, int]]:
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # noqa: BLE001 - unreadable parquet: one task reports it as a reject
        return [(0, 0)]
    ranges, first, acc = [], 0, 0
    for i in range(meta.num_row_groups):
        acc += meta.row_group(i).total_byte_size
        if acc >= target_bytes:
            ranges.append((first, i + 1))
            first, acc = i + 1, 0
    if first < meta.num_row_groups or not ranges:
        ranges.append((first, meta.num_row_groups))
    return ranges


def plan_read_tasks(inputs: list, chunk_bytes: int) -> list[ReadTask]:
    """Expand every InputSpec into read tasks. A file matched by two inputs is read
    once, by the first (otherwise it would be counted twice)."""
    if not inputs:
        raise UserError("no inputs: give --input PATH_OR_GLOB (or read.inputs in the config)")
    tasks, seen = [], set()
    for spec in inputs:
        fs, base, files = expand(spec.path)
        # Workers rebuild the filesystem from this ("" = local; paths are absolute).
        fs_uri = "" if isinstance(fs, pafs.LocalFileSystem) else _fs_root_uri(spec.path)
        for info in files:
            key = (fs_uri, info.path)
            if key in seen:
                continue
            seen.add(key)
            rel = info.path[len(base):].lstrip("/") if base not in ("", ".") else info.path
            fmt, compression = detect_format(info.path, spec.format)
            source = spec.source or default_source(rel)
            common = dict(path=info.path, fs_uri=fs_uri, relpath=rel, source=source, format=fmt,
                          compression=compression, size=info.size or 0,
                          mtime=info.mtime.timestamp() if info.mtime else 0.0, spec=spec.model_dump())
            splittable = not compression and (fmt == "jsonl" or (fmt == "txt" and spec.txt_mode == "line"))
            if splittable and (info.size or 0) > chunk_bytes:
                for start in range(0, info.size, chunk_bytes):
                    tasks.append(ReadTask(**common, start=start, end=min(start + chunk_bytes, info.size)))
            elif fmt == "parquet":
                for lo, hi in parquet_row_group_ranges(fs, info.path, chunk_bytes):
                    tasks.append(ReadTask(**common, start=lo, end=hi))
            else:
                tasks.append(ReadTask(**common, start=0, end=info.size or 0))
    return tasks


def _fs_root_uri(path: str) -> str:
    """scheme://bucket-or-host part of a URI: enough to rebuild the filesystem."""
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"
