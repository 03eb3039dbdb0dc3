"""Tests of stage 2 (dataproc/tokenizer.py, dataproc/tokenizer_report.py).

A small clean corpus is built in a temp folder from real zh/en lines of ../shared/data
and trained once per module (vocab 3000). Error-path and sampling tests use generated
text and run without the shared data.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from dataproc.tokenizer import (
    ENDOFTEXT, IM_END, IM_START, MIN_VOCAB_SIZE, TokenizerConfig, corpus_files, keep_rate, load_tokenizer_dir,
    sample_texts, tokenizer_info, train_tokenizer, write_hf_files,
)
from dataproc.tokenizer_report import compression_report, format_report_table
from zerolm.config import build_config
from zerolm.errors import UserError
from zerolm.stage import StageDir

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
VOCAB = 3000


def make_clean_dir(path: Path, rows: list[tuple[str, str]], n_files: int = 2, schema_text: bool = True) -> Path:
    """A finished `data` stage output: data/part-*.parquet {id, text, source} + _SUCCESS."""
    stage = StageDir(path, "data", "test-hash")
    stage.begin()
    (path / "data").mkdir()
    per_file = max(1, -(-len(rows) // n_files))
    for k in range(n_files):
        chunk = rows[k * per_file:(k + 1) * per_file]
        cols = {"id": [f"{k}-{i}" for i in range(len(chunk))],
                ("text" if schema_text else "body"): [t for t, _ in chunk], "source": [s for _, s in chunk]}
        pq.write_table(pa.table(cols), path / "data" / f"part-{k:05d}.parquet", row_group_size=500)
    counts = {}
    for _, s in rows:
        counts[s] = counts.get(s, 0) + 1
    (path / "stats.json").write_text(json.dumps({"sources": {s: {"rows_out": n} for s, n in counts.items()}}))
    stage.finish(rows_out=len(rows))
    return path


def synthetic_rows(n: int) -> list[tuple[str, str]]:
    return [(f"document number {i} says hello world 第{i}号文件说你好世界。", "gen") for i in range(n)]


def cfg_for(tmp: Path, clean: Path, **kw) -> TokenizerConfig:
    return TokenizerConfig(input=str(clean), output=str(tmp / "tok"), **kw)


def lines(path: Path, limit: int | None = None) -> list[str]:
    out = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    return out[:limit] if limit else out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cfg, report) of one training on ~2 MB of real zh + en text."""
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    tmp = tmp_path_factory.mktemp("tok")
    rows = [(t, "peoples_daily") for t in lines(DATA / "pretrain/zh/peoples_daily_199801.txt", 2500)]
    rows += [(t, "reviews") for t in lines(DATA / "pretrain/zh/reviews_pos.txt", 2000)]
    rows += [(r["output"], "alpaca_zh") for r in json.loads((DATA / "sft/alpaca_zh_demo.json").read_text())[:400]]
    rows += [(t, "wiki_en") for t in lines(DATA / "pretrain/en/wiki_demo.txt", 10)]
    rows += [(json.loads(l)["text"], "c4") for l in lines(DATA / "pretrain/en/c4_demo.jsonl", 300)]
    clean = make_clean_dir(tmp / "clean", rows, n_files=3)
    cfg = cfg_for(tmp, clean, vocab_size=VOCAB, report_docs_per_source=500)
    return cfg, train_tokenizer(cfg, echo=lambda *a: None)


@pytest.fixture(scope="module")
def hf_tok(trained):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(trained[0].output)


# ------------------------------------------------------------------ vocabulary and files

def test_vocab_size_and_special_ids_are_last(trained):
    cfg, report = trained
    info = tokenizer_info(cfg.output)
    assert info.vocab_size == VOCAB == report["vocab_size"]
    assert [info.eos_id, info.im_start_id, info.im_end_id] == [VOCAB - 3, VOCAB - 2, VOCAB - 1]
    assert report["special_tokens"] == {ENDOFTEXT: VOCAB - 3, IM_START: VOCAB - 2, IM_END: VOCAB - 1}
    assert info.stop_ids == (VOCAB - 1, VOCAB - 3) and info.token_dtype == "uint16"
    tok = load_tokenizer_dir(cfg.output)
    # Specials are single tokens; role names are plain text.
    assert tok.encode(f"{IM_START}user\nhi{IM_END}").ids[0] == VOCAB - 2
    assert tok.encode("system").ids[0] < VOCAB - 3
    # For packing corpus text, a literal special-token string stays plain text.
    plain = load_tokenizer_dir(cfg.output, encode_special_tokens=True)
    assert max(plain.encode(f"a {IM_END} b").ids) < VOCAB - 3
    # Every byte has a token: nothing is unknown.
    assert tok.decode(tok.encode("\x00\x7f\u00e9\U0001F600").ids) == "\x00\x7f\u00e9\U0001F600"


def test_autotokenizer_loads_with_sensible_specials(trained, hf_tok):
    assert len(hf_tok) == VOCAB
    assert hf_tok.eos_token == ENDOFTEXT and hf_tok.pad_token == ENDOFTEXT and hf_tok.bos_token is None
    assert hf_tok.model_max_length == 2048
    assert hf_tok.decode([VOCAB - 3, VOCAB - 2, VOCAB - 1], skip_special_tokens=True) == ""
    assert hf_tok("你好 world", add_special_tokens=True)["input_ids"] == load_tokenizer_dir(
        trained[0].output).encode("你好 world").ids  # no bos/eos added silently


def test_chat_template_renders(hf_tok):
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False)
    assert text == f"{IM_START}user\n你好{IM_END}\n{IM_START}assistant\nHi!{IM_END}\n"
    text = hf_tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text == f"{IM_START}user\n你好{IM_END}\n{IM_START}assistant\n"
    ids = hf_tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == VOCAB - 2 and ids.count(VOCAB - 1) == 1


def test_default_system_prompt(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((Path(trained[0].output) / "tokenizer.json").read_bytes())
    prompt = '你是一个乐于助人的助手。 "quoted" \\ 😀'
    write_hf_files(out, model_max_length=512, default_system_prompt=prompt)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    user = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(user, tokenize=False) == (
        f"{IM_START}system\n{prompt}{IM_END}\n{IM_START}user\nhi{IM_END}\n")
    own = [{"role": "system", "content": "S"}] + user
    assert tok.apply_chat_template(own, tokenize=False) == f"{IM_START}system\nS{IM_END}\n{IM_START}user\nhi{IM_END}\n"


# ------------------------------------------------------------------ round trip

def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@functools.lru_cache(maxsize=1)
def all_shared_texts() -> tuple[str, ...]:
    """Every line (with its line ending) of every text file under shared/data and every
    string inside its JSON / JSONL / parquet files, each distinct text once."""
    out = ["", " ", "  two leading", "tail  ", "\t\r\n\r\n", "e\u0301 \u200d\ufeff", f"a{ENDOFTEXT}b{IM_END}"]
    for path in sorted(DATA.rglob("*")):
        if path.suffix in (".txt", ".jsonl", ".json", ".csv", ".md"):
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":  # its lines are mostly \u escapes: take the strings
                out += list(_strings(json.loads(text)))
            elif path.suffix == ".jsonl":
                out += [s for line in text.splitlines() if line.strip() for s in _strings(json.loads(line))]
            else:
                out += text.splitlines(keepends=True)
        elif path.suffix == ".parquet":
            out += [s for col in pq.read_table(path).columns for s in col.to_pylist() if isinstance(s, str)]
    return tuple(dict.fromkeys(out))


@needs_data
@pytest.mark.slow
def test_round_trip_tokenizers(trained):
    tok = load_tokenizer_dir(trained[0].output)
    texts = list(all_shared_texts())
    assert len(texts) > 100_000
    decoded = tok.decode_batch([e.ids for e in tok.encode_batch(texts)], skip_special_tokens=False)
    bad = [t for t, d in zip(texts, decoded) if t != d]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[0]!r}"


@needs_data
@pytest.mark.slow
def test_round_trip_autotokenizer(hf_tok):
    texts = list(all_shared_texts())
    ids = hf_tok(texts, add_special_tokens=False)["input_ids"]
    decoded = hf_tok.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    bad = [t for t, d in zip(texts, decoded) if t != d]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[0]!r}"


# ------------------------------------------------------------------ report and stage protocol

def test_report(trained):
    cfg, report = trained
    on_disk = json.loads((Path(cfg.output) / "report.json").read_text(encoding="utf-8"))
    assert on_disk == report
    src = report["sources"]
    assert {s: r["language"] for s, r in src.items()} == {
        "peoples_daily": "zh", "reviews": "zh", "alpaca_zh": "zh", "wiki_en": "en", "c4": "en"}
    assert src["c4"]["docs"] == 300 and src["peoples_daily"]["docs"] == 500
    zh, en = report["languages"]["zh"], report["languages"]["en"]
    assert zh["sources"] == 3 and en["sources"] == 2
    # Byte-level BPE: well over one byte per token for both; Chinese chars are denser.
    assert zh["bytes_per_token"] > 1.5 and en["bytes_per_token"] > 2.5
    assert zh["chars_per_token"] < en["chars_per_token"]
    assert report["training"]["docs"] > 5000 and report["training"]["seconds"] > 0
    table = format_report_table(report)
    assert "ALL zh" in table and "ALL en" in table and "peoples_daily" in table
    # Standalone use on a tokenizer.json file gives the same numbers.
    again = compression_report(Path(cfg.output) / "tokenizer.json", cfg.input, 500)
    assert again["sources"] == report["sources"]


def test_rerun_is_noop_and_other_config_is_refused(trained):
    cfg, report = trained
    success = Path(cfg.output) / "_SUCCESS"
    before = success.read_text()
    assert train_tokenizer(cfg, echo=lambda *a: None) == report
    assert success.read_text() == before
    with pytest.raises(UserError, match="overwrite"):
        train_tokenizer(cfg.model_copy(update={"min_frequency": 3}), echo=lambda *a: None)


def test_small_corpus_is_deterministic_and_capped(tmp_path):
    clean = make_clean_dir(tmp_path / "clean", synthetic_rows(400))
    a = train_tokenizer(cfg_for(tmp_path / "a", clean, vocab_size=400), echo=lambda *a: None)
    b = train_tokenizer(cfg_for(tmp_path / "b", clean, vocab_size=400), echo=lambda *a: None)
    assert a["sha256"] == b["sha256"] and a["vocab_size"] == 400
    capped = train_tokenizer(cfg_for(tmp_path / "c", clean, vocab_size=400, max_docs=50), echo=lambda *a: None)
    # The cap sets a keep rate (50/400, seeded), so the sample is ~50 docs spread over
    # the corpus, and never more than 50.
    assert 30 <= capped["training"]["docs"] <= 50 and capped["training"]["keep_rate"] == 0.125


def test_sample_spreads_over_all_files(tmp_path):
    rows = [(f"file-a doc {i} " + "x" * 80, "a") for i in range(1000)]
    rows += [(f"file-b doc {i} " + "y" * 80, "b") for i in range(1000)]
    clean = make_clean_dir(tmp_path / "clean", rows, n_files=2)
    cfg = cfg_for(tmp_path, clean, vocab_size=400, max_chars=40_000, batch_size=100)
    files, counts = corpus_files(clean), {}
    texts = [t for batch in sample_texts(files, cfg, keep_rate(files, cfg), counts) for t in batch]
    assert 20_000 < counts["chars"] <= 40_000 + 100 and counts["keep_rate"] < 1
    assert any(t.startswith("file-b") for t in texts)  # not just the first file


# ------------------------------------------------------------------ bad input

def test_output_inside_input_is_refused(tmp_path):
    clean = make_clean_dir(tmp_path / "clean", synthetic_rows(10))
    for out in (clean, clean / "tok"):
        with pytest.raises(UserError, match="must not be the clean corpus"):
            train_tokenizer(TokenizerConfig(input=str(clean), output=str(out)), overwrite=True)
    assert (clean / "data").is_dir()


def test_missing_or_unfinished_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer(cfg_for(tmp_path, tmp_path / "nope"))
    half = tmp_path / "half"
    StageDir(half, "data", "h").begin()
    with pytest.raises(UserError, match="_SUCCESS"):
        train_tokenizer(cfg_for(tmp_path, half))


def test_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="no rows"):
        train_tokenizer(cfg_for(tmp_path, make_clean_dir(tmp_path / "zero", [])))
    assert not (tmp_path / "tok").exists()
    blank = make_clean_dir(tmp_path / "blank", [("", "s"), ("   \n", "s")])
    with pytest.raises(UserError, match="no non-empty text"):
        train_tokenizer(cfg_for(tmp_path, blank))
    nofiles = tmp_path / "nofiles"
    StageDir(nofiles, "data", "h").begin()
    StageDir(nofiles, "data", "h").finish()
    with pytest.raises(UserError, match="no parquet files"):
        train_tokenizer(cfg_for(tmp_path, nofiles))


def test_parquet_without_text_column_names_the_file(tmp_path):
    clean = make_clean_dir(tmp_path / "clean", synthetic_rows(10), n_files=1, schema_text=False)
    with pytest.raises(UserError, match=r"part-00000\.parquet has no 'text' column"):
        train_tokenizer(cfg_for(tmp_path, clean))


def test_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="vocab_size must be at least"):
        build_config(TokenizerConfig, flags={"input": "x", "output": "y", "vocab_size": 256})
    with pytest.raises(ValidationError):
        TokenizerConfig(input="x", output="y", vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(UserError, match="unknown key"):
        build_config(TokenizerConfig, flags={"input": "x", "output": "y", "vocab": 1000})


def test_not_a_tokenizer_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        tokenizer_info(tmp_path)
