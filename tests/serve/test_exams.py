"""Exam benchmarks (serve/eval/exams.py): CMMLU, C-Eval and MMLU read from every layout
their distributions ship in (small fixtures written here in those layouts), each in its
own prompt; `zerolm serve --eval-set` scores a named set exactly as `zerolm eval` does."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve.eval.ceval import CEVAL
from serve.eval.cmmlu import CMMLU
from serve.eval.exams import find_files, load_exam
from serve.eval.mmlu import MMLU
from serve.eval.run import evaluate
from zerolm.errors import UserError

Q = [("一加一等于几？", ["1", "2", "3", "4"], 1), ("中国的首都是哪里？", ["上海", "广州", "北京", "深圳"], 2),
     ("水的化学式是？", ["H2O", "CO2", "O2", "NaCl"], 0)]
EN = [("What is 2 + 2?", ["3", "4", "5", "6"], 1), ("Which is a prime?", ["4", "6", "7", "9"], 2),
      ("H2O is", ["water", "salt", "sugar", "gold"], 0)]
SPLITS = {"dev": slice(0, 2), "val": slice(2, 3), "test": slice(0, 3)}


def _csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)


def ceval_zip(root, subjects=("accountant", "computer_network")):
    """The official ceval-exam.zip: {dev,val,test}/<subject>_<split>.csv; test without answers."""
    for subject in subjects:
        for split, part in SPLITS.items():
            if split == "test":
                _csv(root / split / f"{subject}_{split}.csv", ["id", "question", "A", "B", "C", "D"],
                     [[i, q, *c] for i, (q, c, _) in enumerate(Q[part])])
            else:
                _csv(root / split / f"{subject}_{split}.csv", ["id", "question", "A", "B", "C", "D", "answer",
                                                              "explanation"],
                     [[i, q, *c, "ABCD"[g], ""] for i, (q, c, g) in enumerate(Q[part])])


def ceval_hf(root, subjects=("accountant", "computer_network")):
    """ceval/ceval-exam on Hugging Face: <subject>/<split>-00000-of-00001.parquet; test answer ""."""
    for subject in subjects:
        for split, part in SPLITS.items():
            rows = [{"id": i, "question": q, **dict(zip("ABCD", c)), "answer": "" if split == "test" else "ABCD"[g],
                     "explanation": ""} for i, (q, c, g) in enumerate(Q[part])]
            (root / subject).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), root / subject / f"{split}-00000-of-00001.parquet")


def mmlu_tar(root, subject="abstract_algebra"):
    """The official data.tar: data/{dev,val,test}/<subject>_<split>.csv, no header row."""
    for split, part in SPLITS.items():
        _csv(root / "data" / split / f"{subject}_{split}.csv", None, [[q, *c, "ABCD"[g]] for q, c, g in EN[part]])


def mmlu_hf(root, subject="abstract_algebra"):
    """cais/mmlu: <subject>/{dev,validation,test}-00000-of-00001.parquet, choices a list,
    answer an index; all/ repeats every subject and must not count twice."""
    for folder in (subject, "all"):
        for split, part in (("dev", SPLITS["dev"]), ("validation", SPLITS["val"]), ("test", SPLITS["test"])):
            rows = [{"question": q, "subject": subject, "choices": c, "answer": g} for q, c, g in EN[part]]
            (root / folder).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), root / folder / f"{split}-00000-of-00001.parquet")


def cmmlu_jsonl(root, subject="agronomy"):
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / f"{subject}.jsonl").write_text("".join(
            json.dumps({"Question": q, **dict(zip("ABCD", c)), "Answer": "ABCD"[g]}, ensure_ascii=False) + "\n"
            for q, c, g in Q[SPLITS[split]]), encoding="utf-8")


def _triples(items):
    return [(it.subject, it.question, it.choices, it.gold) for it in items]


def test_ceval_zip_and_hf_layouts_read_the_same_items_and_score_val(tmp_path):
    ceval_zip(tmp_path / "zip")
    ceval_hf(tmp_path / "hf")
    got = {}
    for layout in ("zip", "hf"):
        items, dev, info = load_exam(CEVAL, tmp_path / layout)
        assert info["split"] == "val" and "no answers for its test split" in info["note"]
        assert [len(dev[s]) for s in sorted(dev)] == [2, 2]
        got[layout] = _triples(items)
    assert got["zip"] == got["hf"] == [(s, *Q[2]) for s in ("accountant", "computer_network")]
    with pytest.raises(UserError, match="no answers in the test split.*--split val"):
        load_exam(CEVAL, tmp_path / "hf", split="test")
    items, dev, _ = load_exam(CEVAL, tmp_path / "zip", subjects=["accountant"])
    prompt = CEVAL.prompt(items[0], dev["accountant"][:1])
    assert prompt.context == ("以下是中国关于注册会计师考试的单项选择题，请选出其中的正确答案。\n\n"
                              "一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
                              "水的化学式是？\nA. H2O\nB. CO2\nC. O2\nD. NaCl\n答案：")
    assert prompt.continuations == ["A", "B", "C", "D"]


def test_mmlu_tar_and_hf_layouts_and_prompt(tmp_path):
    mmlu_tar(tmp_path / "tar")
    mmlu_hf(tmp_path / "hf")
    a, dev, info = load_exam(MMLU, tmp_path / "tar")
    b, _, _ = load_exam(MMLU, tmp_path / "hf")
    assert info == {"split": "test"} and _triples(a) == _triples(b) == [("abstract_algebra", *e) for e in EN]
    assert set(find_files(tmp_path / "hf")["test"]) == {"abstract_algebra"}  # all/ skipped
    prompt = MMLU.prompt(a[1], dev["abstract_algebra"][:1])
    assert prompt.context == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                              "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                              "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:")
    assert prompt.continuations == [" A", " B", " C", " D"]


def test_cmmlu_jsonl_export_matches_the_csvs(shared_data, tmp_path):
    cmmlu_jsonl(tmp_path / "j")
    items, dev, info = load_exam(CMMLU, tmp_path / "j")
    assert info == {"split": "test"} and _triples(items) == [("agronomy", *q) for q in Q]
    assert CMMLU.prompt(items[0], []).context.startswith("以下是关于农学的单项选择题")
    official, _, _ = load_exam(CMMLU, shared_data / "eval" / "cmmlu", subjects=["agronomy"], limit=3)
    assert [it.id for it in official] == ["agronomy/0", "agronomy/1", "agronomy/2"]


def test_bad_rows_and_wrong_task_are_clear_errors(tmp_path):
    ceval_zip(tmp_path / "c")
    _csv(tmp_path / "c" / "val" / "accountant_val.csv", ["id", "question", "A", "B", "answer"], [[1, "q", "x", "y", "E"]])
    with pytest.raises(UserError, match=r"accountant_val.csv:2: answer 'E'"):
        load_exam(CEVAL, tmp_path / "c")
    with pytest.raises(UserError, match="no exam files"):
        load_exam(MMLU, tmp_path / "c" / "dev")
    ceval_zip(tmp_path / "ok")
    with pytest.raises(UserError, match="these are ceval subjects.*--task ceval"):
        evaluate(None, "cmmlu", [str(tmp_path / "ok")], split="val")


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from serve.engine import Engine
    from serve.eval.scorer import EngineScorer
    from serve.loading import load_model

    return EngineScorer(Engine(load_model("tiny", tiny_model_dir, device="cpu")))


def test_eval_set_on_the_server_gives_zerolm_evals_answers(tiny_model_dir, scorer, tmp_path):
    from fastapi.testclient import TestClient

    from serve.server import build_app

    ceval_hf(tmp_path / "ceval-exam")
    mmlu_tar(tmp_path / "mmlu")
    with pytest.raises(UserError, match="cannot tell which benchmark"):
        build_app([f"tiny={tiny_model_dir}"], device="cpu", eval_sets=[f"mine={tmp_path / 'mmlu'}"])
    with pytest.raises(UserError, match="no such file"):
        build_app([f"tiny={tiny_model_dir}"], device="cpu", eval_sets=[f"x={tmp_path / 'nope'}"])
    app = build_app([f"tiny={tiny_model_dir}"], device="cpu",
                    eval_sets=[f"ceval={tmp_path / 'ceval-exam'}", f"mine=mmlu:{tmp_path / 'mmlu'}"])
    with TestClient(app) as client:
        for name, task, path in (("ceval", "ceval", "ceval-exam"), ("mine", "mmlu", "mmlu")):
            r = client.post("/v1/evaluations", json={"model": "tiny", "task": "multiple_choice", "dataset": name,
                                                     "shots": 2})
            assert r.status_code == 200, r.text
            local = evaluate(scorer, task, [str(tmp_path / path)], shots=2)
            body = r.json()
            assert body["task"] == task and len(body["items"]) == len(local["items"]) > 0
            assert [it["pred"] for it in body["items"]] == [it["pred"] for it in local["items"]]
            for got, want in zip(body["items"], local["items"]):
                assert got["id"] == want["id"] and got["shots"] == want["shots"] == 2
                assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-3)
