"""Config models of the cleaning job (`zerolm data run`).

One model per component; `DataRunConfig` composes them. The filter section is built
from the filter registry (dataproc/filters/__init__.py), so adding a filter never
touches this file.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from dataproc.encodings import candidates
from dataproc.filters import FiltersConfig
from dataproc.near_dedup.config import NearDedupConfig
from dataproc.normalize import NormalizeConfig
from dataproc.quality.steps import LangidConfig, PerplexityConfig, QualityConfig
from zerolm.config import StrictModel


class InputSpec(StrictModel):
    """One input: a path, a glob (`**` recurses) or a pyarrow-filesystem URI."""

    path: str
    # Source name stored in the `source` column; default: each file's stem.
    source: Optional[str] = None
    format: Literal["auto", "jsonl", "json", "parquet", "txt"] = "auto"
    # Field (jsonl/json/parquet) holding the text; a list joins several fields with
    # `join_with` (e.g. prompt + response).
    text_field: Union[str, list[str]] = "text"
    join_with: str = "\n"
    # txt: one document per line, per blank-line separated paragraph, per file, or per
    # record between separator lines (e.g. "%" in fortune files).
    txt_mode: Literal["line", "paragraph", "file", "separator"] = "line"
    record_separator: str = "%"

    @field_validator("source")
    @classmethod
    def _source_name(cls, value):
        if value is not None and (not value or "/" in value or value in {".", ".."}):
            raise ValueError("source must be a non-empty name without '/'")
        return value


class ReadConfig(StrictModel):
    inputs: list[InputSpec] = Field(default_factory=list)
    # Line-based files larger than this are split into byte ranges read in parallel.
    chunk_bytes: int = Field(default=32 << 20, ge=1 << 16)
    # A single record (line / JSON value / paragraph) larger than this is rejected
    # before parsing, so one pathological document cannot exhaust a worker's memory.
    max_record_bytes: int = Field(default=8 << 20, ge=1024)
    # How many raw bytes of a rejected record are kept in rejects/ for inspection.
    reject_raw_bytes: int = Field(default=4096, ge=0)
    # Text encoding of jsonl/json/txt files, chosen per file from its head: "utf-8",
    # "auto" (= [utf-8, gb18030, cp1252]) or a list tried in order. A byte-order mark
    # always wins (UTF-16/32 files with one are text). stats.json reports the choices.
    encoding: Union[str, list[str]] = "utf-8"

    @field_validator("encoding")
    @classmethod
    def _known_encodings(cls, value):
        candidates(value)  # unknown codec names fail at config time, not on a worker
        return value


class ExactDedupConfig(StrictModel):
    enabled: bool = True
    # Which copy survives among identical normalized texts: the smallest id is
    # deterministic whatever the block layout.
    keep: Literal["min_id"] = "min_id"
    # Hash partitions of the shuffle; 0 = twice the cluster's CPUs.
    num_partitions: int = Field(default=0, ge=0)


class OutlierConfig(StrictModel):
    """The seed's outlier rule: drop docs whose statistic lies outside mean ± k·σ,
    with mean and σ computed over the corpus in a first pass."""

    enabled: bool = True
    k: float = Field(default=4.0, gt=0)
    stats: list[Literal["log_length", "symbol_ratio", "digit_ratio", "mean_line_length", "cjk_ratio"]] = Field(
        default_factory=lambda: ["log_length", "symbol_ratio"]
    )
    # Mean and σ per source (sources differ: tweets vs books) or over the whole corpus.
    per_source: bool = True
    # Sources with fewer live docs than this are not judged (σ would be noise).
    min_docs: int = Field(default=50, ge=2)


class RayConfig(StrictModel):
    # Ray cluster address; None = $RAY_ADDRESS if set, else a local Ray instance.
    address: Optional[str] = None
    # CPUs for a local Ray instance; None = all of this machine's.
    num_cpus: Optional[int] = Field(default=None, ge=1)
    # Rows per batch handed to each step.
    batch_size: int = Field(default=1024, ge=1)


class DataRunConfig(StrictModel):
    output: str = ""
    read: ReadConfig = Field(default_factory=ReadConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    exact_dedup: ExactDedupConfig = Field(default_factory=ExactDedupConfig)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    # MinHash (default) / SimHash near-duplicate removal after exact dedup (dataproc/near_dedup/).
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    # Model-based steps (dataproc/quality/): off unless a model file is given.
    langid: LangidConfig = Field(default_factory=LangidConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    # Parquet rows per output file (roughly; one file per write task at least).
    rows_per_file: int = Field(default=200_000, ge=1)
