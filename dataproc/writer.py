"""Writing a data stage's rows: kept documents to data/, rejects to rejects/, and the
counts that become stats.json.

`write_rows` is plain pyarrow (no ray) and names its files from the rows' ids
(`content_tag`), so a retried Ray task overwrites its own files instead of adding
duplicates, and two runs write the same files. `CorpusSink`
is the Ray Data adapter around it (imported from dataproc.pipeline only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dataproc.base import (
    DROP, ID, INTERNAL_COLUMNS, R_DETAIL, R_FILE, R_LINE, R_OFFSET, R_RAW, READ_STEP, SOURCE, TEXT, split_drop,
)
from dataproc.stats import count_batch, merge_counts, plain_counts

DATA_DIR, REJECTS_DIR = "data", "rejects"
REJECT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("offset", pa.int64()), ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.binary()),
])


def _to_pandas(block) -> pd.DataFrame:
    return block if isinstance(block, pd.DataFrame) else block.to_pandas()


def write_rows(batch: pd.DataFrame, out_dir: str | Path, tag: str, rows_per_file: int) -> dict:
    """Write one batch; return its partial counts (dataproc.stats.count_batch)."""
    out_dir = Path(out_dir)
    counts = count_batch(batch)
    drops = batch[DROP]
    kept = batch[drops.isna()]
    if len(kept):
        columns = [ID, TEXT, SOURCE] + [c for c in kept.columns if c not in (ID, TEXT, SOURCE) and c not in INTERNAL_COLUMNS]
        kept = kept[columns]
        for k, start in enumerate(range(0, len(kept), rows_per_file)):
            part = pa.Table.from_pandas(kept.iloc[start:start + rows_per_file], preserve_index=False)
            _write_parquet(part, out_dir / DATA_DIR / f"part-{tag}-{k:04d}.parquet")
    is_reject = drops.notna() & drops.fillna("").str.startswith(READ_STEP + ":")
    rejects = batch[is_reject]
    if len(rejects):
        table = pa.table({
            "id": _values(rejects[ID]), "source": _values(rejects[SOURCE]), "file": _values(rejects[R_FILE]),
            "line": _ints(rejects[R_LINE]), "offset": _ints(rejects[R_OFFSET]),
            "reason": [split_drop(d)[1] for d in rejects[DROP]],
            "detail": _values(rejects[R_DETAIL]), "raw": _values(rejects[R_RAW]),
        }, schema=REJECT_SCHEMA)
        _write_parquet(table, out_dir / REJECTS_DIR / f"part-{tag}.parquet")
    return counts


def _values(series: pd.Series) -> list:
    """Python values with None for every flavour of missing (None, NaN, pd.NA)."""
    return [None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else v for v in series.tolist()]


def _ints(series: pd.Series) -> list:
    return [None if pd.isna(v) else int(v) for v in series.tolist()]


def content_tag(batch: pd.DataFrame) -> str:
    """A file name part from the block's ids. Not the Ray task index: which task writes
    which partition after a shuffle differs between runs, and the files' names fix the
    order in which later stages (tokenizer, pack) read the corpus. The same block, as
    in a retried task, gets the same name and overwrites its own files."""
    digest = hashlib.blake2b(digest_size=8)
    for i in batch[ID].astype(str):
        digest.update(i.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def make_sink(out_dir: str, rows_per_file: int):
    """The Ray Data Datasink; built lazily so this module imports without ray."""
    from ray.data import Datasink

    class CorpusSink(Datasink):
        def __init__(self):
            self.out_dir, self.rows_per_file, self.parts = out_dir, rows_per_file, []

        def write(self, blocks, ctx) -> dict:
            frames = [_to_pandas(b) for b in blocks if b is not None]
            parts = [write_rows(f, self.out_dir, content_tag(f), self.rows_per_file) for f in frames]
            # One merged dict per task keeps what travels back to the driver small.
            return plain_counts(merge_counts(parts))

        def on_write_complete(self, write_result) -> None:
            self.parts = list(write_result.write_returns)

    return CorpusSink()
