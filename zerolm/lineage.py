"""Lineage: every finished output folder says what it was made from.

Each stage's `_SUCCESS` (zerolm/stage.py) carries `inputs`, one record per input:

    {"role": "clean", "path": "/abs/clean", "stage": "data", "config_hash": "..."}   another stage's output
    {"role": "raw", "path": "/abs/file.txt", "bytes": 123, "mtime": 1.7e9}            a file (raw text, data set)
    {"role": "init", "path": "/abs/hf_folder", "weights_sha256": "..."}               a model folder from elsewhere

and `versions` (zerolm, Python and the packages that shape the output), beside the
stage's config hash; the config itself is in the folder (config.json / run.json).
`zerolm lineage DIR` follows the stage inputs back to the raw files.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Iterable

SUCCESS = "_SUCCESS"
PACKAGES = ("zerolm", "torch", "ray", "deepspeed", "tokenizers", "pyarrow", "datasketch", "transformers")
MAX_FILES = 1000  # raw files listed one by one; beyond, a count (the config hash covers them all)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _is_uri(path: str) -> bool:
    return "://" in path


def describe(role: str, path: str | os.PathLike, **known) -> dict:
    """The record of one input: a zerolm output (its stage and config hash), a run's
    `hf/` export (recorded as the run), a model folder, or a file."""
    text = str(path)
    if _is_uri(text):
        return {"role": role, "path": text, **known}
    p = Path(text).resolve()
    for folder in (p, p.parent) if p.name == "hf" else (p,):
        info = _success(folder)
        if info is not None:
            return {"role": role, "path": str(folder), "stage": info.get("stage"),
                    "config_hash": info.get("config_hash"), **known}
    record = {"role": role, "path": str(p), **known}
    if p.is_file():
        stat = p.stat()
        record.setdefault("bytes", stat.st_size)
        record.setdefault("mtime", stat.st_mtime)
    return record


def from_lineage(lineage, role: str = "") -> list[dict]:
    """Input records from a stage's own lineage dict (whatever its shape): every dict
    with a "path" is one input (the key above it is its role), every string that names
    an existing file or folder is one too."""
    out: list[dict] = []

    def walk(node, role: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("path"), str):
                known = {k: node[k] for k in ("sha256", "weights_sha256", "bytes") if k in node}
                out.append(describe(role, node["path"], **known))
                return
            for key, value in node.items():
                walk(value, key)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, role)
        elif isinstance(node, str) and (os.sep in node or _is_uri(node)) and (_is_uri(node) or Path(node).exists()):
            out.append(describe(role, node))

    walk(lineage, role)
    unique, seen = [], set()
    for record in out:
        key = (record["role"], record["path"])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def raw_files(role: str, files: Iterable[tuple[str, int, float]]) -> list[dict]:
    """Records of a data job's raw files ((path, bytes, mtime) each), the first
    MAX_FILES of them one by one and the rest as a count."""
    files = sorted(set(files))
    out = [{"role": role, "path": path, "bytes": size, "mtime": mtime} for path, size, mtime in files[:MAX_FILES]]
    if len(files) > MAX_FILES:
        out.append({"role": role, "more_files": len(files) - MAX_FILES,
                    "more_bytes": sum(size for _, size, _ in files[MAX_FILES:])})
    return out


def _success(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SUCCESS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def chain(path: str | Path, _seen: set | None = None) -> dict:
    """The lineage tree of an output folder: its stage, config hash, versions and
    inputs, each stage input expanded in turn (a folder met twice is expanded once)."""
    folder = Path(path).resolve()
    if folder.name == "hf" and _success(folder) is None and _success(folder.parent) is not None:
        folder = folder.parent
    info = _success(folder)
    node = {"path": str(folder)}
    if info is None:
        node["note"] = "not a finished zerolm output (no _SUCCESS)"
        return node
    seen = set() if _seen is None else _seen
    node.update(stage=info.get("stage"), config_hash=info.get("config_hash"), versions=info.get("versions"))
    if str(folder) in seen:
        node["repeat"] = True
        return node
    seen.add(str(folder))
    if "inputs" not in info:
        node["note"] = "finished before zerolm recorded lineage"
        return node
    node["inputs"] = [dict(rec, upstream=chain(rec["path"], seen)) if rec.get("stage") else rec
                      for rec in info["inputs"]]
    return node


def format_chain(node: dict, indent: int = 0) -> list[str]:
    pad = "  " * indent
    head = f"{pad}{node['path']}"
    if node.get("stage"):
        head += f"  [{node['stage']} {str(node.get('config_hash'))[:12]}]"
    if indent == 0 and node.get("versions"):
        head += "  " + ", ".join(f"{k} {v}" for k, v in node["versions"].items())
    if node.get("repeat"):
        head += "  (shown above)"
    if node.get("note"):
        head += f"  ({node['note']})"
    lines = [head]
    for rec in node.get("inputs", []):
        if "upstream" in rec:
            sub = format_chain(rec["upstream"], indent + 2)
            lines.append(f"{pad}  {rec['role']}:")
            lines += sub
        elif "more_files" in rec:
            lines.append(f"{pad}  {rec['role']}: ... and {rec['more_files']} more files ({rec['more_bytes']:,} bytes)")
        else:
            extra = f"  ({rec['bytes']:,} bytes)" if "bytes" in rec else ""
            digest = rec.get("sha256") or rec.get("weights_sha256")
            extra += f"  sha256 {digest[:12]}" if digest else ""
            lines.append(f"{pad}  {rec['role']}: {rec['path']}{extra}")
    return lines
