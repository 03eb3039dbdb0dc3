"""Labelled near-duplicate sets built from real text, and pair metrics.

Two sets: build() (below; truth = exact shingle Jaccard, for checking that the job
finds the pairs of a given shingling) and build_by_edit() (truth = the edit that made
each copy, independent of any shingling, for choosing the shingles and threshold:
see EDIT_RULE and bench/near_dedup_quality.py).

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


def shingle_set(text: str, lang: str, n: int = 5) -> set:
    u = units(text.lower(), lang)
    return {tuple(u[i:i + n]) for i in range(max(1, len(u) - n + 1))} if u else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _pieces(text: str, lang: str) -> tuple[str, list[str]]:
    """(leading space, units that keep what follows them): characters for Chinese,
    each word with its trailing whitespace otherwise, so that an edit of a few words
    leaves every newline and double space of the original where it was (a character
    shingle would otherwise see a whitespace change the edit did not make)."""
    if lang == "zh":
        return "", list(text)
    body = text.lstrip()
    return text[: len(text) - len(body)], re.findall(r"\S+\s*", body)


def _sentences(text: str, lang: str) -> tuple[list[str], list[str]]:
    """Sentences and the separator after each ("" for Chinese and at the end)."""
    if lang == "zh":
        sents = [s for s in re.split(r"(?<=[。！？；])", text) if s]
        return sents, [""] * len(sents)
    parts = re.split(r"(?<=[.!?])(\s+)", text)
    sents, seps = parts[0::2], parts[1::2] + [""]
    if len(sents) > 1 and not sents[-1]:  # text ended with ". ": that space trails the last sentence
        sents.pop()
        seps.pop()
    return sents, seps


def edit(text: str, lang: str, op: str, rate: float, donor: str, rng: random.Random) -> str:
    """One realistic edit of `text` at `rate` (share of units touched). `donor` is
    another real document, the source of inserted / substituted units. Whitespace
    between untouched words is kept as it was."""
    lead, u = _pieces(text, lang)
    d = units(donor, lang) or ["x"]
    sep = "" if lang == "zh" else " "
    if op in ("insert", "delete", "substitute"):
        k = max(1, int(rate * len(u)))
        pos = sorted(rng.sample(range(len(u)), min(k, len(u))), reverse=True)
        for p in pos:  # back to front: earlier positions stay valid
            if op == "insert":
                u.insert(p, rng.choice(d) + sep)
            elif op == "delete":
                gone = u.pop(p)
                if p and "\n" in gone[len(gone.rstrip()):]:  # a line's last word: keep the line break
                    u[p - 1] = u[p - 1].rstrip() + gone[len(gone.rstrip()):]
            else:
                u[p] = rng.choice(d) + u[p][len(u[p].rstrip()):]  # the new word, the old spacing
        return lead + "".join(u)
    if op == "reorder":
        s, seps = _sentences(text, lang)
        k = max(2, int(rate * len(s)))
        idx = rng.sample(range(len(s)), min(k, len(s)))
        moved = [s[i] for i in idx]
        rng.shuffle(moved)
        for i, m in zip(idx, moved):
            s[i] = m
        return "".join(a + b for a, b in zip(s, seps))
    if op == "boilerplate":
        boiler = rng.choice(ZH_BOILER if lang == "zh" else EN_BOILER)
        reps = max(1, int(rate * len(text) / len(boiler)))
        extra = sep.join([boiler] * reps)
        return text + sep + extra if rng.random() < 0.5 else extra + " " + text
    if op == "truncate":
        kept = lead + "".join(u[: max(1, int(len(u) * (1 - rate)))])
        return kept if lang == "zh" else kept.rstrip()
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


# ---- The edit-labelled set (issue 17) ------------------------------------------
# build()'s truth is a shingle Jaccard, so it cannot choose the shingles. Here a copy's
# label follows from the edit that made it, whatever any shingle says.
# (op, rate): rate is the share of the original's units (words for English,
# characters for Chinese) touched; for truncate the share cut off the end; for embed
# the length of the host document in multiples of the original's.
EDIT_VARIANTS = tuple((op, r) for op in ("substitute", "insert", "delete")
                      for r in (0.02, 0.05, 0.1, 0.2, 0.3))
EDIT_VARIANTS += (
    ("reorder", 0.2), ("reorder", 0.5), ("boilerplate", 0.05), ("boilerplate", 0.15),
    ("truncate", 0.1), ("truncate", 0.2), ("truncate", 0.4), ("truncate", 0.6),
    ("embed", 2), ("embed", 3), ("embed", 5))
POS, GRAY, NEG, EMBEDDED = "pos", "gray", "neg", "embedded"
EDIT_RULE = ("substitute/insert/delete: <= 10% of the words (en) or characters (zh) positive, 20% gray, 30% "
             "negative; reorder (sentences moved, none changed): positive; boilerplate (a site line added at the "
             "start or end): positive while it adds <= 15% of the original's length, else gray; truncate: >= 80% "
             "kept positive, 60% gray, 40% negative; embed (the original inside other real text 2/3/5x its "
             "length): its own category, counted in no precision/recall, reported as the share linked")


def edit_label(op: str, rate: float, added: float = 0.0) -> str:
    """The labelling rule above; `added` = characters a boilerplate edit added / the
    original's characters."""
    if op in ("substitute", "insert", "delete"):
        return POS if rate <= 0.1 else GRAY if rate < 0.3 else NEG
    if op == "reorder":
        return POS
    if op == "boilerplate":
        return POS if added <= 0.15 else GRAY
    if op == "truncate":
        return POS if rate <= 0.2 else GRAY if rate < 0.5 else NEG
    if op == "embed":
        return EMBEDDED
    raise ValueError(op)


def _embed(text: str, lang: str, ratio: float, filler, rng: random.Random) -> str:
    """`text` at a random place inside fresh real text (from the `filler` iterator,
    never reused: two hosts share nothing but what they embed) of ratio x its length."""
    need, take = int((ratio - 1) * len(text)), ""
    while len(take) < need:
        try:
            take += next(filler) + ("" if lang == "zh" else "\n")
        except StopIteration:
            raise ValueError("not enough filler documents for the embed copies: use fewer families") from None
    take = take[:need]
    cut = rng.randint(0, need)
    if lang == "zh":
        return take[:cut] + text + take[cut:]
    cut = max(take.rfind(" ", 0, cut), 0)  # at a word boundary
    return "\n".join(x for x in (take[:cut].strip(), text, take[cut:].strip()) if x)


def _drop_source_copies(texts: list[str], window: int = 20, share: float = 0.25) -> list[str]:
    """`texts` without those that copy an earlier one: >= `share` of the shorter
    text's `window`-character strings found in the other. The sources have a few (a
    People's Daily paragraph reprinted with "李鹏指出，" in front, template web pages);
    as originals of two families they would be true duplicates labelled negative. The
    window is far longer than any shingle measured, so this does not favour one."""
    owner: dict[int, int] = {}
    sizes, kept = [], []
    for t in texts:
        grams = {hash(t[k:k + window]) for k in range(max(1, len(t) - window + 1))}
        hits: dict[int, int] = {}
        for g in grams:
            if g in owner:
                hits[owner[g]] = hits.get(owner[g], 0) + 1
        if any(c >= share * min(len(grams), sizes[j]) for j, c in hits.items()):
            continue
        for g in grams:
            owner.setdefault(g, len(kept))
        sizes.append(len(grams))
        kept.append(t)
    return kept


def build_by_edit(data: Path, n_families: int = 150, n_unrelated: int = 150, copies: int = 4,
                  seed: int = 0) -> list[dict]:
    """Per language: n_families originals with `copies` edited copies each (the
    EDIT_VARIANTS dealt round-robin in shuffled order, so each variant is equally
    frequent), plus n_unrelated originals without copies. Each document is {id, text,
    source (= lang), lang, family, edit ("original" for originals), rate, label (copies
    only)}. Originals that copy one another in the source are left out first; filler
    text for embed copies comes from further originals outside the set."""
    n = n_families + n_unrelated
    extra = n_families * copies // 2  # filler: ~2x what the embed copies take on average
    pool = load_originals(data, n + extra, n + extra, seed)
    rng = random.Random(seed + 1)
    docs = []
    for lang in ("zh", "en"):
        texts = _drop_source_copies([t for lg, t in pool if lg == lang])
        own, filler = texts[:n], iter(texts[n:])
        variants = [EDIT_VARIANTS[i % len(EDIT_VARIANTS)] for i in range(n_families * copies)]
        rng.shuffle(variants)
        for f, text in enumerate(own):
            fam = f"{lang}{f:04d}"
            docs.append({"id": f"{fam}-0", "text": text, "source": lang, "lang": lang, "family": fam,
                         "edit": "original", "rate": 0.0})
            for c in range(1, copies + 1) if f < n_families else ():
                op, rate = variants[(f * copies) + c - 1]
                if op == "embed":
                    t = _embed(text, lang, rate, filler, rng)
                else:
                    for _ in range(10):  # a reorder may put every sentence back: draw again
                        t = edit(text, lang, op, rate, rng.choice(own), rng)
                        if t != text or op != "reorder":
                            break
                label = edit_label(op, rate, (len(t) - len(text)) / max(1, len(text)))
                docs.append({"id": f"{fam}-{c}", "text": t, "source": lang, "lang": lang, "family": fam,
                             "edit": op, "rate": rate, "label": label})
    return docs


def edit_metrics(predicted: set[tuple[str, str]], docs: list[dict]) -> dict[str, dict]:
    """Metrics of predicted duplicate pairs on build_by_edit()'s set, for the scopes
    "all", each language, and "lang/edit". Only (original, copy) pairs carry a label;
    two copies of one original count neither way (their own difference is unknown);
    documents of two families are a false link, charged to "all", to each language and
    to the edit of each copy in the pair. precision = TP / (TP + linked negatives +
    false links), recall = TP / positives; gray pairs count neither way; `embedded`
    is the share of embed pairs linked, and f1_embedded the F1 with them as positives
    (what a containment measure is for)."""
    by_id = {d["id"]: d for d in docs}
    cnt: dict[str, dict[str, int]] = {}

    def add(scopes, key):
        for s in scopes:
            c = cnt.setdefault(s, {})
            c[key] = c.get(key, 0) + 1

    def scopes(d):
        return ("all", d["lang"], f"{d['lang']}/{d['edit']}")

    for d in docs:
        if "label" in d:
            add(scopes(d), d["label"])
    for s in ("all", "zh", "en"):  # reported even without copies or links
        cnt.setdefault(s, {})
    for a, b in predicted:
        da, db = by_id[a], by_id[b]
        if da["family"] == db["family"]:
            copy = db if da["edit"] == "original" else da if db["edit"] == "original" else None
            if copy is not None:
                add(scopes(copy), copy["label"] + "_linked")
        else:
            add({"all", da["lang"], db["lang"]} | {scopes(d)[2] for d in (da, db) if "label" in d}, "false")
    out = {}
    for s, c in sorted(cnt.items()):
        g = lambda k: c.get(k, 0)  # noqa: E731
        tp, fp = g(POS + "_linked"), g(NEG + "_linked") + g("false")
        out[s] = {"precision": _ratio(tp, tp + fp, 1.0), "recall": _ratio(tp, g(POS)), "f1": _f1(tp, fp, g(POS)),
                  "tp": tp, "fp": fp, "positives": g(POS), "negatives_linked": g(NEG + "_linked"),
                  "gray_linked": g(GRAY + "_linked"), "embedded": _ratio(g(EMBEDDED + "_linked"), g(EMBEDDED)),
                  "f1_embedded": _f1(tp + g(EMBEDDED + "_linked"), fp, g(POS) + g(EMBEDDED))}
    return out


def _ratio(a: int, b: int, empty=None):
    return round(a / b, 4) if b else empty


def _f1(tp: int, fp: int, pos: int) -> float | None:
    if not pos:
        return None
    p, r = (tp / (tp + fp) if tp + fp else 1.0), tp / pos
    return round(2 * p * r / (p + r), 4) if p + r else 0.0


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
