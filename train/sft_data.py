"""SFT data preparation, on the driver before any worker starts: read every record
(train/conversations.py), drop near-duplicate prompts, hold out a split, render and
tokenize with the chat template (train/chat.py), truncate at turn boundaries.

Accounting, checked at the end: records_in = train + val + rejected + dropped, where
rejected are records that could not be read or are not a usable conversation (file,
line or row, reason: RUN_DIR/data/rejects.jsonl) and dropped are usable ones left
out on purpose (near-duplicate prompts, too long for seq_len even at the first turn).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataproc.near_dedup.local import near_duplicate_of
from train.chat import ChatTokenizer, truncate_at_turn
from train.conversations import Reject, check_conversation, fill_placeholders, parse_files, to_messages
from train.packing import Examples
from zerolm.errors import UserError

ENCODE_CHUNK = 2048  # conversations tokenized per encode_batch call


@dataclass
class SFTData:
    train: Examples
    val: Examples
    stats: dict
    rejects: list[Reject]
    files: list[dict] = field(default_factory=list)  # {"path", "sha256", "bytes"} per input file


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "sha256": h.hexdigest(), "bytes": path.stat().st_size}


def prompt_text(msgs: list[dict]) -> str:
    return "\n".join(m["content"] for m in msgs if m["role"] == "user")


def val_split(prompts: list[str], fraction: float, lo: int, hi: int, seed: int) -> np.ndarray:
    """Bool mask of held-out examples: those whose prompt hashes lowest (a function of
    the content, not of file order), min(hi, max(lo, fraction * n)) of them."""
    n = len(prompts)
    k = 0 if fraction <= 0 else min(hi, max(lo, round(fraction * n)), n - 1)
    keys = np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{p}".encode(), digest_size=8).digest(), "little")
                     for p in prompts], dtype=np.uint64)
    out = np.zeros(n, dtype=bool)
    out[np.argsort(keys, kind="stable")[:max(k, 0)]] = True
    return out


def prepare_sft_data(d, chat: ChatTokenizer, echo=print) -> SFTData:
    """d: the config's SFT data section."""
    unfilled: Counter = Counter()

    def parse(record: dict) -> list[dict]:
        msgs = to_messages(record, d.format, prompt_field=d.prompt_field, response_field=d.response_field,
                           system_field=d.system_field)
        if d.system_prompt and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": d.system_prompt}] + msgs
        msgs, left = fill_placeholders(msgs, d.placeholders)
        check_conversation(msgs)
        unfilled.update(left)
        return msgs

    items, rejects, records_in, files = parse_files(
        d.paths, parse, missing="no SFT data: give --data FILE_OR_GLOB (json, jsonl or parquet)")
    convs, wheres = [m for m, _ in items], [w for _, w in items]
    per_file = Counter(Path(w.file).name for w in wheres) + Counter(Path(r.where.file).name for r in rejects)
    dropped: Counter = Counter()
    prompts = [prompt_text(c) for c in convs]
    if d.prompt_dedup.enabled and convs:
        dup = near_duplicate_of(prompts, d.prompt_dedup.threshold, num_perm=d.prompt_dedup.num_perm)
        dropped["near_duplicate_prompt"] = int((dup >= 0).sum())
        keep = np.flatnonzero(dup < 0)
        convs, wheres, prompts = [convs[i] for i in keep], [wheres[i] for i in keep], [prompts[i] for i in keep]
    held_out = val_split(prompts, d.val_fraction, d.val_min, d.val_max, d.seed)
    items: dict[str, list] = {"train": [], "val": []}
    truncated = 0
    for c0 in range(0, len(convs), ENCODE_CHUNK):
        chunk = convs[c0:c0 + ENCODE_CHUNK]
        try:
            encoded = chat.encode_many(chunk)
        except ValueError:  # one conversation the template cannot render: find it
            encoded = []
            for j, conv in enumerate(chunk):
                try:
                    encoded += chat.encode_many([conv])
                except ValueError as exc:
                    rejects.append(Reject(wheres[c0 + j], "chat_template_error", str(exc)))
                    encoded.append(None)
        for j, e in enumerate(encoded):
            if e is None:
                continue
            cut = truncate_at_turn(e, d.seq_len + 1)  # n tokens give n - 1 (input, target) positions
            if cut is None:
                dropped["too_long"] += 1
                continue
            truncated += cut is not e
            items["val" if held_out[c0 + j] else "train"].append((cut.ids, cut.mask, cut.prompt_len))
    train, val = Examples.build(items["train"]), Examples.build(items["val"])
    rejected = Counter(r.reason for r in rejects)
    stats = {
        "records_in": records_in, "train_examples": len(train), "val_examples": len(val),
        "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
        "dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
        "truncated_at_turn": truncated, "records_per_file": dict(per_file),
        "train_tokens": int(len(train.ids)), "train_assistant_tokens": int(train.mask.sum()),
        "val_tokens": int(len(val.ids)), "unfilled_placeholders": dict(unfilled),
    }
    if records_in != len(train) + len(val) + stats["rejected"] + stats["dropped"]:
        raise RuntimeError(f"SFT data accounting does not add up: {stats}")
    if not len(train):
        raise UserError(f"no usable SFT example in {', '.join(d.paths)}: {records_in} records, rejected "
                        f"{dict(rejected)}, dropped {dict(dropped)}")
    if unfilled:
        echo(f"warning: placeholders without a value (set data.placeholders): {dict(unfilled)}")
    return SFTData(train, val, stats, rejects, [file_digest(f) for f in files])
