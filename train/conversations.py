"""Reading conversations the way users have them, for SFT (and preference pairs).

Files: `.jsonl` (one object per line), `.json` (an array of objects; a file that is
not one valid JSON document is read as JSON lines, so one bad record costs only
itself), `.parquet` (one object per row); globs. Record formats, detected per record
(`format: auto`) or forced:

  openai           {"messages": [{"role", "content"}]}  (content: a string, or a list
                   of {"type": "text", "text"} parts)
  sharegpt         {"conversations": [{"from", "value"}], "system"?}
  firefly          {"conversation": [{"human", "assistant"}], "system"?}
  alpaca           {"instruction", "input"?, "output", "system"?, "history"?: [[q, a]]}
  prompt_response  columns named by prompt_field / response_field (system_field)

Every record becomes a list of {"role", "content"} messages: an optional system
message, then user and assistant turns alternating, starting with user. What cannot
be read or does not have that shape is a `Reject` (file, line or row, reason, the
first bytes), never an exception and never dropped without a count.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from zerolm.errors import UserError

FORMATS = ("auto", "openai", "sharegpt", "firefly", "alpaca", "prompt_response")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "chatgpt": "assistant"}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class BadRecord(ValueError):
    """A record that is read but cannot be used; args[0] is the reason."""


@dataclass(frozen=True)
class Where:
    file: str
    line: int | None = None  # 1-based, jsonl and json read as lines
    row: int | None = None  # 0-based, json arrays and parquet

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "row": self.row}


@dataclass(frozen=True)
class Reject:
    where: Where
    reason: str
    raw: str = ""

    def to_dict(self) -> dict:
        return {**self.where.to_dict(), "reason": self.reason, "raw": self.raw[:200]}


def expand_paths(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise UserError(f"no data file matches {pattern!r}")
        files += [Path(m).resolve() for m in matches]
    seen: set = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _json_lines(path: Path, data: bytes) -> Iterator[tuple[dict, Where] | Reject]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = Where(str(path), line=i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Reject(where, "bad_utf8", raw[:200].decode("utf-8", "replace"))
            continue
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            yield Reject(where, "bad_json", text)
            continue
        yield (obj, where) if isinstance(obj, dict) else Reject(where, "not_an_object", text)


def read_records(path: Path) -> Iterator[tuple[dict, Where] | Reject]:
    """(record, where) per readable record, a Reject per unreadable one."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any unreadable parquet is one reject
            yield Reject(Where(str(path)), "bad_parquet", str(exc).splitlines()[0] if str(exc) else "")
            return
        for i, row in enumerate(rows):
            yield row, Where(str(path), row=i)
        return
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte order mark
    if name.endswith(".json"):
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            obj = None  # not one document: read it line by line instead
        if isinstance(obj, list):
            for i, row in enumerate(obj):
                where = Where(str(path), row=i)
                yield (row, where) if isinstance(row, dict) else Reject(where, "not_an_object", json.dumps(row)[:200])
            return
        if isinstance(obj, dict):
            yield obj, Where(str(path), row=0)
            return
    yield from _json_lines(path, data)


def parse_files(patterns: list[str], parse, *, missing: str) -> tuple[list, list[Reject], int, list[Path]]:
    """Every record of the files through parse(record) -> item (raising BadRecord for
    an unusable one): ([(item, where)], rejects, records read, files). missing: the
    error when no file is given."""
    files = expand_paths(patterns) if patterns else []
    if not files:
        raise UserError(missing)
    items, rejects, records = [], [], 0
    for path in files:
        for got in read_records(path):
            records += 1
            if isinstance(got, Reject):
                rejects.append(got)
                continue
            record, where = got
            try:
                items.append((parse(record), where))
            except BadRecord as exc:
                rejects.append(Reject(where, exc.args[0], str(record)[:200]))
    return items, rejects, records, files


def _text(value, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)  # OpenAI content parts, text only
    raise BadRecord(f"non_string_{what}")


def _turns(items, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(items, list):
        raise BadRecord("messages_not_a_list")
    out = []
    for m in items:
        if not isinstance(m, dict):
            raise BadRecord("message_not_an_object")
        role = m.get(role_key)
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise BadRecord("unknown_role")
        out.append({"role": ROLES[role.lower()], "content": _text(m.get(content_key), "content")})
    return out


def detect_format(record: dict, prompt_field: str) -> str:
    for key, fmt in (("messages", "openai"), ("conversations", "sharegpt"), ("conversation", "firefly"),
                     ("instruction", "alpaca")):
        if key in record:
            return fmt
    if prompt_field in record:
        return "prompt_response"
    raise BadRecord("unknown_format")


def to_messages(record: dict, fmt: str = "auto", *, prompt_field: str = "prompt", response_field: str = "response",
                system_field: str | None = None) -> list[dict]:
    """The record as messages (not yet validated: see `check_conversation`)."""
    fmt = detect_format(record, prompt_field) if fmt == "auto" else fmt
    system = record.get("system")
    if fmt == "openai":
        msgs = _turns(record.get("messages"), "role", "content")
    elif fmt == "sharegpt":
        msgs = _turns(record.get("conversations"), "from", "value")
    elif fmt == "firefly":
        turns = record.get("conversation")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise BadRecord("messages_not_a_list")
        msgs = [m for t in turns for m in ({"role": "user", "content": _text(t.get("human"), "content")},
                                           {"role": "assistant", "content": _text(t.get("assistant"), "content")})]
    elif fmt == "alpaca":
        msgs = []
        for pair in record.get("history") or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise BadRecord("bad_history")
            msgs += [{"role": "user", "content": _text(pair[0], "content")},
                     {"role": "assistant", "content": _text(pair[1], "content")}]
        prompt = _text(record.get("instruction"), "instruction")
        extra = record.get("input") or ""
        prompt = f"{prompt}\n{_text(extra, 'input')}" if extra else prompt
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record.get("output"), "output")}]
    elif fmt == "prompt_response":
        if prompt_field not in record or response_field not in record:
            raise BadRecord("missing_field")
        msgs = [{"role": "user", "content": _text(record[prompt_field], "prompt")},
                {"role": "assistant", "content": _text(record[response_field], "response")}]
        system = record.get(system_field) if system_field else None
    else:
        raise BadRecord(f"unknown_format:{fmt}")
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        if not isinstance(system, str):
            raise BadRecord("non_string_system")
        if system.strip():
            msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def check_conversation(msgs: list[dict], *, need_final_assistant: bool = True) -> None:
    """Raise BadRecord unless msgs is [system?] user, assistant, user, ... with no empty
    turn and no text that would be read as a control token."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if any(m["role"] == "system" for m in body):
        raise BadRecord("misplaced_system")
    if not any(m["role"] == "assistant" for m in body):
        raise BadRecord("no_assistant_turn")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord("roles_not_alternating")
        if not m["content"].strip():
            raise BadRecord(f"empty_{m['role']}_turn")
    if need_final_assistant and body[-1]["role"] != "assistant":
        raise BadRecord("ends_with_user_turn")
    for m in msgs:
        if any(tok in m["content"] for tok in SPECIAL_TOKENS):
            raise BadRecord("special_token_in_content")


def fill_placeholders(msgs: list[dict], values: dict[str, str]) -> tuple[list[dict], set[str]]:
    """{{name}} -> values[name] in every message; returns the names left unfilled."""
    unfilled: set[str] = set()

    def sub(match: re.Match) -> str:
        if match.group(1) in values:
            return values[match.group(1)]
        unfilled.add(match.group(1))
        return match.group(0)

    return [{**m, "content": PLACEHOLDER.sub(sub, m["content"])} for m in msgs], unfilled
