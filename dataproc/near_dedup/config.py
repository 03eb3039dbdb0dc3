"""Config models of near-duplicate removal (`near_dedup:` in `zerolm data run`, and the
standalone `zerolm data near-dedup`).

Defaults are what the quality benchmarks measured (docs/benchmarks.md): MinHash, 128
permutations, candidates verified by exact Jaccard (bench/near_dedup.py), and, chosen by
F1 on real documents labelled by their edits (bench/near_dedup_quality.py, issue 17),
character 3-grams for Chinese, word 3-grams for other text, duplicates = shingle Jaccard
>= 0.5. The old 5-grams at 0.8 missed most copies with 5-10% of their words or
characters changed (F1 0.68 there against 0.99).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from zerolm.config import StrictModel

ShingleKind = Literal["char", "word", "jieba"]
# verify: containment centres the LSH candidates where an excerpt inside a document this
# many times its length would fall (see MinHashConfig.lsh_threshold). Measured on
# excerpts inside 2-5x longer documents: 0.94 of them become candidates at containment
# 0.8 (0.88 with 4), for 12% more candidate pairs.
CONTAINMENT_RATIO = 5.0


class ShingleConfig(StrictModel):
    # auto: char n-grams for documents whose letters are mostly CJK (cjk_ratio below),
    # word n-grams otherwise; or one kind for everything.
    kind: Literal["auto", "char", "word", "jieba"] = "auto"
    # Fixed kind per source name (e.g. {"zhihu": "jieba"}); wins over `kind`.
    per_source: dict[str, ShingleKind] = Field(default_factory=dict)
    # 3 and 3 at threshold 0.5: the best F1 of the measured grid (char 3/5/7, word
    # 2/3/5, 0.4-0.9) on both languages; word 2-grams tied but linked templated short
    # prompts ("Explain the concept of X") that 3-grams keep apart.
    char_ngram: int = Field(default=3, ge=1, le=32)
    word_ngram: int = Field(default=3, ge=1, le=32)
    # jieba words are ~1.5 characters long, so 2 of them span about a char 3-gram
    # (measured: 2 beats 3 by F1 0.97 to 0.89 at 0.5).
    jieba_ngram: int = Field(default=2, ge=1, le=32)
    # CJK characters / all letters at or above which `auto` picks char n-grams.
    cjk_ratio: float = Field(default=0.3, ge=0, le=1)
    lowercase: bool = True


class MinHashConfig(StrictModel):
    num_perm: int = Field(default=128, ge=8, le=1024)
    # Documents whose shingle Jaccard (or containment, see verify) is >= threshold
    # are near-duplicates.
    threshold: float = Field(default=0.5, gt=0, le=1)
    # Band layout; both None = chosen by minimising the weighted false positive and
    # false negative areas under the S-curve (as datasketch's MinHashLSH does) at
    # `candidate_threshold`.
    bands: Optional[int] = Field(default=None, ge=1)
    rows: Optional[int] = Field(default=None, ge=1)
    # Where the S-curve is centred. None: threshold - 0.1 when candidates are
    # verified (a false candidate then only costs one Jaccard check, a missed one is
    # lost for good), else the threshold itself; for verify: containment, where an
    # excerpt inside a document CONTAINMENT_RATIO times longer would fall.
    candidate_threshold: Optional[float] = Field(default=None, gt=0, le=1)
    # Weight of the false-positive area (the false-negative weight is 1 - this).
    fp_weight: float = Field(default=0.5, gt=0, lt=1)
    # Check each candidate pair: exact Jaccard of the shingle sets ("jaccard", needs
    # the texts of both documents), exact containment |A∩B| / min(|A|, |B|) of the
    # smaller set in the larger ("containment": also links an excerpt copied into a
    # longer document; `threshold` is then a containment, and `keep: longest` keeps
    # the longer text), the signature estimate of Jaccard ("signature"), or keep every
    # candidate ("none").
    verify: Literal["jaccard", "containment", "signature", "none"] = "jaccard"

    @model_validator(mode="after")
    def _bands_rows(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both minhash.bands and minhash.rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self

    def lsh_threshold(self) -> float:
        if self.candidate_threshold is not None:
            return self.candidate_threshold
        if self.verify == "containment":
            # LSH sees Jaccard: a text of containment c inside one r times longer has
            # J = c / (1 + r - c): 0.15 for c = 0.8, r = 5. Lower candidate_threshold
            # for longer hosts; candidates grow fast below ~0.1.
            return max(0.05, self.threshold / (1 + CONTAINMENT_RATIO - self.threshold))
        return max(0.05, self.threshold - 0.1) if self.verify != "none" else self.threshold


class SimHashConfig(StrictModel):
    # Near-duplicates differ in at most this many of the 64 fingerprint bits; the
    # fingerprint is cut into max_distance + 1 blocks, and two fingerprints within
    # that distance agree exactly on at least one block (pigeonhole).
    max_distance: int = Field(default=3, ge=0, le=15)
    # Shingle weights: occurrence counts, or counts times a corpus idf (one extra
    # pass over the corpus to count document frequencies in hashed buckets).
    weights: Literal["count", "tfidf"] = "count"
    idf_buckets: int = Field(default=1 << 20, ge=1 << 10, le=1 << 24)


class NearDedupConfig(StrictModel):
    method: Literal["minhash", "simhash", "off"] = "minhash"

    @field_validator("method", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML reads a bare `off` (in a config file or `--set near_dedup.method=off`) as False
        return "off" if value is False else value

    shingles: ShingleConfig = Field(default_factory=ShingleConfig)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    simhash: SimHashConfig = Field(default_factory=SimHashConfig)
    seed: int = Field(default=1, ge=0)
    # Which document of a cluster survives: the smallest id, the longest text, or the
    # highest value of `quality_column` (smallest id where that column is absent).
    # Ties always fall back to the smallest id, so the choice never depends on how
    # the rows happened to be partitioned.
    keep: Literal["first_id", "longest", "quality"] = "first_id"
    quality_column: str = "quality_score"
    # Hash partitions of each shuffle; 0 = twice the cluster's CPUs.
    num_partitions: int = Field(default=0, ge=0)
    # Connected components: at most this many large-star/small-star rounds (each
    # round at least halves the distance to the component minimum in practice).
    max_rounds: int = Field(default=32, ge=1)
    # Up to this many edges, components are computed in ONE worker task (a single
    # partition; memory ~200 bytes per edge plus signatures); above it the
    # distributed rounds run. 0 forces the distributed algorithm.
    local_components_max_edges: int = Field(default=2_000_000, ge=0)
    # Write DIR/duplicates/*.parquet (removed_id, kept_id, cluster_id, estimated_jaccard).
    write_duplicates: bool = True
