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
import posixpath
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
        if base.endswith("/") and not inner.endswith("/"):
            inner += "/"  # from_uri drops it: "file:///d/**" must stay /d/**, not /d**
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


def expand(path: str, skipped_links: list | None = None) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """Files matched by a path/glob/URI: (fs, base dir for relpaths, [FileInfo]).
    Local directories are walked following links, each directory and each file once
    (see _walk_local); the links skipped are appended to `skipped_links`."""
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
    if isinstance(fs, pafs.LocalFileSystem):
        paths = _walk_local(base, skipped_links if skipped_links is not None else [], regex)
        files = fs.get_file_info(paths) if paths else []
    else:
        files = []
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
            rel = info.path[len(base):].lstrip("/")
            if info.type == pafs.FileType.File and not _hidden(rel) and (regex is None or regex.match(rel)):
                files.append(info)
    if not files:
        raise UserError(f"no files match {path}")
    files.sort(key=lambda i: i.path)
    return fs, base, files


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))  # hidden files, _SUCCESS markers


def _walk_local(base: str, skipped: list, regex: re.Pattern | None) -> list[str]:
    """Files under a local `base` whose relative path matches `regex` (None: all),
    in sorted order. Links are followed, but a directory is listed once (a link back
    to an ancestor would otherwise be walked until the path is too long, reading the
    same files again and again under ever deeper ids), and a file reached by several
    paths is read once, by the first. Broken and self-referencing links are skipped.
    Every skipped link is reported: {"path", "why"}."""
    seen_dirs: set = set()
    first_path: dict = {}  # real path -> the path it is read under
    out: list[str] = []

    def visit(directory: str, shown: str) -> None:
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen_dirs:
            skipped.append({"path": shown, "why": "directory already listed (a link loop or a second link to it)"})
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append({"path": shown, "why": f"cannot list: {exc.strerror}"})
            return
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links
                if entry.is_symlink():
                    os.stat(entry.path)  # a broken or looping link raises here
            except OSError as exc:
                skipped.append({"path": entry.path, "why": f"broken or self-referencing link: {exc.strerror}"})
                continue
            if is_dir:
                visit(entry.path, entry.path)
            elif is_file:
                rel = entry.path[len(base):].lstrip("/")
                if regex is not None and not regex.match(rel):
                    continue
                real = os.path.realpath(entry.path)
                if real in first_path:
                    skipped.append({"path": entry.path, "why": f"same file as {first_path[real]}"})
                    continue
                first_path[real] = entry.path
                out.append(entry.path)

    visit(base, base)
    return out


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


def plan_read_tasks(inputs: list, chunk_bytes: int, skipped_links: list | None = None) -> list[ReadTask]:
    """Expand every InputSpec into read tasks. A file matched by two inputs (or by two
    links) is read once, by the first (otherwise it would be counted twice)."""
    if not inputs:
        raise UserError("no inputs: give --input PATH_OR_GLOB (or read.inputs in the config)")
    tasks, seen = [], set()
    for spec in inputs:
        fs, base, files = expand(spec.path, skipped_links)
        # Workers rebuild the filesystem from this ("" = local; paths are absolute).
        local = isinstance(fs, pafs.LocalFileSystem)
        fs_uri = "" if local else _fs_root_uri(spec.path)
        for info in files:
            key = (fs_uri, os.path.realpath(info.path) if local else info.path)
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
    _make_ids_unique(tasks)
    return tasks


def read_chunk_bytes(chunk_bytes: int, tasks: list[ReadTask], cpus: int, per_cpu: int = 4,
                     floor: int = 1 << 20) -> int:
    """Chunk size that gives every CPU work even when the input is one big file: at
    least `per_cpu` pieces per CPU of the bytes to read, never below `floor` (nor above
    `chunk_bytes`). Ids are byte offsets in their file, so the cut changes no id and no
    row, only how many read tasks run in parallel."""
    total = sum({(t.fs_uri, t.path): t.size for t in tasks}.values())
    return max(min(floor, chunk_bytes), min(chunk_bytes, -(-total // max(1, per_cpu * cpus))))


def _make_ids_unique(tasks: list[ReadTask]) -> None:
    """Ids are `<source>/<relpath>...`: two files given by different inputs can share
    both (`a/part-0.jsonl` and `b/part-0.jsonl` as two inputs have relpath part-0.jsonl
    and source part-0), and their rows would get the same ids. Such files get their
    path relative to the directory they have in common instead (a/part-0.jsonl,
    b/part-0.jsonl); if ids still collide, the job stops before reading anything."""
    groups: dict = {}
    for t in tasks:
        groups.setdefault((t.source, t.relpath), set()).add((t.fs_uri, t.path))
    for (source, rel), files in groups.items():
        if len(files) < 2:
            continue
        root = posixpath.commonpath([p for _, p in files]) if len({u for u, _ in files}) == 1 else None
        for t in tasks:
            if t.source == source and t.relpath == rel and (t.fs_uri, t.path) in files:
                t.relpath = t.path[len(root):].lstrip("/") if root else f"{t.fs_uri}{t.path}".replace("://", "/")
    final: dict = {}
    for t in tasks:
        other = final.setdefault((t.source, t.relpath), (t.fs_uri, t.path))
        if other != (t.fs_uri, t.path):
            raise UserError(f"two inputs give the same ids {t.source}/{t.relpath}@...: {other[0]}{other[1]} and "
                            f"{t.fs_uri}{t.path}; give the inputs different `source` names")


def _fs_root_uri(path: str) -> str:
    """scheme://bucket-or-host part of a URI: enough to rebuild the filesystem."""
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"
