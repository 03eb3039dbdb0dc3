"""`zerolm pack`: shards decode back to the clean corpus, the split is per source and
deterministic, the manifest is right, reruns are no-ops, bad input is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from dataproc.pack import PackConfig, run_pack, split_of
from dataproc.tokenizer import SPECIAL_TOKENS, load_tokenizer_dir, tokenizer_info
from zerolm.errors import UserError
from zerolm.stage import StageDir


def clean_docs(clean_dir):
    tables = [pq.read_table(f) for f in sorted((clean_dir / "data").glob("*.parquet"))]
    return pa.concat_tables(tables).to_pandas()


def test_manifest_and_shards_decode_to_the_corpus(tokens_dir, clean_corpus, tokenizer_dir):
    m = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))
    info = tokenizer_info(tokenizer_dir)
    assert m["dtype"] == "uint16" and m["vocab_size"] == info.vocab_size == 2048
    assert m["separator_id"] == info.eos_id and m["tokenizer"]["sha256"] == info.sha256
    docs = clean_docs(clean_corpus)
    assert m["totals"]["train"]["docs"] + m["totals"]["val"]["docs"] == len(docs)
    tok = load_tokenizer_dir(tokenizer_dir)
    for split in ("train", "val"):
        assert set(m["splits"][split]) == set(docs["source"])  # every source has a val set
        for source, entry in m["splits"][split].items():
            tokens = np.concatenate([np.fromfile(tokens_dir / s["file"], dtype="<u2") for s in entry["shards"]])
            assert len(tokens) == entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
            assert tokens[-1] == m["separator_id"] and (tokens == m["separator_id"]).sum() == entry["docs"]
            for s in entry["shards"]:  # doc index: starts of documents
                starts = np.fromfile(tokens_dir / s["file"].replace(".bin", ".idx"), dtype=np.int64)
                shard = np.fromfile(tokens_dir / s["file"], dtype="<u2")
                assert len(starts) == s["docs"] and starts[0] == 0
                assert all(shard[i - 1] == m["separator_id"] for i in starts[1:])
            if source in ("c4", "news"):  # big enough for the plain hash split
                cut = np.flatnonzero(tokens == m["separator_id"])
                decoded = [tok.decode(seg.tolist(), skip_special_tokens=True) for seg in np.split(tokens, cut + 1)[:-1]]
                want = docs[docs["source"] == source]
                want = want[[split_of(i, m["val_fraction"]) == split for i in want["id"]]]
                assert Counter(decoded) == Counter(want["text"])


def test_small_source_gets_min_val_docs(tokens_dir, clean_corpus):
    m = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))
    docs = clean_docs(clean_corpus)
    n_wiki = int((docs["source"] == "wiki").sum())
    assert n_wiki < 50 and m["splits"]["val"]["wiki"]["docs"] >= 1
    assert m["splits"]["train"]["wiki"]["docs"] == n_wiki - m["splits"]["val"]["wiki"]["docs"]


def test_split_is_hash_of_id_and_near_the_fraction(clean_corpus):
    docs = clean_docs(clean_corpus)
    pd_ids = docs[docs["source"] == "peoples_daily"]["id"]
    frac = np.mean([split_of(i, 0.05) == "val" for i in pd_ids])
    assert 0.04 < frac < 0.06
    assert [split_of(i, 0.05) for i in pd_ids[:50]] == [split_of(i, 0.05) for i in pd_ids[:50]]


def test_rerun_is_noop_and_output_is_deterministic(tokens_dir, clean_corpus, tokenizer_dir, tmp_path):
    cfg = PackConfig(input=str(clean_corpus), tokenizer=str(tokenizer_dir), output=str(tokens_dir), val_fraction=0.05)
    before = (tokens_dir / "_SUCCESS").stat().st_mtime_ns
    run_pack(cfg, echo=lambda *_: None)
    assert (tokens_dir / "_SUCCESS").stat().st_mtime_ns == before
    again = tmp_path / "again"
    run_pack(cfg.model_copy(update={"output": str(again)}), echo=lambda *_: None)
    for f in sorted(tokens_dir.glob("*/*/*.bin")):
        assert f.read_bytes() == (again / f.relative_to(tokens_dir)).read_bytes()


def test_mixture_is_validated_and_recorded(clean_corpus, tokenizer_dir, tmp_path):
    base = dict(input=str(clean_corpus), tokenizer=str(tokenizer_dir))
    with pytest.raises(UserError, match="unknown source"):
        run_pack(PackConfig(**base, output=str(tmp_path / "a"),
                            mixture=[{"name": "general", "weights": {"nosuch": 1.0}}]), echo=lambda *_: None)
    assert not (tmp_path / "a").exists()  # nothing written before validation passes
    stages = [{"name": "general", "fraction": 0.9}, {"name": "anneal", "fraction": 0.1,
                                                      "weights": {"wiki": 3, "cmrc": 3, "*": 1}}]
    m = run_pack(PackConfig(**base, output=str(tmp_path / "b"), mixture=stages), echo=lambda *_: None)
    assert [s["name"] for s in m["mixture"]] == ["general", "anneal"]


def fake_tokenizer_dir(path, vocab_size):
    vocab = {f"w{i}": i for i in range(vocab_size - len(SPECIAL_TOKENS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_bad_inputs_are_clear_errors(clean_corpus, tokenizer_dir, tmp_path):
    def pack(**kw):
        cfg = dict(input=str(clean_corpus), tokenizer=str(tokenizer_dir), output=str(tmp_path / "out"))
        return run_pack(PackConfig(**{**cfg, **kw}), echo=lambda *_: None)

    with pytest.raises(UserError, match="not a tokenizer"):
        pack(tokenizer=str(clean_corpus))
    big = fake_tokenizer_dir(tmp_path / "big", 70000)
    with pytest.raises(UserError, match="does not fit uint16"):
        pack(tokenizer=str(big), dtype="uint16")
    with pytest.raises(UserError, match="no _SUCCESS|does not exist"):
        pack(input=str(tmp_path / "nothing"))
    # a finished "data" output whose parquet lacks the text column
    bad = tmp_path / "bad_clean"
    stage = StageDir(bad, "data", "x")
    stage.begin()
    (bad / "data").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"], "source": ["s"]}), bad / "data" / "part.parquet")
    (bad / "stats.json").write_text('{"sources": {"s": {"rows_out": 1}}}', encoding="utf-8")
    stage.finish()
    with pytest.raises(UserError, match="lacks column"):
        pack(input=str(bad))
    (bad / "data" / "part.parquet").unlink()
    with pytest.raises(UserError, match="holds no documents"):
        pack(input=str(bad))


def test_cli_bad_tokenizer_exits_2(clean_corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "zerolm", "pack", "--input", str(clean_corpus), "--tokenizer",
                        str(tmp_path), "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a tokenizer folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_documents_lost_or_duplicated_fail_the_stage(clean_corpus, tokenizer_dir, tmp_path):
    """Pack checks its own accounting: a clean corpus whose files hold a document twice
    (a second copy of one parquet file), or whose stats disagree with its files, fails
    the stage with the counts, and leaves no _SUCCESS that would look done."""
    import shutil

    def pack(clean, out):
        return run_pack(PackConfig(input=str(clean), tokenizer=str(tokenizer_dir), output=str(out)),
                        echo=lambda *_: None)

    dup = tmp_path / "dup_clean"
    shutil.copytree(clean_corpus, dup)
    first = sorted((dup / "data").glob("*.parquet"))[0]
    shutil.copy(first, first.with_name("copy-" + first.name))
    with pytest.raises(RuntimeError, match="pack accounting broken.*packed"):
        pack(dup, tmp_path / "out1")
    assert not (tmp_path / "out1" / "_SUCCESS").exists()

    lying = tmp_path / "lying_clean"
    shutil.copytree(clean_corpus, lying)
    stats = json.loads((lying / "stats.json").read_text(encoding="utf-8"))
    source = sorted(stats["sources"])[0]
    stats["sources"][source]["rows_out"] += 1
    (lying / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    with pytest.raises(RuntimeError, match=f"{source}: clean stats say"):
        pack(lying, tmp_path / "out2")
    assert not (tmp_path / "out2" / "_SUCCESS").exists()


def test_a_corpus_cut_into_more_blocks_packs_the_same_tokens(tokens_dir, clean_corpus, tokenizer_dir, tmp_path,
                                                             monkeypatch):
    """A big clean file is read as several blocks (pack_blocks) so every worker gets to
    tokenize: more shards per source, but in order they hold exactly the tokens of the
    one-block pack, and the block count depends on the data's size alone."""
    import dataproc.pack as pack

    files = sorted(str(p) for p in (clean_corpus / "data").glob("*.parquet"))
    size = sum(p.stat().st_size for p in (clean_corpus / "data").glob("*.parquet"))
    assert pack.pack_blocks(files) == 1  # a small corpus: read as Ray reads it
    assert pack.pack_blocks(files, block_bytes=size // 5) == 5
    monkeypatch.setattr(pack, "pack_blocks", lambda files: 5)
    cfg = PackConfig(input=str(clean_corpus), tokenizer=str(tokenizer_dir), output=str(tmp_path / "cut"),
                     val_fraction=0.05)
    cut = run_pack(cfg, echo=lambda *_: None)
    one = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))
    assert max(len(e["shards"]) for e in cut["splits"]["train"].values()) > 1
    for split in ("train", "val"):
        assert set(cut["splits"][split]) == set(one["splits"][split])
        for source, entry in one["splits"][split].items():
            def stream(root, e):
                return np.concatenate([np.fromfile(root / s["file"], dtype="<u2") for s in e["shards"]])
            assert np.array_equal(stream(tmp_path / "cut", cut["splits"][split][source]), stream(tokens_dir, entry))
