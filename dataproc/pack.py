"""Stage 3, `zerolm pack`: clean corpus + tokenizer -> token shards a trainer memory-maps.

    read_parquet(CLEAN_DIR/data)               (columns id, text, source)
      -> tokenize_batch (the tokenizer loads once per worker process; batch encode;
                   <|endoftext|> after every document; split by a hash of the id)
      -> ShardSink: {train,val}/<source>/ raw little-endian tokens + doc offsets
      -> driver: shards renamed shard_NNNNN.bin in a fixed order, manifest.json, _SUCCESS

The train/val split is per source and depends only on the document id, so every
domain has its own validation set that training never sees, whatever the layout of
the cluster. Execution order is preserved, so the shards are identical run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from dataproc.mixture import MixtureStage, validate_mixture
from dataproc.quality.buckets import base_source
from dataproc.quality.curriculum import CurriculumConfig, apply_curriculum, extra_columns, plan_curriculum
from dataproc.tokenizer import TokenizerInfo, copy_tokenizer_files, load_tokenizer_dir, tokenizer_info
from zerolm.config import StrictModel, config_hash
from zerolm.errors import UserError
from zerolm.lineage import describe
from zerolm.stage import StageDir, require_done, write_json_atomic

STAGE = "pack"
MANIFEST = "manifest.json"
TOKENIZER_COPY = "tokenizer"  # TOKENS_DIR/tokenizer/: the tokenizer the shards were made with
SPLITS = ("train", "val")


class PackConfig(StrictModel):
    input: str = ""  # CLEAN_DIR
    tokenizer: str = ""  # TOK_DIR
    output: str = ""  # TOKENS_DIR
    val_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    # Every source gets at least this many validation documents (when it has more
    # than one document): a 30-article source at 2% would otherwise have none.
    min_val_docs: int = Field(default=1, ge=0)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    write_doc_index: bool = True  # shard_NNNNN.idx: int64 start offset of every document
    mixture: list[MixtureStage] = Field(default_factory=list)
    # Order / bucket documents by a score for curriculum schedules (dataproc/quality/curriculum.py).
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    address: Optional[str] = None  # Ray cluster; None = $RAY_ADDRESS or local Ray
    num_workers: int = Field(default=0, ge=0)  # concurrent tokenize tasks; 0 = as many as CPUs
    batch_size: int = Field(default=512, ge=1)


def id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def split_of(doc_id: str, val_fraction: float, forced_val: frozenset = frozenset()) -> str:
    """Deterministic train/val assignment from the document id alone."""
    if doc_id in forced_val:
        return "val"
    return "val" if id_hash(doc_id) < val_fraction * 2.0**64 else "train"


SMALL_SOURCE_DOCS = 10_000  # below this, a source's ids are scanned to pick its val docs


def small_source_val_ids(files: list[str], docs_by_source: dict[str, int], cfg: "PackConfig") -> frozenset:
    """For sources too small for the hash split to give min_val_docs, choose exactly
    that many: the documents with the smallest id hashes (still a function of the ids
    alone). Only sources under SMALL_SOURCE_DOCS are scanned, so memory stays bounded."""
    need = {}
    for source, docs in docs_by_source.items():
        want = min(cfg.min_val_docs, docs - 1)
        if 0 < want and docs < SMALL_SOURCE_DOCS and docs * cfg.val_fraction < 4 * want:
            need[source] = want
    if not need:
        return frozenset()
    hashes: dict[str, list] = {s: [] for s in need}
    for f in files:
        table = pq.read_table(f, columns=["id", "source"])
        for doc_id, source in zip(table.column("id").to_pylist(), table.column("source").to_pylist()):
            if source in hashes:
                hashes[source].append((id_hash(doc_id), doc_id))
    chosen = set()
    for source, items in hashes.items():
        chosen.update(doc_id for _, doc_id in sorted(items)[: need[source]])
    return frozenset(chosen)


_TOKENIZERS: dict = {}  # per worker process: loaded once, reused by every task


def tokenize_batch(batch: pa.Table, tok_dir: str, sep_id: int, dtype: str, val_fraction: float,
                   forced_val: frozenset = frozenset()) -> pa.Table:
    """map_batches function: encode a batch, append the separator, assign the split.

    A plain function (not an actor) so reading, tokenizing and writing fuse into one
    task with no data movement between them; the tokenizer is cached per process."""
    tok = _TOKENIZERS.get(tok_dir)
    if tok is None:
        # One tokenizer thread per task: parallelism comes from Ray's tasks. Set in the
        # worker, not as the task's runtime_env: a runtime_env makes Ray start dedicated
        # worker processes for each pack job and end them after it (seconds of CPU for
        # imports each, measured by bench/pack_throughput.py).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Corpus text is encoded with special tokens as plain text: a web page that
        # contains "<|im_end|>" must not inject a control token.
        tok = _TOKENIZERS[tok_dir] = load_tokenizer_dir(tok_dir, encode_special_tokens=True)
    ids = batch.column("id").to_pylist()
    texts = batch.column("text").to_pylist()
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    blobs, counts = [], []
    for enc in encodings:
        arr = np.empty(len(enc.ids) + 1, dtype=np_dtype)
        arr[:-1] = enc.ids
        arr[-1] = sep_id
        blobs.append(arr.tobytes())
        counts.append(len(arr))
    return pa.table({
        "split": [split_of(i, val_fraction, forced_val) for i in ids],
        "source": batch.column("source"),
        "tokens": pa.array(blobs, type=pa.binary()),
        "n_tokens": pa.array(counts, type=pa.int64()),
        "n_bytes": pa.array([len(t.encode("utf-8")) for t in texts], type=pa.int64()),
    })


def write_shards(table: pa.Table, out_dir: Path, tag: str, write_index: bool) -> list[dict]:
    """Append each (split, source) group of one block to its own temporary shard."""
    out = []
    splits = table.column("split").to_pylist()
    sources = table.column("source").to_pylist()
    groups: dict = {}
    for i, key in enumerate(zip(splits, sources)):
        groups.setdefault(key, []).append(i)
    blobs = table.column("tokens").to_pylist()
    counts = table.column("n_tokens").to_numpy()
    nbytes = table.column("n_bytes").to_numpy()
    for (split, source), rows in sorted(groups.items()):
        folder = out_dir / split / source
        folder.mkdir(parents=True, exist_ok=True)
        name = f"tmp-{tag}"
        with open(folder / f"{name}.bin.tmp", "wb") as f:
            for r in rows:
                f.write(blobs[r])
        (folder / f"{name}.bin.tmp").replace(folder / f"{name}.bin")
        if write_index:
            starts = np.concatenate([[0], np.cumsum(counts[rows])[:-1]]).astype(np.int64)
            starts.tofile(folder / f"{name}.idx")
        out.append({"split": split, "source": source, "tmp": name, "tokens": int(counts[rows].sum()),
                    "docs": len(rows), "bytes": int(nbytes[rows].sum())})
    return out


def _make_sink(out_dir: Path, write_index: bool):
    from ray.data import Datasink

    class ShardSink(Datasink):
        def __init__(self):
            self.shards: list[dict] = []

        def write(self, blocks, ctx) -> list:
            entries = []
            for k, block in enumerate(blocks):
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
                if table.num_rows:
                    entries += write_shards(table, out_dir, f"{ctx.task_idx:06d}-{k:04d}", write_index)
            return entries

        def on_write_complete(self, write_result) -> None:
            self.shards = [e for task in write_result.write_returns for e in task]

    return ShardSink()


def finalize_shards(out_dir: Path, entries: list[dict]) -> dict:
    """Rename temporary shards to shard_NNNNN in a fixed order; build the per split /
    source / shard counts of the manifest."""
    splits: dict = {s: {} for s in SPLITS}
    for e in sorted(entries, key=lambda e: (e["split"], e["source"], e["tmp"])):
        src = splits[e["split"]].setdefault(e["source"], {"tokens": 0, "docs": 0, "bytes": 0, "shards": []})
        folder = out_dir / e["split"] / e["source"]
        name = f"shard_{len(src['shards']):05d}"
        (folder / f"{e['tmp']}.bin").replace(folder / f"{name}.bin")
        if (folder / f"{e['tmp']}.idx").exists():
            (folder / f"{e['tmp']}.idx").replace(folder / f"{name}.idx")
        src["shards"].append({"file": f"{e['split']}/{e['source']}/{name}.bin", "tokens": e["tokens"],
                              "docs": e["docs"], "bytes": e["bytes"]})
        for key in ("tokens", "docs", "bytes"):
            src[key] += e[key]
    return splits


def pack_blocks(files: list[str], block_bytes: int = 8 << 20) -> int:
    """Blocks to tokenize the clean corpus in. Ray Data reads these parquet files into
    as few blocks as fit its target block size (4 demo files came back as 1) and runs
    the tokenizer on no more tasks than blocks ("the operator only received 1
    input(s)"), so a corpus of more than `block_bytes` on disk is repartitioned into
    blocks of about that size (order kept); a smaller one stays as read (1: no
    repartition, no pile of tiny shards). The count depends on the data alone, not on
    the cluster, so the shards are the same on a laptop and on a cluster."""
    return max(1, sum(os.path.getsize(f) for f in files) // block_bytes)


def _clean_files(clean_dir: Path) -> list[str]:
    files = sorted(str(p) for p in (clean_dir / "data").glob("*.parquet"))
    if not files:
        raise UserError(f"{clean_dir} holds no documents (data/*.parquet is empty)")
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in ("id", "text", "source") if c not in names]
        if missing:
            raise UserError(f"{f} lacks column(s) {missing}; is {clean_dir} a zerolm clean corpus?")
    return files


def check_pack_accounting(files: list[str], source_stats: dict, splits: dict) -> None:
    """Every clean document becomes exactly one packed document. Three counts made in
    different places must agree: the rows the clean parquet files hold (their footers),
    the clean stage's rows_out per source, and the documents the shard writers wrote per
    source (train + val; curriculum buckets count toward their base source). A step that
    lost or duplicated documents fails the stage here, before _SUCCESS."""
    in_files = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    packed: dict[str, int] = {}
    for split in SPLITS:
        for source, s in splits[split].items():
            packed[base_source(source)] = packed.get(base_source(source), 0) + s["docs"]
    clean = {s: v.get("rows_out", 0) for s, v in source_stats.items() if v.get("rows_out", 0)}
    problems = []
    if sum(packed.values()) != in_files:
        problems.append(f"the clean files hold {in_files} documents, {sum(packed.values())} were packed")
    problems += [f"{s}: clean stats say {clean.get(s, 0)}, packed {packed.get(s, 0)}"
                 for s in sorted(set(clean) | set(packed)) if clean.get(s, 0) != packed.get(s, 0)]
    if problems:
        raise RuntimeError("pack accounting broken (documents in != documents packed): " + "; ".join(problems))


def pick_dtype(requested: str, info: TokenizerInfo) -> str:
    dtype = info.token_dtype if requested == "auto" else requested
    if dtype == "uint16" and info.vocab_size > 1 << 16:
        raise UserError(f"vocabulary of {info.vocab_size} tokens does not fit uint16; use dtype uint32 or auto")
    return dtype


def run_pack(cfg: PackConfig, *, overwrite: bool = False, echo=print) -> dict:
    for key in ("input", "tokenizer", "output"):
        if not getattr(cfg, key):
            raise UserError(f"pack needs --{key}")
    clean_dir, out_dir = Path(cfg.input), Path(cfg.output)
    clean_info = require_done(clean_dir, "data")
    info = tokenizer_info(cfg.tokenizer)
    dtype = pick_dtype(cfg.dtype, info)
    files = _clean_files(clean_dir)
    source_stats = json.loads((clean_dir / "stats.json").read_text(encoding="utf-8")).get("sources", {})
    validate_mixture(cfg.mixture, set(source_stats))
    curriculum = plan_curriculum(cfg.curriculum, files, cfg.mixture)
    chash = config_hash({"config": cfg.model_dump(mode="json", exclude={"address", "num_workers", "batch_size"}),
                         "tokenizer": info.sha256, "clean": clean_info.get("config_hash")})
    stage = StageDir(out_dir, STAGE, chash)
    if not stage.begin(overwrite=overwrite):
        echo(f"{out_dir} is already packed with this config, tokenizer and corpus (nothing to do)")
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))

    from zerolm.ray_env import ensure_ray

    ensure_ray(cfg.address)
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # identical shards on every run
    started = time.time()
    ds = ray.data.read_parquet(files, columns=["id", "text", "source"] + extra_columns(cfg.curriculum))
    if (blocks := pack_blocks(files)) > 1:
        ds = ds.repartition(blocks)
    forced_val = small_source_val_ids(files, {s: v["rows_out"] for s, v in source_stats.items()}, cfg)
    ds = apply_curriculum(ds, curriculum, cfg.val_fraction, forced_val)
    ds = ds.map_batches(
        tokenize_batch, fn_args=(str(Path(cfg.tokenizer).resolve()), info.eos_id, dtype, cfg.val_fraction,
                                 forced_val),
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=1,
        concurrency=cfg.num_workers or None,
    )
    sink = _make_sink(out_dir.resolve(), cfg.write_doc_index)
    ds.write_datasink(sink)
    splits = finalize_shards(out_dir, sink.shards)
    check_pack_accounting(files, source_stats, splits)
    # A copy of the tokenizer makes TOKENS_DIR self-contained: it can move to another
    # machine (a GPU node) and still decode, count bytes per token, and export.
    copy_tokenizer_files(cfg.tokenizer, out_dir / TOKENIZER_COPY)
    elapsed = time.time() - started
    manifest = {
        "format": "zerolm-tokens-v1", "dtype": dtype, "byte_order": "little",
        "vocab_size": info.vocab_size, "separator_id": info.eos_id, "separator": "<|endoftext|>",
        "tokenizer": {"path": str(Path(cfg.tokenizer).resolve()), "sha256": info.sha256, "copy": TOKENIZER_COPY},
        "clean": {"path": str(clean_dir.resolve()), "config_hash": clean_info.get("config_hash")},
        "val_fraction": cfg.val_fraction, "min_val_docs": cfg.min_val_docs, "doc_index": cfg.write_doc_index,
        "splits": splits, "mixture": [m.model_dump() for m in cfg.mixture], "curriculum": curriculum,
        "totals": {s: {"tokens": sum(v["tokens"] for v in splits[s].values()),
                       "docs": sum(v["docs"] for v in splits[s].values())} for s in SPLITS},
        "elapsed_s": round(elapsed, 2),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    stage.finish(tokens=manifest["totals"], inputs=[describe("clean", clean_dir), describe("tokenizer", cfg.tokenizer)])
    echo(format_manifest(manifest))
    return manifest


def format_manifest(manifest: dict) -> str:
    lines = [f"{'split':<6}{'source':<28}{'docs':>9}{'tokens':>12}{'bytes/token':>12}{'shards':>7}"]
    for split in SPLITS:
        for source, s in sorted(manifest["splits"][split].items()):
            bpt = s["bytes"] / max(1, s["tokens"] - s["docs"])  # separators carry no text
            lines.append(f"{split:<6}{source[:27]:<28}{s['docs']:>9}{s['tokens']:>12}{bpt:>12.2f}{len(s['shards']):>7}")
    empty = sorted({base_source(s) for s in manifest["splits"]["train"]} - set(manifest["splits"]["val"]))
    if empty:
        lines.append(f"note: no validation documents for {', '.join(sorted(empty))} (too few documents)")
    t = manifest["totals"]
    lines.append(f"total: train {t['train']['tokens']} tokens, val {t['val']['tokens']} tokens, dtype {manifest['dtype']}")
    return "\n".join(lines)
