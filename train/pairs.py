"""Preference pairs for the reward-model and DPO stages, prepared on the driver: read
(train/preferences.py), hold out a split, render both sides with the chat template,
fit them into `seq_len` tokens.

Each pair is two sequences, prompt + chosen answer and prompt + rejected answer,
stored interleaved (2i chosen, 2i + 1 rejected) in one `Examples`; the mask covers the
final answer only (its <|im_end|> included), which is what DPO's sequence log-probs
sum over. A side longer than seq_len keeps its whole prompt and loses the end of its
answer (counted, as trl truncates completions). A prompt longer than
`max_prompt_tokens` (default half of seq_len) keeps its last tokens, the ones next to
the answer, as trl's `truncation_mode="keep_end"` does (counted), or with
`prompt_truncation: drop` the pair is dropped (counted): a long prompt would otherwise
leave its answers a few tokens, or none. Accounting: records_in = train + val +
rejected + dropped.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from train.chat import ChatTokenizer
from train.config import BaseDataSection
from train.conversations import Reject, parse_files
from train.packing import Examples
from train.preferences import PAIR_FORMATS, Pair, to_pair
from train.sft_data import val_split, file_digest, prompt_text
from zerolm.errors import UserError


class PairsSection(BaseDataSection):
    paths: list[str] = Field(default_factory=list)  # .json, .jsonl, .parquet files or globs
    format: Literal[PAIR_FORMATS] = "auto"  # type: ignore[valid-type]
    system_prompt: str | None = None
    seq_len: int = Field(default=512, ge=16)  # tokens per side (prompt + answer)
    min_answer_tokens: int = Field(default=8, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)  # None: seq_len // 2
    prompt_truncation: Literal["keep_end", "drop"] = "keep_end"
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    val_min: int = Field(default=16, ge=0)
    val_max: int = Field(default=256, ge=0)
    micro_batch_size: int = Field(default=4, ge=1)  # rows of 2 x seq_len positions (whole pairs) per micro-step

    @model_validator(mode="after")
    def _prompt_room(self):
        if self.prompt_limit() + self.min_answer_tokens > self.seq_len:
            raise ValueError(f"data.max_prompt_tokens ({self.max_prompt_tokens}) + data.min_answer_tokens "
                             f"({self.min_answer_tokens}) must not exceed data.seq_len ({self.seq_len})")
        return self

    def prompt_limit(self) -> int:
        return self.max_prompt_tokens if self.max_prompt_tokens is not None else self.seq_len // 2


@dataclass
class PairExamples:
    seqs: Examples  # 2 * n sequences: 2i = chosen of pair i, 2i + 1 = rejected
    margins: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return len(self.margins)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.stem + ".tmp.npz")
        s = self.seqs
        np.savez(tmp, ids=s.ids, mask=s.mask, offsets=s.offsets, prompt_lens=s.prompt_lens, margins=self.margins)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "PairExamples":
        with np.load(path, allow_pickle=False) as z:
            return cls(Examples(z["ids"], z["mask"], z["offsets"], z["prompt_lens"]), z["margins"])

    def digest(self) -> str:
        return hashlib.sha256(self.seqs.digest().encode() + self.margins.tobytes()).hexdigest()

    def pair_positions(self, shift: bool) -> np.ndarray:
        """Positions a pair takes in a row (both sides), for packing whole pairs."""
        lens = self.seqs.lengths() - (1 if shift else 0)
        return lens[0::2] + lens[1::2]


@dataclass
class PairData:
    train: PairExamples
    val: PairExamples
    stats: dict
    rejects: list[Reject]
    files: list[dict] = field(default_factory=list)


def read_pairs(d: PairsSection) -> tuple[list[Pair], list[Reject], int, list[Path]]:
    def parse(record: dict) -> Pair:
        pair = to_pair(record, d.format)
        if d.system_prompt and pair.prompt[0]["role"] != "system":
            pair.prompt = [{"role": "system", "content": d.system_prompt}] + pair.prompt
        return pair

    items, rejects, records, files = parse_files(
        d.paths, parse, missing="no preference data: give --data FILE_OR_GLOB (json, jsonl or parquet)")
    return [pair for pair, _ in items], rejects, records, files


def encode_pairs(pairs: list[Pair], chat: ChatTokenizer, d: PairsSection) -> tuple[list, Counter, dict]:
    """[(chosen (ids, mask, prompt_len), rejected (...), margin) | None per pair], drops, cut counts."""
    convs = [c for p in pairs for c in p.conversations()]
    encoded = chat.encode_many(convs) if convs else []
    limit, seq_len = d.prompt_limit(), d.seq_len
    out, dropped, cut = [], Counter(), {"truncated_answers": 0, "prompts_cut": 0}
    for i, pair in enumerate(pairs):
        sides = []
        for e in encoded[2 * i:2 * i + 2]:
            start = e.answer_starts[-1]
            ids, mask = e.ids, e.mask.copy()
            mask[:start] = 0  # only the final answer counts
            if start > limit:
                if d.prompt_truncation == "drop":
                    break
                ids, mask, start = ids[start - limit:], mask[start - limit:], limit
            if len(ids) > seq_len:
                cut["truncated_answers"] += 1
            sides.append((ids[:seq_len], mask[:seq_len], start))
        if len(sides) < 2:
            dropped["prompt_too_long"] += 1
            out.append(None)
            continue
        cut["prompts_cut"] += sides[0][2] < encoded[2 * i].answer_starts[-1]
        out.append((sides[0], sides[1], pair.margin))
    return out, dropped, cut


def _build(items: list) -> PairExamples:
    return PairExamples(Examples.build([side for c, r, _ in items for side in (c, r)]),
                        np.array([m for _, _, m in items], dtype=np.float32))


def prepare_pairs(d: PairsSection, chat: ChatTokenizer, echo=print) -> PairData:
    pairs, rejects, records_in, files = read_pairs(d)
    held_out = val_split([prompt_text(p.prompt) for p in pairs], d.val_fraction, d.val_min, d.val_max, d.seed)
    encoded, dropped, cut = encode_pairs(pairs, chat, d)
    items: dict[str, list] = {"train": [], "val": []}
    for enc, val in zip(encoded, held_out):
        if enc is not None:
            items["val" if val else "train"].append(enc)
    train, val = _build(items["train"]), _build(items["val"])
    rejected = Counter(r.reason for r in rejects)
    stats = {"records_in": records_in, "train_pairs": len(train), "val_pairs": len(val),
             "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
             "dropped": sum(dropped.values()), "dropped_by_reason": dict(dropped),
             **cut, "train_tokens": int(len(train.seqs.ids)),
             "train_answer_tokens": int(train.seqs.mask.sum())}
    if records_in != len(train) + len(val) + stats["rejected"] + stats["dropped"]:
        raise RuntimeError(f"preference data accounting does not add up: {stats}")
    if not len(train):
        raise UserError(f"no usable preference pair in {', '.join(d.paths)}: {records_in} records, rejected "
                        f"{dict(rejected)}, dropped {dict(dropped)}")
    echo(f"pairs: {records_in} records -> {len(train)} train + {len(val)} held out; rejected "
         f"{stats['rejected_by_reason'] or 0}, dropped {stats['dropped_by_reason'] or 0}, {cut['prompts_cut']} prompts cut to their "
         f"last {d.prompt_limit()} tokens, {cut['truncated_answers']} answers cut to {d.seq_len} tokens")
    return PairData(train, val, stats, rejects, [file_digest(f) for f in files])


def pair_rows(data: PairExamples, row_len: int, *, seed: int, shift: bool) -> list[list[int]]:
    """Rows of sequence indices holding whole pairs (chosen then rejected), packed."""
    from train.packing import pack_rows

    rows = pack_rows(data.pair_positions(shift), row_len, seed=seed)
    return [[s for p in row for s in (2 * p, 2 * p + 1)] for row in rows]
