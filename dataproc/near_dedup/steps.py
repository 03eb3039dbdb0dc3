"""The batch functions of near-dedup (no ray here; job.py wires them into Ray Data).

Row flow and the columns each function adds (NODE, SIG, ... below):
  Signer          corpus batch (pandas) -> same rows + NODE, SIG, KIND
  Bander          (NODE, SIG) -> (BKEY, NODE[, FP]): one row per band / block
  MinHashBuckets  one hash partition of BKEY -> star edges (A, B)
  SimHashBuckets  one hash partition of BKEY -> exact-Hamming-checked star edges (A, B, SIG_A, SIG_B)
  then verify.py (MinHash candidates), components (graph.py via job.py), and
  Mark            one hash partition of NODE (corpus rows + removal markers) -> corpus rows

NODE is the document's "keep order" key: the kept document of a cluster is the one
with the smallest NODE (see node_keys). Rows that cannot be candidates (dropped,
rejected, no shingles) get NODE = "\\0" + id: unique, spread evenly by the hash
shuffle, and never equal to a real node.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dataproc.base import DROP, ID, SOURCE, TEXT, Step, ensure_drop_column, live_mask
from dataproc.filters.textstats import chunk_slices
from dataproc.near_dedup import graph
from dataproc.near_dedup.config import NearDedupConfig
from dataproc.near_dedup.minhash import MinHasher, band_keys
from dataproc.near_dedup.shingles import detect_kinds, shingle_batch
from dataproc.near_dedup.simhash import block_keys, fingerprints

STEP, REASON = "near_dedup", "near_duplicate"
NODE, SIG, KIND, BKEY, FP = "_nd_node", "_nd_sig", "_nd_kind", "_nd_bkey", "_nd_fp"
A, B, SIG_A, SIG_B = "_nd_a", "_nd_b", "_nd_sig_a", "_nd_sig_b"
HELPER_COLUMNS = (NODE, SIG, KIND)
_RANK_WIDTH = {"longest": 12, "quality": 16}


def node_keys(ids: list[str], lengths: np.ndarray, scores: np.ndarray | None, keep: str) -> list[str]:
    """Sortable key per document; smaller = kept first, ties by id.
    first_id: the id; longest: zero-padded (10^12 - length) + "|" + id; quality:
    16 hex digits of the order-preserving bits of -score (NaN last) + "|" + id."""
    if keep == "first_id":
        return list(ids)
    if keep == "longest":
        ranks = [f"{10**12 - int(n):012d}" for n in lengths]
    else:
        neg = -np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
        bits = neg.view(np.uint64)
        # IEEE-754 -> unsigned order: flip all bits of negatives, the sign bit of the rest.
        key = np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))
        ranks = [f"{int(k):016x}" for k in key]
    return [f"{r}|{i}" for r, i in zip(ranks, ids)]


def node_to_id(nodes, keep: str) -> list[str]:
    width = _RANK_WIDTH.get(keep)
    return list(nodes) if width is None else [n[width + 1:] for n in nodes]


def binary_matrix(arr, dtype) -> np.ndarray:
    """A (chunked) binary column whose values all have the same length -> (n, w) array,
    without a Python object per row."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=dtype)
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    return data.view(dtype).reshape(len(arr), -1)


class Signer(Step):
    """Adds NODE, SIG (MinHash signature or SimHash fingerprint, bytes; None when the
    row is not a candidate) and KIND (shingle kind code, -1 if none) to every row."""

    name = STEP

    def __init__(self, cfg: NearDedupConfig, idf: np.ndarray | None = None):
        self.cfg, self.idf = cfg, idf
        self.minhasher = MinHasher(cfg.minhash.num_perm, cfg.seed) if cfg.method == "minhash" else None

    def sign(self, texts: list[str], kinds: np.ndarray) -> tuple[list, np.ndarray]:
        """(signature bytes or None per text, has-shingles mask)."""
        sigs, has = [], []
        for part in chunk_slices(texts):  # bounded memory for batches of huge documents
            h, c = shingle_batch(texts[part], kinds[part], self.cfg.shingles, self.cfg.seed)
            if self.minhasher is not None:
                rows = self.minhasher.signatures(h, c)  # (n, P) uint32
            else:
                w = None if self.idf is None else self.idf[(h % np.uint64(len(self.idf))).astype(np.int64)]
                rows = fingerprints(h, c, w)[:, None]  # (n, 1) uint64
            sigs += [r.tobytes() if k else None for r, k in zip(rows, c > 0)]
            has.append(c > 0)
        return sigs, np.concatenate(has) if has else np.zeros(0, bool)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = ensure_drop_column(batch)
        n = len(batch)
        ids = batch[ID].astype(str).tolist()
        nodes = np.array(["\0" + i for i in ids], dtype=object)
        sigs = np.full(n, None, dtype=object)
        kinds = np.full(n, -1, dtype=np.int8)
        idx = np.flatnonzero(live_mask(batch))
        if len(idx):
            texts = batch[TEXT].iloc[idx].astype(str).tolist()
            sources = batch[SOURCE].iloc[idx].astype(str).tolist() if SOURCE in batch else None
            k = detect_kinds(texts, sources, self.cfg.shingles)
            s, has = self.sign(texts, k)
            sel = idx[has]
            sigs[sel] = [x for x in s if x is not None]
            kinds[sel] = k[has]
            q = self.cfg.quality_column
            scores = batch[q].iloc[sel].to_numpy() if self.cfg.keep == "quality" and q in batch else None
            keep = "first_id" if self.cfg.keep == "quality" and scores is None else self.cfg.keep
            lengths = np.fromiter((len(texts[i]) for i in np.flatnonzero(has)), dtype=np.int64)
            nodes[sel] = node_keys([ids[i] for i in sel], lengths, scores, keep)
        batch[NODE], batch[SIG], batch[KIND] = nodes, sigs, kinds
        return batch


class Bander:
    """(NODE, SIG) rows -> one (BKEY, NODE) row per band (MinHash) or block (SimHash,
    which also carries FP for the exact Hamming check in the bucket)."""

    def __init__(self, cfg: NearDedupConfig, bands: int = 0, rows: int = 0):
        self.cfg, self.bands, self.rows = cfg, bands, rows

    def __call__(self, table: pa.Table) -> pa.Table:
        table = table.filter(pc.is_valid(table[SIG]))
        nodes = table[NODE].to_numpy(zero_copy_only=False)
        if self.cfg.method == "minhash":
            sig = binary_matrix(table[SIG], np.uint32)
            keys = band_keys(sig, self.bands, self.rows, self.cfg.seed) if len(sig) else np.zeros((0, self.bands), np.uint64)
            return pa.table({BKEY: pa.array(keys.reshape(-1), pa.uint64()),
                             NODE: pa.array(np.repeat(nodes, keys.shape[1]), pa.string())})
        fp = binary_matrix(table[SIG], np.uint64).reshape(-1)
        keys = block_keys(fp, self.cfg.simhash.max_distance, self.cfg.seed)  # (n, k+1)
        per = keys.shape[1]
        return pa.table({BKEY: pa.array(keys.reshape(-1), pa.uint64()),
                         NODE: pa.array(np.repeat(nodes, per), pa.string()),
                         FP: pa.array(np.repeat(fp, per), pa.uint64())})


def edges_table(a, b, sig_a=None, sig_b=None) -> pa.Table:
    cols = {A: pa.array(a, pa.string()), B: pa.array(b, pa.string())}
    if sig_a is not None:
        cols[SIG_A], cols[SIG_B] = pa.array(sig_a, pa.binary()), pa.array(sig_b, pa.binary())
    return pa.table(cols)


class MinHashBuckets:
    """One hash partition of band rows -> star edges (bucket minimum, member)."""

    def __call__(self, table: pa.Table) -> pa.Table:
        a, b = graph.bucket_stars(table[BKEY].to_numpy(), table[NODE].to_numpy(zero_copy_only=False))
        return edges_table(a, b)


class SimHashBuckets:
    """One hash partition of block rows -> edges whose fingerprints are within
    max_distance bits (checked exactly), reduced to stars around the smallest node of
    each local component so a big cluster yields n - 1 edges, not n^2 / 2."""

    def __init__(self, max_distance: int):
        self.k = max_distance

    def __call__(self, table: pa.Table) -> pa.Table:
        nodes = table[NODE].to_numpy(zero_copy_only=False)
        if len(nodes) < 2:
            return edges_table([], [], [], [])
        (codes,), uniq = graph.factorize(nodes)
        bkey, fp = table[BKEY].to_numpy(), table[FP].to_numpy()
        order = np.lexsort((codes, fp, bkey))
        bkey, fp, codes = bkey[order], fp[order], codes[order]
        # Equal fingerprints in a bucket are distance 0: link them to the first one and
        # compare only distinct fingerprints pairwise (a bucket of 10k copies stays cheap).
        first = graph.group_starts(bkey) | graph.group_starts(fp)
        rep = np.maximum.accumulate(np.where(first, np.arange(len(fp)), 0))
        i, j = graph.close_pairs(bkey[first], fp[first], self.k)
        firsts = np.flatnonzero(first)
        a = np.concatenate((codes[rep[~first]], codes[firsts[i]]))
        b = np.concatenate((codes[~first], codes[firsts[j]]))
        if len(a) == 0:
            return edges_table([], [], [], [])
        label = graph.components(a, b, len(uniq))
        leaf = np.flatnonzero(label != np.arange(len(uniq)))
        fp_of = np.zeros(len(uniq), dtype=np.uint64)
        fp_of[codes] = fp
        payload = [x.tobytes() for x in fp_of]
        return edges_table(uniq[label[leaf]], uniq[leaf], [payload[x] for x in label[leaf]], [payload[x] for x in leaf])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a block to `schema` (missing columns become nulls). Ray's hash shuffle
    concatenates the blocks of a partition as they are, so every block entering one
    (a union of corpus rows and markers, of requests and payloads) must have exactly
    the same schema; pandas-made blocks differ, e.g. an all-None column is type null."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table[field.name]
            cols.append(col if col.type == field.type else col.cast(field.type))
        else:
            cols.append(pa.nulls(len(table), field.type))
    return pa.Table.from_arrays(cols, schema=schema)


class Conform:
    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def __call__(self, table: pa.Table) -> pa.Table:
        return conform(table, self.schema)


class Markers:
    """Final (kept A, removed B) edges -> one removal marker per removed node, in the
    corpus schema: NODE set, ID null (a corpus row always has an id)."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def __call__(self, table: pa.Table) -> pa.Table:
        return conform(pa.table({NODE: table[B]}), self.schema)


class Mark:
    """One hash partition of NODE holding corpus rows and removal markers -> the
    corpus rows, removed ones marked "near_dedup:near_duplicate" with text emptied.
    Arrow in and out: pandas would turn the nullable integer columns into floats."""

    def __call__(self, table: pa.Table) -> pa.Table:
        is_marker = pc.is_null(table[ID])
        if pc.any(is_marker).as_py():
            removed = pc.is_in(table[NODE], value_set=pc.unique(table.filter(is_marker)[NODE]))
            keep = pc.invert(is_marker)
            table, removed = table.filter(keep), pc.fill_null(removed.filter(keep), False)
            if pc.any(removed).as_py():
                drop = pc.if_else(removed, pa.scalar(f"{STEP}:{REASON}"), table[DROP].cast(pa.string()))
                text = pc.if_else(removed, pa.scalar(""), table[TEXT])
                table = table.set_column(table.column_names.index(DROP), DROP, drop)
                table = table.set_column(table.column_names.index(TEXT), TEXT, text)
        table = table.take(pc.sort_indices(table, sort_keys=[(ID, "ascending")]))  # same files on every run
        return table.drop_columns([c for c in HELPER_COLUMNS if c in table.column_names])
