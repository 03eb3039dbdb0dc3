"""Exact deduplication on the normalized text (two steps around a hash shuffle).

`add_hash_key` gives each live row a 128-bit BLAKE2 hash of its text; the pipeline
hash-partitions the dataset on that key, so every copy of a text lands in the same
block; `KeepMinId` then keeps, per key, the copy with the smallest id (deterministic
whatever the block layout) and marks the others "exact_dedup:exact_duplicate".
Dropped or rejected rows get a key derived from their id instead: they spread evenly
over partitions and are never matched.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from dataproc.base import DROP, ID, TEXT, Step, ensure_drop_column, live_mask

HASH = "_text_hash"


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class AddHashKey(Step):
    name = "exact_dedup"

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = ensure_drop_column(batch)
        live = live_mask(batch)
        texts, ids = batch[TEXT].tolist(), batch[ID].tolist()
        batch[HASH] = [text_hash(t) if ok else "~" + text_hash(i) for t, i, ok in zip(texts, ids, live)]
        return batch


class KeepMinId(Step):
    """Runs on whole hash partitions (batch_size=None after the shuffle)."""

    name = "exact_dedup"
    reason = "exact_duplicate"

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = ensure_drop_column(batch)
        live = np.flatnonzero(live_mask(batch))
        if len(live) > 1:
            keys = pd.DataFrame({"h": batch[HASH].to_numpy()[live], "id": batch[ID].to_numpy()[live], "pos": live})
            keys = keys.sort_values(["h", "id"], kind="mergesort")
            dup_rows = keys["pos"].to_numpy()[keys.duplicated("h", keep="first").to_numpy()]
            if len(dup_rows):
                batch.iloc[dup_rows, batch.columns.get_loc(DROP)] = f"{self.name}:{self.reason}"
                batch.iloc[dup_rows, batch.columns.get_loc(TEXT)] = ""
        # A shuffled partition's rows arrive in whatever order the map tasks finished:
        # sorted by id, the stage writes identical files on every run.
        batch = batch.sort_values(ID, kind="mergesort", ignore_index=True)
        return batch.drop(columns=[HASH])
