"""Near-dedup pieces without Ray: shingles, MinHash, band layout, SimHash, exact
Jaccard, and connected components (local and the distributed star steps run
in-process) against a plain union-find on adversarial graphs."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dataproc.near_dedup import graph, labelled, simhash
from dataproc.near_dedup.components import CHANGES, StarStep, directed, local_components
from dataproc.near_dedup.config import NearDedupConfig, ShingleConfig
from dataproc.near_dedup.minhash import MinHasher, estimate_jaccard, optimal_bands
from dataproc.near_dedup.shingles import KIND_CODES, detect_kinds, shingle_batch
from dataproc.near_dedup.steps import A, B, SIG, SIG_A, SIG_B, Signer, edges_table
from dataproc.near_dedup.local import verified_edges
from dataproc.near_dedup.verify import exact_containment, exact_jaccard


@pytest.fixture(scope="module")
def real_docs(shared_data):
    return labelled.load_originals(shared_data, 60, 60, seed=3)


def test_shingle_counts_and_short_texts():
    cfg = ShingleConfig(char_ngram=5, word_ngram=3)
    texts = ["迈向充满希望的新世纪", "好", "好吗", "", "   ", "one two", "one two three four"]
    kinds = np.array([0, 0, 0, 0, 1, 1, 1], np.int8)
    h, c = shingle_batch(texts, kinds, cfg, seed=1)
    # n - k + 1 windows; a short non-empty text gets one; empty / blank gets none.
    assert c.tolist() == [6, 1, 1, 0, 0, 1, 2]
    assert len(h) == c.sum()
    # Two different short texts never share their one shingle; equal ones do.
    h2, _ = shingle_batch(["好", "好"], np.zeros(2, np.int8), cfg, seed=1)
    assert h[6] != h[7] and h2[0] == h2[1] == h[6]


def test_empty_documents_get_no_signature():
    cfg = NearDedupConfig()
    batch = pd.DataFrame({"id": ["a", "b", "c", "d"], "text": ["", " ", "好", "好的"], "source": "x"})
    out = Signer(cfg)(batch)
    assert out[SIG].isna().tolist() == [True, True, False, False]
    assert out[SIG][2] != out[SIG][3]
    # Empty / blank rows keep a unique non-candidate node key.
    assert out["_nd_node"].tolist()[:2] == ["\0a", "\0b"]


def test_detect_kinds_by_script_and_source(real_docs):
    texts = [t for _, t in real_docs]
    langs = [lang for lang, _ in real_docs]
    k = detect_kinds(texts, None, ShingleConfig())
    want = [KIND_CODES["char" if lang == "zh" else "word"] for lang in langs]
    assert k.tolist() == want
    k = detect_kinds(texts, langs, ShingleConfig(per_source={"zh": "jieba"}))
    assert {int(x) for x, lang in zip(k, langs) if lang == "zh"} == {KIND_CODES["jieba"]}


@pytest.mark.parametrize("n", [3, 5])
def test_hashed_jaccard_equals_string_jaccard(real_docs, n):
    # exact_jaccard works on 64-bit hashes; labelled.py on Python sets of strings.
    rng = random.Random(0)
    a, b, k = [], [], []
    for lang, t in real_docs[::4]:
        e = labelled.edit(t, lang, "substitute", rng.choice([0.01, 0.05, 0.2]), real_docs[0][1], rng)
        a.append(t), b.append(e), k.append(0 if lang == "zh" else 1)
    k = np.array(k, np.int8)
    got = exact_jaccard(a, k, b, k, ShingleConfig(char_ngram=n, word_ngram=n), seed=1)
    want = [labelled.jaccard(labelled.shingle_set(x, lg, n), labelled.shingle_set(y, lg, n))
            for x, y, (lg, _) in zip(a, b, real_docs[::4])]
    np.testing.assert_allclose(got, want, atol=1e-9)


def _host(text: str, lang: str, fillers: list[str]) -> str:
    """`text` copied whole into the middle of other real text about 3x its length."""
    sep = "" if lang == "zh" else "\n"
    pad = sep.join(fillers)[: len(text)]
    return sep.join([pad, text, pad[::-1] if lang == "zh" else " ".join(pad.split()[::-1])])


def test_containment_links_an_excerpt_that_jaccard_does_not(real_docs):
    """An original copied into a document 3x its length: shingle Jaccard ~0.33, so the
    Jaccard default leaves it, while verify: containment (|A∩B| / min(|A|, |B|) = 1.0)
    links it, through the job's own steps (candidates centred low enough, texts
    carried to Verify) and without linking unrelated documents."""
    zh = [t for lang, t in real_docs if lang == "zh"][:20]
    en = [t for lang, t in real_docs if lang == "en"][:20]
    texts, pairs = [], set()
    for lang, docs in (("zh", zh), ("en", en)):
        for i in range(4):  # docs[0..3] copied into hosts padded with docs[4..11]
            texts.append(docs[i])
            texts.append(_host(docs[i], lang, docs[4 + 2 * i: 6 + 2 * i]))
            pairs.add((len(texts) - 2, len(texts) - 1))
        texts += docs[12:]  # unrelated documents
    kinds = detect_kinds(texts, None, ShingleConfig())
    lo, hi = [a for a, _ in sorted(pairs)], [b for _, b in sorted(pairs)]
    t_lo, t_hi = [texts[i] for i in lo], [texts[i] for i in hi]
    cont = exact_containment(t_lo, kinds[lo], t_hi, kinds[hi], ShingleConfig(), seed=1)
    np.testing.assert_allclose(cont, 1.0)  # every shingle of the excerpt is in its host
    np.testing.assert_allclose(exact_containment(t_hi, kinds[hi], t_lo, kinds[lo], ShingleConfig(), seed=1), cont)
    assert (exact_jaccard(t_lo, kinds[lo], t_hi, kinds[hi], ShingleConfig(), seed=1) < 0.45).all()

    def linked(cfg):
        a, b, _ = verified_edges(texts, NearDedupConfig.model_validate(cfg))
        return set(zip(a.tolist(), b.tolist()))

    assert linked({}) == set()  # the default: Jaccard >= 0.5
    assert linked({"minhash": {"verify": "containment", "threshold": 0.8}}) == pairs
    # The candidates, not only the check, must reach low Jaccard: centred at the
    # Jaccard threshold, LSH would rarely even propose these pairs.
    assert not linked({"minhash": {"verify": "containment", "threshold": 0.8, "candidate_threshold": 0.8}}) >= pairs


def test_defaults_on_the_edit_labelled_set(shared_data):
    """The defaults against the old ones (5-grams at 0.8) on real documents labelled
    by their edits (bench/near_dedup_quality.py measures the full set)."""
    docs = labelled.build_by_edit(shared_data, n_families=40, n_unrelated=40, copies=4, seed=5)
    texts, langs = [d["text"] for d in docs], [d["lang"] for d in docs]

    def metrics(cfg):
        a, b, _ = verified_edges(texts, NearDedupConfig.model_validate(cfg), sources=langs)
        lab = labelled.union_find_labels(len(docs), zip(a.tolist(), b.tolist()))
        return labelled.edit_metrics(labelled.cluster_pairs({d["id"]: str(x) for d, x in zip(docs, lab)}), docs)

    new = metrics({})
    old = metrics({"shingles": {"char_ngram": 5, "word_ngram": 5}, "minhash": {"threshold": 0.8}})
    for lang in ("zh", "en"):
        assert new[lang]["positives"] > 60
        assert new[lang]["f1"] >= 0.95 and new[lang]["precision"] >= 0.95, new[lang]
        assert old[lang]["recall"] < 0.75 and new[lang]["f1"] > old[lang]["f1"] + 0.15


def test_edits_keep_whitespace_and_labels_follow_the_edit(shared_data):
    rng = random.Random(0)
    text = "First line here.\n\nSecond  paragraph, with two spaces.\nThird line ends."
    for op in ("substitute", "insert", "delete", "reorder"):
        out = labelled.edit(text, "en", op, 0.2, "alpha beta gamma", rng)
        assert out.count("\n") == text.count("\n") and out != text  # only words moved or changed
    docs = labelled.build_by_edit(shared_data, n_families=30, n_unrelated=5, copies=4, seed=2)
    for d in docs:
        if d["edit"] in ("substitute", "insert", "delete"):
            assert d["label"] == {0.02: "pos", 0.05: "pos", 0.1: "pos", 0.2: "gray", 0.3: "neg"}[d["rate"]]
        elif d["edit"] == "embed":
            orig = next(o for o in docs if o["id"] == d["family"] + "-0")
            assert orig["text"] in d["text"] and len(d["text"]) >= 1.8 * len(orig["text"])
    # metrics: (original, copy) pairs carry the label, copy-copy pairs count neither
    # way, two families are a false link charged to the copy's edit
    fam = [d for d in docs if d["family"] == docs[0]["family"]]
    other = next(d for d in docs if d["family"] != docs[0]["family"])
    pos = next(d for d in fam if d.get("label") == "pos")
    m = labelled.edit_metrics({(fam[0]["id"], pos["id"]), (fam[1]["id"], fam[2]["id"]),
                               (pos["id"], other["id"])}, docs)
    scope = f"{pos['lang']}/{pos['edit']}"
    assert (m["all"]["tp"], m["all"]["fp"]) == (1, 1) and m[scope]["fp"] == 1 and m[scope]["tp"] == 1


def test_minhash_estimates_jaccard_and_is_batch_independent(real_docs):
    rng = random.Random(1)
    cfg = ShingleConfig()
    a = [t for _, t in real_docs[:40]]
    b = [labelled.edit(t, lang, "insert", 0.05, real_docs[-1][1], rng) for lang, t in real_docs[:40]]
    kinds = detect_kinds(a + b, None, cfg)
    h, c = shingle_batch(a + b, kinds, cfg, seed=1)
    sig = MinHasher(256, seed=1).signatures(h, c)
    est = estimate_jaccard(sig[:40], sig[40:])
    true = exact_jaccard(a, kinds[:40], b, kinds[40:], cfg, seed=1)
    # sd of the estimate at 256 perms is <= 0.032; the mean error is far smaller.
    assert np.abs(est - true).max() < 0.15 and abs((est - true).mean()) < 0.02
    # Signatures do not depend on which other documents share the batch.
    h1, c1 = shingle_batch(a[3:4], kinds[3:4], cfg, seed=1)
    np.testing.assert_array_equal(MinHasher(256, seed=1).signatures(h1, c1)[0], sig[3])


def test_band_layout_matches_datasketch():
    from datasketch.lsh import _optimal_param

    for t, p in [(0.7, 128), (0.8, 128), (0.5, 64), (0.9, 256)]:
        assert optimal_bands(t, p) == _optimal_param(t, p, 0.5, 0.5)


def test_simhash_pigeonhole_blocks():
    rng = np.random.default_rng(0)
    fp = rng.integers(0, 2**63, size=2000, dtype=np.uint64)
    for k in (3, 6):
        flips = np.zeros_like(fp)
        for i in range(len(fp)):  # exactly k random bits flipped per fingerprint
            for bit in rng.choice(64, size=k, replace=False):
                flips[i] |= np.uint64(1) << np.uint64(bit)
        other = fp ^ flips
        assert (simhash.hamming(fp, other) == k).all()
        ka, kb = simhash.block_keys(fp, k), simhash.block_keys(other, k)
        assert ((ka == kb).any(axis=1)).all()  # within k bits -> one block equal


def _union_find_min_labels(n, a, b):
    return labelled.union_find_labels(n, zip(a.tolist(), b.tolist()))


def adversarial_graphs(seed=0):
    rng = np.random.default_rng(seed)
    n = 3000
    perm = rng.permutation(n)  # one long chain through shuffled node ids
    yield "chain", n, perm[:-1], perm[1:]
    yield "sorted_chain", n, np.arange(n - 1), np.arange(1, n)
    # A chain whose ids decrease along it (worst case for min-label propagation),
    # plus random sparse edges and a big star.
    a = np.concatenate([np.arange(n - 1, 0, -1), rng.integers(0, n, 800), np.zeros(200, np.int64)])
    b = np.concatenate([np.arange(n - 2, -1, -1), rng.integers(0, n, 800), rng.integers(0, n, 200)])
    keep = a != b
    yield "mixed", n, a[keep], b[keep]


@pytest.mark.parametrize("name,n,a,b", list(adversarial_graphs()))
def test_local_components_equal_union_find(name, n, a, b):
    assert (graph.components(a, b, n) == _union_find_min_labels(n, a, b)).all()


def _nodes(codes):
    return np.array([f"n{c:06d}" for c in codes], dtype=object)


def _run_star_rounds(table, parts, max_rounds=60):
    """What components.connected_components does over Ray, with partitions made by
    a stable hash of the source node: directed -> partition -> StarStep."""
    for rnd in range(1, max_rounds + 1):
        changed = 0
        for large in (True, False):
            d = directed(table.select([A, B, SIG_A, SIG_B]))
            src = d["_nd_src"].to_pylist()
            part = np.array([zlib.crc32(s.encode()) % parts for s in src])
            outs = [StarStep(large)(d.filter(pa.array(part == p))) for p in range(parts)]
            table = pa.concat_tables(outs)
            changed += sum(int(x) for x in table[CHANGES].to_pylist())
        if changed == 0:
            return table, rnd
    raise AssertionError("did not converge")


@pytest.mark.parametrize("name,n,a,b", list(adversarial_graphs()))
def test_distributed_star_steps_equal_union_find(name, n, a, b):
    sig = [b"s"] * len(a)
    edges = edges_table(_nodes(a), _nodes(b), sig, sig)
    final, rounds = _run_star_rounds(edges, parts=4)
    labels = _union_find_min_labels(n, a, b)
    want = {(f"n{labels[i]:06d}", f"n{i:06d}") for i in set(a.tolist()) | set(b.tolist()) if labels[i] != i}
    got = set(zip(final[A].to_pylist(), final[B].to_pylist()))
    assert got == want  # exactly one (component minimum, member) edge per removed node
    assert rounds <= 2 * int(np.log2(n)) ** 2  # the proven O(log^2 n) bound, loosely
    local = local_components(edges)
    assert set(zip(local[A].to_pylist(), local[B].to_pylist())) == want


def test_pair_metrics_counts():
    truth = {"pairs": {("a", "b"): 0.9, ("a", "c"): 0.7, ("b", "c"): 0.85, ("x", "y"): 0.3}}
    m = labelled.pair_metrics({("a", "b"), ("a", "c"), ("x", "y"), ("p", "q")}, truth)
    assert (m["tp"], m["gray"], m["fp"], m["positives"]) == (1, 1, 2, 2)
    assert m["precision"] == pytest.approx(1 / 3, abs=1e-3) and m["recall"] == 0.5
