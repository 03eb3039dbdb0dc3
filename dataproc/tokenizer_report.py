"""How well a trained tokenizer compresses the clean corpus, per source and per language.

Chars per token is the number that matters for a zh/en model: a Chinese character costs
3 UTF-8 bytes, so a vocabulary that learned few Chinese merges spends more tokens (and
context, and compute) per Chinese sentence. The report shows zh and en side by side.
The documents are the first `max_docs_per_source` of each source in file order, which
are also training documents: this measures fit, not generalisation.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer

# Han ideographs (basic, extension A, compatibility, extensions B+) -- what makes a
# document Chinese. Kana/Hangul are not counted: they would not be "zh".
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
ZH_RATIO = 0.3  # a source is "zh" when Han characters are > 30% of its non-space characters


def cjk_ratio(texts: list[str]) -> float:
    han = sum(len(_HAN.findall(t)) for t in texts)
    visible = sum(len(t) - sum(c.isspace() for c in t) for t in texts)
    return han / visible if visible else 0.0


def _sample_by_source(clean_dir: Path, max_docs: int) -> dict[str, list[str]]:
    """The first `max_docs` non-empty texts of each source, streaming the parquet files
    in sorted order and stopping once every source listed in stats.json is full."""
    from dataproc.tokenizer import corpus_files, iter_text_batches

    files = corpus_files(clean_dir)
    try:
        stats = json.loads((clean_dir / "stats.json").read_text(encoding="utf-8"))
        expected = {s for s, v in stats.get("sources", {}).items() if v.get("rows_out", 1) > 0}
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        expected = set()
    by_source: dict[str, list[str]] = {}
    for path in files:
        has_source = "source" in pq.ParquetFile(path).schema_arrow.names
        columns = ("text", "source") if has_source else ("text",)
        for batch in iter_text_batches([path], 1000, columns):
            texts = batch.column(0).to_pylist()
            sources = batch.column(1).to_pylist() if has_source else ["all"] * len(texts)
            for text, source in zip(texts, sources):
                bucket = by_source.setdefault(str(source), [])
                if text and len(bucket) < max_docs:
                    bucket.append(text)
            full = all(len(v) >= max_docs for v in by_source.values())
            if expected and full and expected <= by_source.keys():
                return by_source
    return {s: v for s, v in by_source.items() if v}


def _rates(row: dict) -> dict:
    tokens = max(1, row["tokens"])
    row["bytes_per_token"] = round(row["bytes"] / tokens, 3)
    row["chars_per_token"] = round(row["chars"] / tokens, 3)
    return row


def compression_report(tokenizer_path: str | Path, clean_dir: str | Path, max_docs_per_source: int = 2000) -> dict:
    """Per source: docs, bytes, chars, tokens, bytes/token, chars/token, language;
    per language the same summed; plus the vocabulary size and special-token ids.
    `tokenizer_path` is a tokenizer folder or a tokenizer.json file."""
    from dataproc.tokenizer import SPECIAL_TOKENS, load_tokenizer_dir

    path = Path(tokenizer_path)
    tok = Tokenizer.from_file(str(path)) if path.is_file() else load_tokenizer_dir(path, _allow_unfinished=True)
    started = time.time()
    sources, languages = {}, {}
    for name, texts in sorted(_sample_by_source(Path(clean_dir), max_docs_per_source).items()):
        # add_special_tokens=False: measure the text alone, no separators.
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        lang = "zh" if cjk_ratio(texts) > ZH_RATIO else "en"
        row = {"docs": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
               "chars": sum(map(len, texts)), "tokens": tokens, "language": lang}
        sources[name] = _rates(row)
        agg = languages.setdefault(lang, {"sources": 0, "docs": 0, "bytes": 0, "chars": 0, "tokens": 0})
        agg["sources"] += 1
        for key in ("docs", "bytes", "chars", "tokens"):
            agg[key] += row[key]
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_tokens": {s: tok.token_to_id(s) for s in SPECIAL_TOKENS},
        "sources": sources,
        "languages": {lang: _rates(agg) for lang, agg in sorted(languages.items())},
        "report_seconds": round(time.time() - started, 2),
    }


def format_report_table(report: dict) -> str:
    """A short aligned table: one line per source, then one per language."""
    head = f"{'source':<24}{'lang':<6}{'docs':>8}{'MB':>8}{'tokens':>11}{'bytes/tok':>11}{'chars/tok':>11}"
    lines = [head]

    def line(name: str, lang: str, r: dict) -> str:
        return (f"{name[:23]:<24}{lang:<6}{r['docs']:>8}{r['bytes'] / 1e6:>8.2f}{r['tokens']:>11}"
                f"{r['bytes_per_token']:>11.2f}{r['chars_per_token']:>11.2f}")

    for name, r in report.get("sources", {}).items():
        lines.append(line(name, r["language"], r))
    lines.append("-" * len(head))
    for lang, r in report.get("languages", {}).items():
        lines.append(line(f"ALL {lang} ({r['sources']} sources)", lang, r))
    specials = ", ".join(f"{s}={i}" for s, i in report.get("special_tokens", {}).items())
    tail = f"vocab {report.get('vocab_size')}  specials: {specials}"
    if "training" in report:
        t = report["training"]
        tail += f"  trained on {t.get('docs')} docs / {t.get('chars', 0) / 1e6:.1f}M chars in {t.get('seconds')}s"
    lines.append(tail)
    return "\n".join(lines)
