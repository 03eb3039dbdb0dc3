"""Tokenized examples on disk, packed into fixed-length rows for training.

`Examples` is a CSR store (ids, loss mask, offsets) saved as one .npz per split.
An example of n tokens gives n - 1 (input, target) positions; `pack_rows` puts whole
examples into rows of `seq_len` positions (best-fit decreasing over a seeded shuffle,
so rows are ~full and their mix is random), or one example per row without packing.
`row_batch` builds a micro-batch: inputs, targets (-100 where nothing is trained),
per-example positions from 0 and example ids, so attention never crosses from one
example into another (train/model.py's block-diagonal mask) and a packed row gives
each example the same losses as it would get alone.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.losses import IGNORE_INDEX


@dataclass
class Examples:
    ids: np.ndarray  # (N,) int32: all examples' tokens, concatenated
    mask: np.ndarray  # (N,) uint8: 1 where the token is trained on (as a target)
    offsets: np.ndarray  # (n + 1,) int64
    prompt_lens: np.ndarray  # (n,) int32: tokens before the last answer (generation prompts)

    @classmethod
    def build(cls, items: list[tuple[np.ndarray, np.ndarray, int]]) -> "Examples":
        lens = np.array([len(i) for i, _, _ in items], dtype=np.int64)
        return cls(ids=np.concatenate([i for i, _, _ in items]).astype(np.int32) if items else np.zeros(0, np.int32),
                   mask=np.concatenate([m for _, m, _ in items]).astype(np.uint8) if items else np.zeros(0, np.uint8),
                   offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                   prompt_lens=np.array([p for _, _, p in items], dtype=np.int32))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, ids=self.ids, mask=self.mask, offsets=self.offsets, prompt_lens=self.prompt_lens)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Examples":
        with np.load(path, allow_pickle=False) as z:  # plain arrays only
            return cls(ids=z["ids"], mask=z["mask"], offsets=z["offsets"], prompt_lens=z["prompt_lens"])

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.ids, self.mask, self.offsets, self.prompt_lens):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def pack_rows(positions: np.ndarray, seq_len: int, *, seed: int, packing: bool = True) -> list[list[int]]:
    """Rows of example indices; positions[i] = tokens - 1 of example i, each <= seq_len.
    Best-fit decreasing: longest first (ties in seeded random order), each into the
    row with the least room that still fits it."""
    order = np.random.default_rng(seed).permutation(len(positions))
    if not packing:
        return [[int(i)] for i in order]
    order = order[np.argsort(-positions[order], kind="stable")]
    # Rows by room left: at most seq_len + 1 distinct values, kept sorted, so finding
    # the best fit is one bisect however many rows there are.
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []
    rows: list[list[int]] = []

    def put(row: int, room: int) -> None:
        if room not in by_room or not by_room[room]:
            by_room[room] = []
            bisect.insort(rooms, room)
        by_room[room].append(row)

    for i in order:
        need = int(positions[i])
        k = bisect.bisect_left(rooms, need)
        if k == len(rooms):
            rows.append([int(i)])
            put(len(rows) - 1, seq_len - need)
            continue
        room = rooms[k]
        r = by_room[room].pop()
        if not by_room[room]:
            del rooms[k]
        rows[r].append(int(i))
        put(r, room - need)
    perm = np.random.default_rng(seed + 1).permutation(len(rows))  # rows in random order, not by length
    return [rows[r] for r in perm]


def row_batch(examples: Examples, rows: list[list[int]], seq_len: int, pad_id: int,
              device: torch.device | str = "cpu", *, shift: bool = True) -> dict:
    """A micro-batch of len(rows) rows of seq_len positions: x, y (B, T), positions and
    doc_ids (B, T); padding has doc id -1 and no target. "count" = targets trained on,
    "tokens" = real (non-padding) positions, "padding" = the rest. "example_ids" (B, T)
    gives each position's example as an index into the batch's examples (row by row,
    in order; -1 on padding) and "last" (n,) the flat position of each example's last
    input token. shift=False feeds every token of an example as input (n positions,
    no targets): what a scorer reads at the last token."""
    B, cut = len(rows), 1 if shift else 0
    x = np.full((B, seq_len), pad_id, dtype=np.int64)
    y = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    doc = np.full((B, seq_len), -1, dtype=np.int64)
    ex = np.full((B, seq_len), -1, dtype=np.int64)
    last, k = [], 0
    for r, members in enumerate(rows):
        at = 0
        for j, i in enumerate(members):
            ids, mask = examples.example(i)
            n = len(ids) - cut
            if at + n > seq_len:
                raise ValueError(f"row {r} needs more than seq_len={seq_len} positions")
            x[r, at:at + n] = ids[:n]
            if shift:
                y[r, at:at + n] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
            pos[r, at:at + n] = np.arange(n)
            doc[r, at:at + n] = j
            ex[r, at:at + n] = k
            last.append(r * seq_len + at + n - 1)
            at, k = at + n, k + 1
    tokens = int((doc >= 0).sum())
    t = {key: torch.from_numpy(v).to(device) for key, v in (("x", x), ("y", y), ("positions", pos), ("doc_ids", doc),
                                                            ("example_ids", ex), ("last", np.array(last, np.int64)))}
    return {**t, "count": int((y != IGNORE_INDEX).sum()), "tokens": tokens, "padding": B * seq_len - tokens}


class RowSampler:
    """Global row g = k * world_size + rank for a rank's k-th row; epoch e reads the
    packed rows in its own seeded order, so a step's rows are a pure function of
    (seed, step) and resuming needs only the step."""

    def __init__(self, rows: list[list[int]], *, seed: int, rank: int = 0, world_size: int = 1):
        self.rows, self.seed, self.rank, self.world_size = rows, seed, rank, world_size
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._perm[1]

    def take(self, k0: int, n: int) -> list[list[int]]:
        out = []
        for k in range(k0, k0 + n):
            epoch, pos = divmod(k * self.world_size + self.rank, len(self.rows))
            out.append(self.rows[int(self._order(epoch)[pos])])
        return out
