"""A labelled near-duplicate set built from real text, and pair metrics.

Originals are real documents from ../shared/data/pretrain (People's Daily paragraphs
for Chinese, C4 pages and Wikipedia passages for English). Each "family" is one
original plus copies made with the edits a crawl really produces: character/word
insertions, deletions and substitutions, sentence reordering, boilerplate added,
truncation, and mixtures of these, at edit rates spread so that the copies' shingle
Jaccard to the original covers 0.3 .. 1.0. Further originals get no copy (unrelated
documents).

Ground truth is measured, not assumed: the Jaccard of every within-family pair is
computed exactly on Python sets of shingle STRINGS (char 5-grams for Chinese,
lowercased word 5-grams for English), an implementation independent of the hashed
shingles in shingles.py.

Pair metrics over clusters (two documents are predicted duplicates when they end up
in the same cluster):
  positive pair   same family and true Jaccard >= threshold (0.8)
  gray pair       same family and true Jaccard in [gray_low, threshold): related text
                  that clustering may legitimately join through a third copy (A~B,
                  B~C, A!~C); it is neither a hit nor a false alarm
  everything else negative.
precision = TP / (TP + FP over non-gray predicted pairs), recall = TP / positives.
"""

from __future__ import annotations

import json
import random
import re
from itertools import combinations
from pathlib import Path

import numpy as np

THRESHOLD, GRAY_LOW = 0.8, 0.6
ZH_BOILER = ["（本报记者 供稿）责任编辑：王明 本文来源：人民日报 转载请注明出处。", "点击关注我们，获取更多新闻资讯！",
             "【版权声明】本网站所刊登的各种新闻、信息和各种专题专栏资料，均为本网站版权所有。"]
EN_BOILER = ["Subscribe to our newsletter for the latest updates. Click here to unsubscribe.",
             "Copyright (c) All rights reserved. Terms of use | Privacy policy | Cookie settings",
             "Share this article: Facebook Twitter Email. Related posts you might like:"]


def load_originals(data: Path, n_zh: int, n_en: int, seed: int = 0) -> list[tuple[str, str]]:
    """(lang, text) of real documents, exact duplicates removed, shuffled with seed."""
    pre = Path(data) / "pretrain"
    zh = [ln.strip() for ln in (pre / "zh" / "peoples_daily_199801.txt").open(encoding="utf-8")]
    zh = [t for t in dict.fromkeys(zh) if len(t) >= 200]
    en = [json.loads(ln)["text"] for ln in (pre / "en" / "c4_demo.jsonl").open(encoding="utf-8")]
    for article in (pre / "en" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines():
        # Whole articles are 10-80k characters; cut them into passages of ~1500.
        sents = re.split(r"(?<=[.!?])\s*", article)
        buf = ""
        for s in sents:
            buf += s + " "
            if len(buf) >= 1500:
                en.append(buf.strip())
                buf = ""
    en = [t for t in dict.fromkeys(en) if len(t.split()) >= 60]
    rng = random.Random(seed)
    rng.shuffle(zh)
    rng.shuffle(en)
    if len(zh) < n_zh or len(en) < n_en:
        raise ValueError(f"asked for {n_zh} zh / {n_en} en originals, have {len(zh)} / {len(en)}")
    return [("zh", t) for t in zh[:n_zh]] + [("en", t) for t in en[:n_en]]


def units(text: str, lang: str) -> list[str]:
    return list(text) if lang == "zh" else text.split()


def join(u: list[str], lang: str) -> str:
    return "".join(u) if lang == "zh" else " ".join(u)


def shingle_set(text: str, lang: str, n: int = 5) -> set:
    u = units(text.lower(), lang)
    return {tuple(u[i:i + n]) for i in range(max(1, len(u) - n + 1))} if u else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _sentences(text: str, lang: str) -> list[str]:
    pat = r"(?<=[。！？；])" if lang == "zh" else r"(?<=[.!?])\s+"
    return [s for s in re.split(pat, text) if s]


def edit(text: str, lang: str, op: str, rate: float, donor: str, rng: random.Random) -> str:
    """One realistic edit of `text` at `rate` (share of units touched). `donor` is
    another real document, the source of inserted / substituted units."""
    u, d = units(text, lang), units(donor, lang) or ["x"]
    if op in ("insert", "delete", "substitute"):
        k = max(1, int(rate * len(u)))
        pos = sorted(rng.sample(range(len(u)), min(k, len(u))), reverse=True)
        for p in pos:  # back to front: earlier positions stay valid
            if op == "insert":
                u.insert(p, rng.choice(d))
            elif op == "delete":
                del u[p]
            else:
                u[p] = rng.choice(d)
        return join(u, lang)
    if op == "reorder":
        s = _sentences(text, lang)
        k = max(2, int(rate * len(s)))
        idx = rng.sample(range(len(s)), min(k, len(s)))
        moved = [s[i] for i in idx]
        rng.shuffle(moved)
        for i, m in zip(idx, moved):
            s[i] = m
        return ("" if lang == "zh" else " ").join(s)
    if op == "boilerplate":
        boiler = rng.choice(ZH_BOILER if lang == "zh" else EN_BOILER)
        reps = max(1, int(rate * len(text) / len(boiler)))
        extra = ("" if lang == "zh" else " ").join([boiler] * reps)
        return text + ("" if lang == "zh" else " ") + extra if rng.random() < 0.5 else extra + " " + text
    if op == "truncate":
        return join(u[: max(1, int(len(u) * (1 - rate)))], lang)
    raise ValueError(op)


OPS = ("insert", "delete", "substitute", "reorder", "boilerplate", "truncate")
# Edit rates per copy: small ones give near-duplicates (J 0.8..1), the large ones
# related-but-different text (J 0.3..0.8), so both sides of the threshold are covered.
RATES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.15, 0.3)


def build(data: Path, n_families: int = 150, n_unrelated: int = 150, copies: int = 3,
          seed: int = 0) -> tuple[list[dict], dict]:
    """Documents [{id, text, source, family, lang}] and the truth
    {"pairs": {(id_a, id_b): jaccard} within families (id_a < id_b)}."""
    n = n_families + n_unrelated
    originals = load_originals(data, n // 2, n - n // 2, seed)
    rng = random.Random(seed + 1)
    rng.shuffle(originals)
    docs, pairs = [], {}
    by_lang: dict[str, list[str]] = {}
    for lang, text in originals:
        by_lang.setdefault(lang, []).append(text)
    for f, (lang, text) in enumerate(originals):
        fam = [{"id": f"d{f:05d}-0", "text": text, "source": lang, "family": f, "lang": lang}]
        if f < n_families:
            for c in range(1, copies + 1):
                # Inserted words come from another document of the same language (an
                # English "word" of Chinese text would be a whole paragraph).
                donor = rng.choice(by_lang[lang])
                ops = rng.sample(OPS, rng.choice((1, 1, 2)))  # a third of copies get two edits
                t = text
                for op in ops:
                    t = edit(t, lang, op, rng.choice(RATES), donor, rng)
                fam.append({"id": f"d{f:05d}-{c}", "text": t, "source": lang, "family": f, "lang": lang})
        sets = [shingle_set(d["text"], lang) for d in fam]
        for i, j in combinations(range(len(fam)), 2):
            pairs[(fam[i]["id"], fam[j]["id"])] = jaccard(sets[i], sets[j])
        docs += fam
    return docs, {"pairs": pairs}


def cluster_pairs(clusters: dict[str, str]) -> set[tuple[str, str]]:
    """{doc id: cluster label} -> every (a, b), a < b, sharing a label."""
    groups: dict[str, list[str]] = {}
    for d, c in clusters.items():
        groups.setdefault(c, []).append(d)
    return {(a, b) for g in groups.values() for a, b in combinations(sorted(g), 2)}


def pair_metrics(predicted: set[tuple[str, str]], truth: dict, threshold: float = THRESHOLD,
                 gray_low: float = GRAY_LOW) -> dict:
    tp = fp = gray = 0
    for p in predicted:
        j = truth["pairs"].get(p)
        if j is not None and j >= threshold:
            tp += 1
        elif j is not None and j >= gray_low:
            gray += 1
        else:
            fp += 1
    pos = sum(1 for j in truth["pairs"].values() if j >= threshold)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / pos if pos else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "tp": tp, "fp": fp, "gray": gray, "positives": pos, "predicted_pairs": len(predicted)}


def union_find_labels(n: int, edges) -> np.ndarray:
    """Plain union-find (path halving): label = smallest index in the component."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def datasketch_clusters(docs: list[dict], threshold: float = THRESHOLD, num_perm: int = 128) -> dict[str, str]:
    """What a user would write with datasketch: MinHash of the same shingles (char
    5-grams zh, word 5-grams en), MinHashLSH at the threshold, query every document,
    union-find over the hits."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([("\x1f".join(s)).encode("utf-8") for s in shingle_set(d["text"], d["lang"])])
        lsh.insert(i, m)
        sigs.append(m)
    edges = [(i, j) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i]
    labels = union_find_labels(len(docs), edges)
    return {d["id"]: str(labels[i]) for i, d in enumerate(docs)}


def audit_clusters(docs: list[dict], audit) -> dict[str, str]:
    """Rows (removed_id, kept_id) of DIR/duplicates/ -> {doc id: cluster label}; a
    document in no row is its own cluster."""
    labels = {d["id"]: d["id"] for d in docs}
    for removed, kept in zip(audit["removed_id"], audit["kept_id"]):
        labels[removed] = kept
    return labels


def write_jsonl(docs: list[dict], path: Path) -> Path:
    with Path(path).open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"], "source": d["source"]}, ensure_ascii=False) + "\n")
    return Path(path)
