"""Base classes for dataproc steps. Nothing here imports ray.

A step is a small class whose `__call__(batch) -> batch` takes a whole pandas
DataFrame, so it drops into `Dataset.map_batches(step, batch_format="pandas")` and is
unit-testable on a plain DataFrame.

Rows are never removed inside the pipeline: a row that a filter drops, or that could
not be read, keeps flowing with its reason in the `DROP` column (and its text emptied
to save memory). The writer at the end counts rows by reason, which is what makes the
accounting invariant  rows_in = rows_out + sum(dropped) + rejected  hold by
construction, also across retried Ray tasks.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import numpy as np
import pandas as pd

# Column names shared by every step.
ID, TEXT, SOURCE = "id", "text", "source"
# DROP is None for a live row, else "<step>:<reason>" naming the step that dropped it
# and why (e.g. "length:too_short"); rows the reader could not parse carry
# "read:<reason>" and are the rejects.
DROP = "_drop"
READ_STEP = "read"
REJECT_PREFIX = READ_STEP + ":"
CHARS_IN = "_chars_in"  # characters of the document as read, before normalization
# Reject details (set only on reject rows): where the row came from and its raw bytes.
R_FILE, R_LINE, R_OFFSET, R_DETAIL, R_RAW = "_file", "_line", "_offset", "_detail", "_raw"
INTERNAL_COLUMNS = (DROP, CHARS_IN, R_FILE, R_LINE, R_OFFSET, R_DETAIL, R_RAW)


def split_drop(value: str) -> tuple[str, str]:
    """"length:too_short" -> ("length", "too_short")."""
    step, _, reason = value.partition(":")
    return (step, reason) if reason else ("unknown", step)


def live_mask(batch: pd.DataFrame) -> np.ndarray:
    """True for rows no step has dropped or rejected yet."""
    if DROP not in batch.columns:
        return np.ones(len(batch), dtype=bool)
    return batch[DROP].isna().to_numpy()


def ensure_drop_column(batch: pd.DataFrame) -> pd.DataFrame:
    if DROP not in batch.columns:
        batch[DROP] = pd.Series([None] * len(batch), index=batch.index, dtype=object)
    return batch


class Step:
    """One vectorised transformation over whole batches."""

    name: ClassVar[str] = "step"

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:  # pragma: no cover - interface
        raise NotImplementedError


class Filter(Step):
    """A filter decides per document; the base class applies the decision.

    Subclasses implement `keep(texts) -> (mask, reasons)` where `mask` is a bool array
    (True = keep) and `reasons` is either one string (the filter's reason for every
    dropped row) or an array of strings aligned with `texts` (used where one filter has
    several reasons, e.g. too short vs too long). Only live rows are passed in. The
    base class marks dropped rows "<name>:<reason>", empties their text, and counts
    kept/dropped per reason in `self.counts` (handy in unit tests and single-process runs; in the Ray
    pipeline the DROP column carries the same information to the writer).
    """

    name: ClassVar[str] = "filter"

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def keep(self, texts: list[str]) -> tuple[np.ndarray, str | np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = ensure_drop_column(batch)
        live = live_mask(batch)
        if not live.any():
            return batch
        idx = np.flatnonzero(live)
        texts = batch[TEXT].iloc[idx].tolist()
        mask, reasons = self.keep(texts)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(texts),):
            raise ValueError(f"{type(self).__name__}.keep returned mask of shape {mask.shape} for {len(texts)} texts")
        dropped = idx[~mask]
        self.counts["kept"] += int(mask.sum())
        if len(dropped):
            if isinstance(reasons, str):
                why = np.full(len(dropped), reasons, dtype=object)
            else:
                why = np.asarray(reasons, dtype=object)[~mask]
            self.counts.update(why.tolist())
            col = batch.columns.get_loc(DROP)
            batch.iloc[dropped, col] = np.array([f"{self.name}:{w}" for w in why], dtype=object)
            batch.iloc[dropped, batch.columns.get_loc(TEXT)] = ""
        return batch
