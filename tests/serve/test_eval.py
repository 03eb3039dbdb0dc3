"""Evaluation (serve/eval): bits per byte against a direct computation and across
tokenizers, the CMMLU and ARC formats on the real files, accuracy bookkeeping, and
POST /v1/evaluations through the FastAPI app."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from serve.eval import arc, bpb, cmmlu
from serve.eval.multiple_choice import MCItem, accuracy, encode_pair, evaluate_multiple_choice
from serve.eval.report import to_markdown
from serve.eval.scorer import EngineScorer
from zerolm.errors import UserError


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from serve.engine import Engine
    from serve.loading import load_model

    return EngineScorer(Engine(load_model("tiny", tiny_model_dir, device="cpu")))


# ------------------------------------------------------------------ bits per byte
@pytest.mark.parametrize("n,ctx,stride", [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 3), (30, 8, 7),
                                          (30, 8, 1), (100, 16, 16 - 1)])
def test_windows_score_each_token_once_with_enough_context(n, ctx, stride):
    seen = []
    for start, end, first in bpb.windows(n, ctx, stride):
        assert 0 <= start < first <= end <= n and end - start <= ctx
        for p in range(first, end):
            seen.append(p)
            assert p - start >= min(p, ctx - stride)  # left context of target p in its window
    assert sorted(seen) == list(range(1, n))


def _direct_nats(model, seq: list[int], ctx: int, stride: int) -> float:
    """Plain forward passes of the model over the same windows, no engine/KV cache."""
    nats = 0.0
    for start, end, first in bpb.windows(len(seq), ctx, stride):
        x = torch.tensor(seq[start:end])[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(x).float(), dim=-1)[0]  # (T, V)
        nats -= sum(float(lp[p - 1 - start, seq[p]]) for p in range(first, end))
    return nats


def test_bpb_on_pack_val_equals_direct_computation(scorer, tokens_dir):
    manifest = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))
    docs = {k: list(v) for k, v in bpb.pack_documents(tokens_dir, sources=["news", "cmrc"]).items()}
    for name in docs:  # decoded documents are exactly the packed texts: same bytes as the manifest counted
        assert sum(len(t.encode("utf-8")) for t in docs[name]) == manifest["splits"]["val"][name]["bytes"]
        assert len(docs[name]) == manifest["splits"]["val"][name]["docs"]
    docs = {"news": docs["news"][:6], "cmrc": docs["cmrc"][:3]}  # cmrc docs exceed the context: windows
    stride = 100
    report = bpb.evaluate_bpb(scorer, docs, stride=stride)
    model, start = scorer.engine.m.model, scorer.doc_start_id
    for name, texts in docs.items():
        seqs = [[start] + scorer.encode(t) for t in texts]
        nats = sum(_direct_nats(model, s, scorer.context, stride) for s in seqs)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        row = report["sources"][name]
        assert (row["docs"], row["bytes"], row["tokens"]) == (len(texts), n_bytes, sum(len(s) - 1 for s in seqs))
        assert row["nats"] == pytest.approx(nats, rel=1e-4)
        assert row["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
        assert row["ppl"] == pytest.approx(math.exp(nats / row["tokens"]), rel=1e-4)
    assert max(len(s) for s in [[0] + scorer.encode(t) for t in docs["cmrc"]]) > scorer.context
    total = report["overall"]
    assert total["bytes"] == sum(r["bytes"] for r in report["sources"].values())
    assert "| news |" in to_markdown(report)


@pytest.mark.slow
def test_ngram_baselines_are_distributions_over_the_models_vocabulary(scorer, tokens_dir):
    import numpy as np

    from dataproc.quality.ngram import id_hashes
    from serve.eval.baselines import NgramBaselines
    from serve.eval.run import baseline_texts

    manifest = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))
    base = NgramBaselines.train(scorer.encode, baseline_texts([str(tokens_dir)], None), scorer.vocab_size)
    assert base.train_docs == sum(s["docs"] for s in manifest["splits"]["train"].values())
    ids = np.arange(scorer.vocab_size)
    for name, model in base.models.items():
        # p(first token | document start) over every id, plus p(end | start): one distribution
        first = model.logprobs_of(id_hashes(ids), np.ones(len(ids), dtype=np.int64))[0::2]
        end = model.logprobs_of(id_hashes(ids[:0]), np.zeros(1, dtype=np.int64))[0]
        assert np.exp(first).sum() + np.exp(end) == pytest.approx(1.0, abs=1e-4), name
    docs = {k: list(v) for k, v in bpb.pack_documents(tokens_dir, sources=["news", "peoples_daily"], limit=20).items()}
    report = bpb.evaluate_bpb(scorer, docs, baselines=base)
    for name, texts in docs.items():
        row, n_bytes = report["sources"][name], sum(len(t.encode("utf-8")) for t in texts)
        direct = base.nats([scorer.encode(t) for t in texts])
        for model in ("unigram", "kn3"):
            assert row[f"{model}_bpb"] == pytest.approx(direct[model] / math.log(2) / n_bytes, rel=1e-9)
        assert row["kn3_bpb"] < row["unigram_bpb"]  # context helps on real text
    assert report["baselines"]["train_tokens"] == base.train_tokens
    assert "| unigram_bpb | kn3_bpb |" in to_markdown(report)


def test_bpb_is_fair_across_the_packs_tokenizer(ray_session, clean_corpus, tokens_dir, scorer, tmp_path):
    """The same val documents packed with a different tokenizer: the same texts, the
    same bytes and the same score, though the packs' token ids differ."""
    from dataproc.pack import PackConfig, run_pack
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer

    other_tok, other = tmp_path / "tok400", tmp_path / "tokens400"
    train_tokenizer(TokenizerConfig(input=str(clean_corpus), output=str(other_tok), vocab_size=400,
                                    report_docs_per_source=20), echo=lambda *_: None)
    run_pack(PackConfig(input=str(clean_corpus), tokenizer=str(other_tok), output=str(other), val_fraction=0.05),
             echo=lambda *_: None)
    a = json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))["splits"]["val"]["news"]
    b = json.loads((other / "manifest.json").read_text(encoding="utf-8"))["splits"]["val"]["news"]
    assert a["tokens"] != b["tokens"]  # really two tokenizations
    docs_a = {k: list(v) for k, v in bpb.pack_documents(tokens_dir, sources=["news", "peoples_daily"], limit=8).items()}
    docs_b = {k: list(v) for k, v in bpb.pack_documents(other, sources=["news", "peoples_daily"], limit=8).items()}
    assert docs_a == docs_b
    ra, rb = bpb.evaluate_bpb(scorer, docs_a), bpb.evaluate_bpb(scorer, docs_b)
    for name in docs_a:
        assert ra["sources"][name]["bytes"] == rb["sources"][name]["bytes"]
        assert ra["sources"][name]["bpb"] == pytest.approx(rb["sources"][name]["bpb"], rel=1e-6)


def test_text_documents(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes("第一行\r\n\nsecond line\n".encode("utf-8"))
    assert bpb.text_documents(f) == ["第一行", "second line"]
    assert bpb.text_documents(f, per_file=True) == ["第一行\r\n\nsecond line\n"]
    assert bpb.text_documents(f, limit=1) == ["第一行"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "d" / "a.txt").write_text("ay\nay", encoding="utf-8")
    assert bpb.text_documents(tmp_path / "d") == ["ay\nay", "bee"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        bpb.text_documents(tmp_path / "bad.txt")


# ------------------------------------------------------------------ CMMLU / ARC formats
def test_cmmlu_prompt_is_the_official_one(shared_data):
    items, dev = cmmlu.load_cmmlu(shared_data / "eval" / "cmmlu" / "data", subjects=["agronomy"], limit=2)
    assert [it.id for it in items] == ["agronomy/0", "agronomy/1"]
    first = items[0]
    assert (first.question, first.choices, first.gold) == (
        "在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是",
        ["农业生产工具", "土地", "劳动力", "资金"], 1)
    prompt = cmmlu.cmmlu_prompt(first, dev["agronomy"][:1])
    assert prompt.context == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：肉牛屠宰后，胴体的哪个部位肉质较好\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案：C\n\n"
        "题目：在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是\n"
        "A. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案：")
    assert prompt.continuations == ["A", "B", "C", "D"]  # the bare letter, as after 答案： in the shots
    assert len(dev["agronomy"]) == 5
    files = {p.stem for p in (shared_data / "eval" / "cmmlu" / "data" / "test").glob("*.csv")}
    assert files <= set(cmmlu.SUBJECTS_ZH) and len(files) == 67  # every subject has its Chinese name
    with pytest.raises(UserError, match="unknown subject"):
        cmmlu.load_cmmlu(shared_data / "eval" / "cmmlu", subjects=["astrology"])


def test_arc_parsing_and_prompt(shared_data, tmp_path):
    pool = arc.load_arc(shared_data / "eval" / "arc_easy" / "validation.jsonl")
    assert len(pool) == 570 and pool[0].subject == "arc_easy"
    first = pool[0]
    assert (first.id, first.question, first.gold, first.labels) == (
        "MCAS_2000_4_6", "Which technology was developed most recently?", 0, ["A", "B", "C", "D"])
    assert first.choices == ["cellular telephone", "television", "refrigerator", "airplane"]
    shots = arc.other_items(pool, 1)(pool[1])
    assert shots == [first]
    p = arc.arc_prompt(pool[1], shots)
    assert p.context == ("Question: Which technology was developed most recently?\nAnswer: cellular telephone\n\n"
                         f"Question: {pool[1].question}\nAnswer:")
    assert p.continuations == [f" {c}" for c in pool[1].choices]
    assert any(it.labels[0] == "1" for it in pool)  # numeric labels are kept as labels
    f = tmp_path / "mine.jsonl"
    f.write_text('{"id": "x", "question": "q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, '
                 '"answerKey": "3"}\n\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"mine.jsonl:3: bad JSON"):
        arc.load_arc(f)
    f.write_text('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}\n')
    with pytest.raises(UserError, match="answerKey 'C'"):
        arc.load_arc(f)


# ------------------------------------------------------------------ scoring and bookkeeping
class CharScorer:
    """One token per character; every token costs 1 nat except 'B' (0.1) and 'z' (2)."""

    name, doc_start_id = "chars", 0

    def __init__(self, context: int = 10_000):
        self.context = context
        self.seen: list[list[int]] = []

    def encode(self, text):
        return [ord(c) for c in text]

    def score(self, seqs):
        from serve.engine import TokenLogprob

        self.seen += seqs
        cost = {ord("B"): -0.1, ord("z"): -2.0}
        return [[None] + [TokenLogprob(t, cost.get(t, -1.0), []) for t in s[1:]] for s in seqs]


def test_multiple_choice_predictions_and_accuracy():
    items = [MCItem("1", "s1", "q?", ["x", "y", "w", "v"], gold=1),
             MCItem("2", "s1", "q?", ["x", "y", "w", "v"], gold=0),
             MCItem("3", "s2", "q?", ["zz", "aaaaaa"], gold=1)]
    report = evaluate_multiple_choice(CharScorer(), items, cmmlu.cmmlu_prompt, lambda it: [], shots=0, task="t")
    preds = [(it["pred"], it["pred_norm"]) for it in report["items"]]
    assert preds[:2] == [(1, 1), (1, 1)]  # "B" is the cheapest letter
    assert report["items"][0]["logprobs"] == [-1.0, -0.1, -1.0, -1.0]
    s2 = evaluate_multiple_choice(CharScorer(), [items[2]], arc.arc_prompt, lambda it: [], shots=0, task="t")
    # " zz" costs 1 + 4 = 5 nats, " aaaaaa" 7: acc picks zz; per byte (2 vs 6) aaaaaa wins
    assert (s2["items"][0]["pred"], s2["items"][0]["pred_norm"]) == (0, 1)
    assert s2["overall"]["acc"] == 0.0 and s2["overall"]["acc_norm"] == 1.0
    assert report["subjects"]["s1"] == {"n": 2, "acc": 0.5, "acc_norm": 0.5, "chance": 0.25}
    assert report["subjects"]["s2"]["chance"] == 0.5
    assert report["overall"]["chance"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    table = to_markdown(report)
    assert "| s1 | 2 | 0.5000 | 0.5000 | 0.2500 |" in table and "**overall**" in table


def test_accuracy_overall_is_over_items_macro_over_subjects():
    recs = [{"subject": "a", "gold": 0, "pred": 0, "pred_norm": 1, "n_choices": 4}] * 3 + \
           [{"subject": "b", "gold": 0, "pred": 1, "pred_norm": 0, "n_choices": 5}]
    acc = accuracy(recs)
    assert acc["overall"]["acc"] == 0.75 and acc["overall"]["acc_macro"] == 0.5
    assert acc["overall"]["acc_norm"] == 0.25 and acc["subjects"]["b"]["chance"] == 0.2


def test_shots_dropped_then_left_truncation():
    items = [MCItem(str(i), "s", f"question {i}", ["a", "b"], gold=0) for i in range(4)]
    shots_of = arc.other_items(items, 3)
    full = evaluate_multiple_choice(CharScorer(), items[:1], arc.arc_prompt, shots_of, shots=3, task="t")
    assert full["items"][0]["shots"] == 3
    small = CharScorer(context=80)  # room for one shot (~45 chars) + the question
    r = evaluate_multiple_choice(small, items[:1], arc.arc_prompt, shots_of, shots=3, task="t")
    assert r["items"][0]["shots"] == 1 and not r["items"][0]["truncated"]
    assert (r["items_with_fewer_shots"], r["items_truncated"]) == (1, 0)
    tiny = CharScorer(context=12)
    r = evaluate_multiple_choice(tiny, items[:2], arc.arc_prompt, shots_of, shots=3, task="t")
    assert r["items"][0]["shots"] == 0 and r["items"][0]["truncated"]
    assert (r["items_with_fewer_shots"], r["items_truncated"]) == (2, 2)
    assert all(len(s) <= 12 for s in tiny.seen) and all(s[-2:] == [ord(" "), ord(c)] for s, c in
                                                        zip(tiny.seen, "ab"))
    assert "cut on the left" in to_markdown(r)


def test_encode_pair_like_lm_eval():
    enc = CharScorer().encode
    assert encode_pair(enc, "Answer: ", "yes") == (enc("Answer:"), enc(" yes"))  # trailing space moves

    def merging(text):  # a tokenizer that merges "：A" into one token (-1) across the boundary
        out, i = [], 0
        while i < len(text):
            merged = text.startswith("：A", i)
            out.append(-1 if merged else ord(text[i]))
            i += 2 if merged else 1
        return out

    ctx, cont = encode_pair(merging, "答案：", "A")
    assert ctx + cont == merging("答案：A") and cont == [-1]


def test_zerolm_eval_cli(tiny_model_dir, tokens_dir, shared_data, tmp_path, capsys):
    from zerolm.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("今天天气很好。\nIt is sunny today.\n", encoding="utf-8")
    out = tmp_path / "r" / "bpb.json"
    assert main(["eval", "--model", str(tiny_model_dir / "hf"), "--task", "bpb", "--data", f"mine={notes}",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["sources"]["mine"]["docs"] == 2 and report["model"] == tiny_model_dir.name
    assert report["baselines"] is None  # text only: nothing to train them on
    printed = capsys.readouterr().out
    assert "| mine | 2 |" in printed and "no n-gram baselines" in printed
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "bpb", "--data", str(tokens_dir), "--limit", "5",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert all(r["kn3_bpb"] > 0 and r["unigram_bpb"] > 0 for r in report["sources"].values())
    assert "kn3_bpb" in capsys.readouterr().out
    arc_file = str(shared_data / "eval" / "arc_easy" / "validation.jsonl")
    cmmlu_dir = str(shared_data / "eval" / "cmmlu" / "data")
    for argv, message in [(["--model", str(tmp_path), "--task", "arc", "--data", arc_file], "not a model folder"),
                          (["--task", "arc", "--data", str(tmp_path / "nope.jsonl")], "no such file"),
                          (["--task", "cmmlu"], "needs --data"),
                          (["--task", "bpb", "--data", str(notes), "--baseline-train", str(tmp_path / "no.txt")],
                           "no such file"),
                          (["--task", "cmmlu", "--data", cmmlu_dir, "--subjects", "astrology"], "unknown subject")]:
        if "--model" not in argv:
            argv = ["--model", str(tiny_model_dir)] + argv
        assert main(["eval"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("zerolm: error:") and message in err and "\n" not in err


# ------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def http(tiny_model_dir):
    from fastapi.testclient import TestClient

    from serve.server import build_app

    app = build_app([f"tiny={tiny_model_dir}"], device="cpu")
    with TestClient(app) as client:
        yield client, app.state.registry.get("tiny")


def _items(shared_data, n=3):
    items, _ = cmmlu.load_cmmlu(shared_data / "eval" / "cmmlu" / "data", subjects=["ethnology"], limit=n)
    return items, [{"id": it.id, "question": it.question, "choices": it.choices, "answer": it.labels[it.gold],
                    "subject": it.subject} for it in items]


def test_evaluations_route_matches_in_process_scoring(http, scorer, shared_data):
    client, _ = http
    texts = ["中华人民共和国成立于1949年。", "The quick brown fox jumps over the lazy dog."]
    r = client.post("/v1/evaluations", json={"model": "tiny", "task": "bpb", "texts": texts})
    assert r.status_code == 200, r.text
    direct = bpb.evaluate_bpb(scorer, {"texts": texts})
    assert r.json()["overall"]["bytes"] == direct["overall"]["bytes"]
    assert r.json()["overall"]["bpb"] == pytest.approx(direct["overall"]["bpb"], rel=1e-4)

    items, body_items = _items(shared_data)
    r = client.post("/v1/evaluations", json={"model": "tiny", "task": "multiple_choice", "items": body_items,
                                             "shots": 1, "unknown_field": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    shots_of = lambda it: [o for o in items[:2] if o is not it][:1]  # noqa: E731 (same rule as the API)
    direct = evaluate_multiple_choice(scorer, items, cmmlu.cmmlu_prompt, shots_of, shots=1, task="cmmlu")
    assert [it["pred"] for it in body["items"]] == [it["pred"] for it in direct["items"]]
    for got, want in zip(body["items"], direct["items"]):
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-3)
    assert body["overall"]["n"] == 3 and body["overall"]["chance"] == 0.25


@pytest.mark.parametrize("body,match", [
    ({"task": "multiple_choice", "dataset": "../../etc/passwd"}, "not a path"),
    ({"task": "multiple_choice", "dataset": "/work/shared/data/eval/cmmlu"}, "not a path"),
    ({"task": "multiple_choice", "dataset": "cmmlu"}, "no evaluation set named 'cmmlu'"),
    ({"task": "multiple_choice", "items": [{"question": "q", "choices": ["a", "b"], "answer": 2}]}, "answer"),
    ({"task": "multiple_choice", "items": [{"question": "q", "choices": ["a"], "answer": 0}]}, "choices"),
    ({"task": "multiple_choice", "items": [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 2001},
     "at most 2000 items"),
    ({"task": "multiple_choice"}, "exactly one of"),
    ({"task": "bpb"}, "needs 'texts'"),
    ({"task": "bpb", "texts": ["x" * 600_000, "y" * 600_000]}, "bytes"),
    ({"task": "bpb", "texts": ["ok", ""]}, r"texts\[1\] is empty"),
    ({"task": "rouge", "texts": ["x"]}, "task"),
])
def test_evaluations_bad_requests_are_400(http, body, match):
    client, _ = http
    r = client.post("/v1/evaluations", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert re.search(match, err["message"]), err["message"]


def test_named_dataset_selects_only_configured_sets(http, shared_data):
    from serve.eval.api import EvalDataset, run_evaluation
    from serve.openai_api import APIError
    from serve.schemas import EvaluationRequest

    _, served = http
    sets = {"arc": EvalDataset("arc", shared_data / "eval" / "arc_easy" / "validation.jsonl")}
    req = EvaluationRequest(model="tiny", task="multiple_choice", dataset="arc", limit=4, shots=1)
    report = run_evaluation(served, req, sets)
    assert report["task"] == "arc" and report["overall"]["n"] == 4
    assert [it["id"] for it in report["items"]][0] == "MCAS_2000_4_6"
    with pytest.raises(APIError) as exc:
        run_evaluation(served, EvaluationRequest(model="tiny", task="multiple_choice", dataset="arc_easy"), sets)
    assert exc.value.status == 400 and "configured: arc" in exc.value.message
