"""Near-duplicate groups of a list of texts held in one process: the same shingles,
MinHash signatures, LSH bands and exact-Jaccard verification as the distributed job
(dataproc/near_dedup/job.py), without Ray. For inputs that fit in memory and are
used where they are read: SFT prompts, preference prompts. And `verified_edges`: the
job's own step functions on one partition, for measurements without Ray.
"""

from __future__ import annotations

import numpy as np

from dataproc.near_dedup.config import MinHashConfig, NearDedupConfig, ShingleConfig
from dataproc.near_dedup.minhash import EMPTY, MinHasher, band_keys, optimal_bands
from dataproc.near_dedup.shingles import detect_kinds, shingle_batch
from dataproc.near_dedup.verify import exact_jaccard

SEED = 1
# Prompt dedup (train/sft.py: data.prompt_dedup, threshold 0.4) was set with, and
# documents, character 5-grams for Chinese and word 5-grams otherwise. It keeps them
# though the near-dedup defaults moved to 3-grams at 0.5 (issue 17): 3-grams at 0.4
# would join templated prompts ("Explain the concept of X" / "... of Y").
PROMPT_SHINGLES = ShingleConfig(char_ngram=5, word_ngram=5, jieba_ngram=3)


def near_duplicate_of(texts: list[str], threshold: float, *, num_perm: int = 128,
                      shingles: ShingleConfig | None = None) -> np.ndarray:
    """For each text, the index of the kept text it near-duplicates, or -1 for texts
    that are kept. Two texts are near-duplicates when the exact Jaccard of their
    shingle sets is >= threshold (candidates from LSH, datasketch's layout rule centred
    0.1 below the threshold so that verification, not banding, decides). Texts are
    taken in input order and one is dropped only for a near-copy that is kept: at low
    thresholds (0.4 for prompts) connected components would chain A ~ B ~ C and drop C
    for a text it does not resemble."""
    n = len(texts)
    out = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return out
    shingles = shingles or PROMPT_SHINGLES
    kinds = detect_kinds(texts, None, shingles)
    hashes, counts = shingle_batch(texts, kinds, shingles, SEED)
    sig = MinHasher(num_perm, SEED).signatures(hashes, counts)
    mh = MinHashConfig(num_perm=num_perm, threshold=threshold)
    bands, rows = optimal_bands(mh.lsh_threshold(), num_perm)
    keys = band_keys(sig, bands, rows, SEED)  # (n, bands)
    has = ~(sig == EMPTY).all(axis=1)  # texts without any shingle are never duplicates
    docs = np.repeat(np.arange(n), bands)[np.repeat(has, bands)]
    flat = keys[has].reshape(-1)
    order = np.lexsort((docs, flat))
    flat, docs = flat[order], docs[order]
    same = flat[1:] == flat[:-1]
    # star edges: every member of a bucket to the bucket's first (smallest) text
    first = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(len(flat)), 0))
    a, b = docs[first][1:][same], docs[1:][same]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0) if len(a) else np.zeros((0, 2), int)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if len(pairs):
        lo, hi = pairs[:, 0], pairs[:, 1]
        jac = exact_jaccard([texts[i] for i in lo], kinds[lo], [texts[i] for i in hi], kinds[hi], shingles, SEED)
        keep = jac >= threshold
        lo, hi = lo[keep], hi[keep]
    else:
        lo = hi = np.zeros(0, dtype=np.int64)
    for a, b in sorted(zip(lo.tolist(), hi.tolist())):  # every pair (x, a) with x < a comes first
        if out[a] < 0 and out[b] < 0:
            out[b] = a
    return out


def verified_edges(texts: list[str], cfg: NearDedupConfig,
                   sources: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The MinHash job's own batch functions (steps.py, verify.py) on one partition in
    this process: Signer -> Bander -> bucket stars -> requests + payload -> Attach ->
    Verify. The job runs the same functions over hash partitions, so it finds the same
    verified edges. Returns index arrays (a, b) of the edges (a before b in keep
    order) and {bands, rows, lsh_threshold, candidates: (k, 2) distinct candidate
    pairs}. Used by the quality benchmark and tests, where starting Ray for each of
    dozens of settings would cost more than the work."""
    import pandas as pd
    import pyarrow as pa

    from dataproc.near_dedup.job import band_layout  # job.py imports Ray lazily only
    from dataproc.near_dedup.steps import A, B, Bander, MinHashBuckets, Signer, node_to_id
    from dataproc.near_dedup.verify import EXACT, Attach, Verify, payload, requests

    if cfg.method != "minhash":
        raise ValueError("verified_edges runs the MinHash path only")
    ids = [f"{i:012d}" for i in range(len(texts))]  # node key order = index order
    cols = {"id": ids, "text": texts, **({"source": sources} if sources is not None else {})}
    signed = pa.Table.from_pandas(Signer(cfg)(pd.DataFrame(cols)), preserve_index=False)
    bands, rows = band_layout(cfg)
    star = MinHashBuckets()(Bander(cfg, bands, rows)(signed))
    with_text = cfg.minhash.verify in EXACT
    attached = Attach(with_text)(pa.concat_tables([requests(star), payload(with_text)(signed)]))
    edges = Verify(cfg)(attached)
    index = lambda col: np.array(node_to_id(col.to_pylist(), cfg.keep), dtype=np.int64)  # noqa: E731
    a, b = index(edges[A]), index(edges[B])
    cand = np.unique(np.stack([index(star[A]), index(star[B])], axis=1).reshape(-1, 2), axis=0)
    return a, b, {"bands": bands, "rows": rows, "lsh_threshold": cfg.minhash.lsh_threshold(), "candidates": cand}
