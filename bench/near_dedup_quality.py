#!/usr/bin/env python3
"""Near-dedup quality by edit type (issue 17): which shingles and threshold to default to.

The set: dataproc/near_dedup/labelled.py `build_by_edit` (real People's Daily
paragraphs for zh, C4 pages and Wikipedia passages for en; per language 150 originals
with 4 edited copies each and 150 unrelated originals: 1,800 documents). A copy's label
follows from its edit, never from a shingle similarity, so the labels can judge the
shingles (labelled.EDIT_RULE):

  substitute / insert / delete  <= 10% of the words (en) or characters (zh): positive;
                                20%: gray; 30%: negative
  reorder (sentences moved)     positive
  boilerplate (site line added) positive while it adds <= 15% of the length, else gray
  truncate                      >= 80% kept: positive; 60%: gray; 40%: negative
  embed (the original inside    own category: in no precision / recall; its column is
  other text 2/3/5x its length) the share of such pairs linked
  two families                  negative; two copies of one original: neither way

Pairs are those of the final clusters (connected components of the verified edges),
as the job removes them. Per setting it measures:
  zerolm      MinHash-LSH through the job's own step functions on one partition
              (dataproc.near_dedup.local.verified_edges: the Ray job's edges without
              Ray), 128 permutations, candidates centred 0.1 below the threshold,
              exact Jaccard verification
  ds_verified datasketch MinHashLSH(threshold, num_perm=128) over MinHashes of the
              same shingle hashes, hits checked by the same exact Jaccard
  ds_raw      the same datasketch hits unverified (what most scripts do)
for shingles char 3/5/7, word 2/3/5 (no spaces in Chinese: word rows are for en),
jieba 2/3 (zh only; en then uses word n-grams and is left out) and thresholds
0.4..0.9. Then: the old defaults (auto: zh char 5-grams, en word 5-grams, 0.8) against
NearDedupConfig()'s, per language and edit, with datasketch on the same shingles;
`verify: containment` (|A∩B| / min(|A|, |B|)) on the default shingles at several
candidate thresholds, with the LSH candidates it costs ("cross" = candidate pairs of
two families, the part that grows with the square of the corpus); and, without labels,
the share of whole real corpora (exact copies removed) each default removes.

    python3 bench/near_dedup_quality.py [--data ../shared/data] [--families 150] [--seed 0]
                                        [--skip zerolm,datasketch,defaults,containment,sanity]

One JSON line per run (metrics for all / zh / en / each lang/edit), then tables.
About 3 minutes on one core of the 2-core VM.
"""

from __future__ import annotations

import argparse
import time

from common import DEFAULT_DATA, emit, print_table

SHINGLES = "char3,char5,char7,word2,word3,word5,jieba2,jieba3"
THRESHOLDS = "0.4,0.5,0.6,0.7,0.8,0.9"
OLD_DEFAULT = {"shingles": {"kind": "auto", "char_ngram": 5, "word_ngram": 5, "jieba_ngram": 3},
               "minhash": {"threshold": 0.8}}


def shingle_cfg(spec: str) -> dict:
    """"char5" -> the `shingles:` section; jieba only for zh (per_source), en by words."""
    kind, n = spec.rstrip("0123456789"), int(spec[len(spec.rstrip("0123456789")):])
    if kind == "jieba":
        return {"kind": "word", "word_ngram": n, "jieba_ngram": n, "per_source": {"zh": "jieba"}}
    return {"kind": kind, f"{kind}_ngram": n}


def clusters_metrics(docs, a, b) -> dict:
    from dataproc.near_dedup import labelled

    labels = labelled.union_find_labels(len(docs), zip(a.tolist(), b.tolist()))
    pairs = labelled.cluster_pairs({d["id"]: str(x) for d, x in zip(docs, labels)})
    m = labelled.edit_metrics(pairs, docs)
    # embed copies by host length (2x, 3x, 5x the original): share in the original's cluster
    index, hits = {d["id"]: i for i, d in enumerate(docs)}, {}
    for i, d in enumerate(docs):
        if d["edit"] == "embed":
            h = hits.setdefault(f"{d['rate']}x", [0, 0])
            h[0] += int(labels[i] == labels[index[d["family"] + "-0"]])
            h[1] += 1
    m["embed_by_host"] = {k: round(h / n, 3) for k, (h, n) in sorted(hits.items())}
    return m


def row(impl: str, spec: str, threshold: float, m: dict, seconds: float, **extra) -> dict:
    rec = {"bench": "near_dedup_quality", "impl": impl, "shingles": spec, "threshold": threshold, **extra,
           "seconds": round(seconds, 2)}
    for scope in ("all", "zh", "en"):
        rec[scope] = {k: m[scope][k] for k in ("precision", "recall", "f1", "tp", "fp", "positives",
                                                 "embedded", "f1_embedded")}
    rec["by_edit"] = {s: {k: v[k] for k in ("precision", "recall", "embedded", "negatives_linked")}
                      for s, v in m.items() if "/" in s}
    rec["embed_by_host"] = m["embed_by_host"]
    if spec.startswith("jieba"):  # en was shingled by words: not a jieba number
        rec["en"] = rec["all"] = None
        rec["by_edit"] = {s: v for s, v in rec["by_edit"].items() if s.startswith("zh/")}
    return emit(rec) or rec


def zerolm_runs(docs, spec: str, thresholds: list[float], minhash: dict | None = None, impl: str = "zerolm",
                shingles: dict | None = None):
    """One verified_edges run per threshold; `shingles` (a `shingles:` section) wins
    over `spec`, which then only labels the rows."""
    import numpy as np

    from dataproc.near_dedup.config import NearDedupConfig
    from dataproc.near_dedup.local import verified_edges

    texts, langs = [d["text"] for d in docs], [d["lang"] for d in docs]
    out = []
    for t in thresholds:
        cfg = NearDedupConfig.model_validate({"shingles": shingles if shingles is not None else shingle_cfg(spec),
                                              "minhash": {"threshold": t, **(minhash or {})}})
        t0 = time.perf_counter()
        a, b, info = verified_edges(texts, cfg, sources=langs)
        m = clusters_metrics(docs, a, b)
        cand = info["candidates"]
        fam = np.array([d["family"] for d in docs], dtype=object)
        out.append(row(impl, spec, t, m, time.perf_counter() - t0, verify=cfg.minhash.verify,
                       lsh_threshold=round(info["lsh_threshold"], 3), candidates=len(cand),
                       # candidates between families: the part that grows with the square of the corpus
                       cross_candidates=int((fam[cand[:, 0]] != fam[cand[:, 1]]).sum())))
    return out


def datasketch_runs(docs, spec: str, thresholds: list[float], shingles: dict | None = None,
                    prefix: str = "ds") -> list[dict]:
    """MinHashLSH fed the very shingle hashes zerolm uses (8 bytes each, hashed again
    by datasketch's sha1), one query per document; raw hits and exactly verified hits."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from dataproc.near_dedup.config import ShingleConfig
    from dataproc.near_dedup.shingles import detect_kinds, shingle_batch
    from dataproc.near_dedup.verify import exact_jaccard

    cfg = ShingleConfig.model_validate(shingles if shingles is not None else shingle_cfg(spec))
    texts, langs = [d["text"] for d in docs], [d["lang"] for d in docs]
    kinds = detect_kinds(texts, langs, cfg)
    t0 = time.perf_counter()
    h, c = shingle_batch(texts, kinds, cfg, seed=1)
    mins = []
    for i, off in enumerate(np.cumsum(c) - c):
        raw = h[off:off + c[i]].tobytes()
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([raw[k:k + 8] for k in range(0, len(raw), 8)])
        mins.append(m)
    sign_s = time.perf_counter() - t0
    out = []
    for t in thresholds:
        t0 = time.perf_counter()
        lsh = MinHashLSH(threshold=t, num_perm=128)
        for i, m in enumerate(mins):
            if c[i]:
                lsh.insert(i, m)
        hits = sorted({(min(i, j), max(i, j)) for i, m in enumerate(mins) if c[i] for j in lsh.query(m) if j != i})
        a = np.array([p[0] for p in hits], dtype=np.int64)
        b = np.array([p[1] for p in hits], dtype=np.int64)
        lsh_s = time.perf_counter() - t0 + sign_s
        out.append(row(f"{prefix}_raw", spec, t, clusters_metrics(docs, a, b), lsh_s, candidates=len(hits)))
        jac = exact_jaccard([texts[i] for i in a], kinds[a], [texts[i] for i in b], kinds[b], cfg, 1) if len(a) else a
        keep = jac >= t
        out.append(row(f"{prefix}_verified", spec, t, clusters_metrics(docs, a[keep], b[keep]),
                       time.perf_counter() - t0 + sign_s, candidates=len(hits)))
    return out


def f1s(r: dict) -> dict:
    zh, en, al = r["zh"] or {}, r["en"] or {}, r["all"] or r["zh"]  # jieba: zh only
    return {"impl": r["impl"], "shingles": r["shingles"], "thr": r["threshold"], "verify": r.get("verify", "jaccard"),
            "F1": r["all"] and r["all"]["f1"], "P": al["precision"], "R": al["recall"], "zh F1": zh.get("f1"),
            "en F1": en.get("f1"), "embedded": al["embedded"], "cands": r.get("candidates")}


def sanity_runs(data, configs: dict[str, dict]) -> list[dict]:
    """No labels: whole real corpora, nearly all distinct (exact copies removed first).
    The share a setting removes bounds its false links there, on short and templated
    lines that the labelled set (documents of 200+ characters / 60+ words) lacks."""
    import json

    import numpy as np

    from dataproc.near_dedup import labelled
    from dataproc.near_dedup.config import NearDedupConfig
    from dataproc.near_dedup.local import verified_edges

    def lines(path):
        return [ln.strip() for ln in path.open(encoding="utf-8") if ln.strip()]

    pre = data / "pretrain"
    corpora = {
        "zh reviews": lines(pre / "zh" / "reviews_pos.txt") + lines(pre / "zh" / "reviews_neg.txt"),
        "zh peoples_daily": lines(pre / "zh" / "peoples_daily_199801.txt"),
        "en wikitext2_valid": [t for t in lines(pre / "en" / "wikitext2_valid.txt") if not t.startswith("=")],
        "en sentences+instructions": lines(data / "lid" / "sentences" / "en.txt") + [
            r["instruction"] + (" " + r["input"] if r["input"] else "")
            for r in json.loads((data / "sft" / "alpaca_en_demo.json").read_text(encoding="utf-8"))]}
    out = []
    for corpus, texts in corpora.items():
        texts = list(dict.fromkeys(texts))
        short = np.fromiter((len(t) < 40 for t in texts), dtype=bool, count=len(texts))
        for name, cfg in configs.items():
            a, b, _ = verified_edges(texts, NearDedupConfig.model_validate(cfg))
            labels = labelled.union_find_labels(len(texts), zip(a.tolist(), b.tolist()))
            removed = labels != np.arange(len(texts))
            out.append({"bench": "near_dedup_sanity", "impl": name, "corpus": corpus, "docs": len(texts),
                        "removed": int(removed.sum()), "removed_share": round(float(removed.mean()), 4),
                        "removed_short": int((removed & short).sum()),  # of them under 40 characters
                        "linked": [[texts[i][:60], texts[j][:60]] for i, j in zip(a[:3], b[:3])]})
            emit(out[-1])
    return out


def edit_table(runs: list[dict]) -> None:
    """Rows = all / language / language+edit, one column per run: recall (precision);
    for embed, the share linked."""
    def cell(m):
        if m is None:
            return ""
        return f"{m['embedded']}" if m["recall"] is None else f"{m['recall']:.3f} ({m['precision']:.3f})"

    scopes = ["all", "zh", "en"] + sorted(runs[0]["by_edit"])
    table = []
    for s in scopes:
        rec = {"scope": s}
        for r in runs:
            m = r[s] if s in ("all", "zh", "en") else r["by_edit"].get(s)
            rec[f"{r['impl']}@{r['threshold']}"] = cell(m) if "/" in s else (
                f"F1 {m['f1']:.3f}: R {m['recall']:.3f} P {m['precision']:.3f}" if m else "")
        table.append(rec)
    print_table(table, ["scope"] + [f"{r['impl']}@{r['threshold']}" for r in runs])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--families", type=int, default=150)
    p.add_argument("--unrelated", type=int, default=150)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shingles", default=SHINGLES)
    p.add_argument("--thresholds", default=THRESHOLDS)
    p.add_argument("--skip", default="", help="comma list of: zerolm, datasketch, containment, defaults, sanity")
    a = p.parse_args()
    from pathlib import Path

    from dataproc.near_dedup import labelled
    from dataproc.near_dedup.config import NearDedupConfig

    skip, data = set(a.skip.split(",")), Path(a.data)
    docs = labelled.build_by_edit(data, a.families, a.unrelated, a.copies, a.seed)
    emit({"bench": "near_dedup_quality_set", "docs": len(docs), "rule": labelled.EDIT_RULE,
          "copies": {lang: {lab: sum(1 for d in docs if d["lang"] == lang and d.get("label") == lab)
                            for lab in (labelled.POS, labelled.GRAY, labelled.NEG, labelled.EMBEDDED)}
                     for lang in ("zh", "en")}})
    specs, thresholds = a.shingles.split(","), [float(x) for x in a.thresholds.split(",")]
    new = NearDedupConfig()
    new_sh, old_sh = new.shingles.model_dump(), OLD_DEFAULT["shingles"]
    rows = []
    for spec in specs:
        if "zerolm" not in skip:
            rows += zerolm_runs(docs, spec, thresholds)
        if "datasketch" not in skip:
            rows += datasketch_runs(docs, spec, thresholds)
    defaults = []
    if "defaults" not in skip:  # one run each, both languages together, as the job runs
        old_t = OLD_DEFAULT["minhash"]["threshold"]
        defaults += zerolm_runs(docs, "auto", [old_t], None, "old_default", old_sh)
        defaults += zerolm_runs(docs, "auto", [new.minhash.threshold], None, "default", new_sh)
        if "datasketch" not in skip:
            defaults += datasketch_runs(docs, "auto", [old_t], old_sh, "ds_old_shingles")
            defaults += datasketch_runs(docs, "auto", [new.minhash.threshold], new_sh, "ds_default_shingles")
    cont = []
    if "containment" not in skip:  # on the default shingles; threshold = containment
        for cand in (0.05, 0.1, 0.15, 0.2, 0.3, None):  # None: the default for containment
            cont += zerolm_runs(docs, "auto", [0.8], {"verify": "containment", "candidate_threshold": cand},
                                "containment", new_sh)
        cont += zerolm_runs(docs, "auto", [0.5, 0.6, 0.7, 0.9], {"verify": "containment"}, "containment", new_sh)
        cont += zerolm_runs(docs, "auto", [0.5], {"candidate_threshold": 0.15}, "jaccard_lsh_0.15", new_sh)
    sanity = [] if "sanity" in skip else sanity_runs(data, {
        "old_default": OLD_DEFAULT, "default": {}, "default@0.6": {"minhash": {"threshold": 0.6}},
        "char3_word2@0.5": {"shingles": {**new_sh, "word_ngram": 2}, "minhash": {"threshold": 0.5}},
        "5-grams@0.4": {"shingles": OLD_DEFAULT["shingles"], "minhash": {"threshold": 0.4}}})

    if rows:
        print("\nGrid (F1 over all labelled pairs; embedded = share of embed pairs linked):")
        print_table([f1s(r) for r in rows], ["impl", "shingles", "thr", "F1", "P", "R", "zh F1", "en F1", "embedded",
                                             "cands"])
    if defaults:
        print("\nDefaults, per language and edit: recall (precision); embed: share linked")
        edit_table(defaults)
    if cont:
        print("\nContainment verification on the default shingles (threshold = containment):")
        print_table([{**f1s(r), "lsh": r["lsh_threshold"], "F1+emb": r["all"]["f1_embedded"],
                      "cross cands": r["cross_candidates"], "embed 2x/3x/5x": "/".join(
                          f"{v:.2f}" for v in r["embed_by_host"].values())} for r in defaults[:2] + cont],
                    ["impl", "verify", "thr", "lsh", "cands", "cross cands", "P", "R", "F1", "embedded",
                     "embed 2x/3x/5x", "F1+emb"])
    if sanity:
        print("\nUnlabelled real corpora (exact copies removed): documents removed (of them < 40 characters)")
        print_table(sanity, ["corpus", "impl", "docs", "removed", "removed_share", "removed_short"])


if __name__ == "__main__":
    main()
