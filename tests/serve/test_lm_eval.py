"""lm-evaluation-harness's `local-completions` model against `zerolm serve` (a real
server in a subprocess) on a local CMMLU subset gives the same per-item choices as
`zerolm eval` on the same items, from the same prompt.

The lm-eval task is a YAML in tmp_path over the CSVs converted to JSONL, written to
reproduce the official CMMLU prompt that serve/eval/cmmlu.py builds: the subject
header as `description`, shots `题目：...答案：X` separated by blank lines, and the
bare letter as continuation (target_delimiter "").
"""

from __future__ import annotations

import csv
import json

import pytest

from tests.serve.serving import start_server, wait_healthy

lm_eval = pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.slow

SUBJECTS = ("ethnology", "business_ethics")  # short questions: 2-shot prompts fit a 256-token context
SHOTS = 2
ITEMS_PER_SUBJECT = 6


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, base = start_server(tiny_model_dir, "--device", "cpu", log=log)
    try:
        wait_healthy(proc, base, log=log)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _rows(path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _subset(shared_data, tiny_model_dir, root) -> dict[str, list[str]]:
    """Copy SHOTS dev rows and the first test rows whose SHOTS-shot prompt fits into
    root/cmmlu/{dev,test}/<subject>.csv, and the same rows as JSONL for lm-eval."""
    from tokenizers import Tokenizer

    from serve.eval.cmmlu import cmmlu_prompt
    from serve.eval.exams import read_subject
    from serve.eval.multiple_choice import encode_pair

    tok = Tokenizer.from_file(str(tiny_model_dir / "hf" / "tokenizer.json"))
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    src = shared_data / "eval" / "cmmlu" / "data"
    chosen = {}
    for subject in SUBJECTS:
        shots = read_subject(src / "dev" / f"{subject}.csv", subject)[0][:SHOTS]
        rows = _rows(src / "test" / f"{subject}.csv")
        keep = []
        for item, row in zip(read_subject(src / "test" / f"{subject}.csv", subject)[0], rows[1:]):
            ctx, cont = encode_pair(encode, cmmlu_prompt(item, shots).context, "A")
            if len(ctx) + len(cont) < 256:  # lm-eval asks for one generated token on top
                keep.append(row)
            if len(keep) == ITEMS_PER_SUBJECT:
                break
        dev_rows = _rows(src / "dev" / f"{subject}.csv")[:SHOTS + 1]
        for split, table in (("dev", dev_rows), ("test", [rows[0]] + keep)):
            (root / "cmmlu" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "cmmlu" / split / f"{subject}.csv", "w", encoding="utf-8", newline="") as fh:
                csv.writer(fh).writerows(table)
            with open(root / "jsonl" / f"{subject}_{split}.jsonl", "w", encoding="utf-8") as fh:
                for r in table[1:]:
                    fh.write(json.dumps(dict(zip(["id", "Question", "A", "B", "C", "D", "Answer"], r)),
                                        ensure_ascii=False) + "\n")
        chosen[subject] = [r[0] for r in keep]
    return chosen


def _task_yamls(root) -> list[str]:
    from serve.eval.cmmlu import HEADER, subject_zh

    names = []
    for subject in SUBJECTS:
        name = f"zl_cmmlu_{subject}"
        cfg = {
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(root / "jsonl" / f"{subject}_{split}.jsonl")
                                              for split in ("dev", "test")},
                               "cache_dir": str(root / "hf_datasets")},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": HEADER.format(subject=subject_zh(subject)),
            "doc_to_text": "题目：{{Question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "{{['A', 'B', 'C', 'D'].index(Answer)}}",
            "target_delimiter": "", "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (root / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        names.append(name)
    return names


def test_lm_eval_local_completions_matches_zerolm_eval(server, tiny_model_dir, shared_data, tmp_path,
                                                       monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from serve.eval.cmmlu import cmmlu_prompt, load_cmmlu
    from zerolm.cli import main

    for d in ("jsonl", "tasks"):
        (tmp_path / d).mkdir()
    chosen = _subset(shared_data, tiny_model_dir, tmp_path)
    assert all(len(v) >= 3 for v in chosen.values()), chosen
    tasks = _task_yamls(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # zerolm eval on the CSV subset, in-process
    out = tmp_path / "zerolm.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "cmmlu", "--data", str(tmp_path / "cmmlu"),
                 "--shots", str(SHOTS), "--output", str(out)]) == 0
    ours = {it["id"]: it for it in json.loads(out.read_text(encoding="utf-8"))["items"]}
    assert all(it["shots"] == SHOTS and not it["truncated"] for it in ours.values())

    results = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server}/v1/completions", "model": "tiny", "tokenizer_backend": "huggingface",
                    "tokenizer": str(tiny_model_dir / "hf"), "tokenized_requests": True, "max_length": 256,
                    "num_concurrent": 1, "max_retries": 1},
        tasks=tasks, task_manager=TaskManager(include_path=str(tmp_path / "tasks")), num_fewshot=SHOTS,
        log_samples=True, bootstrap_iters=0)

    items, dev = load_cmmlu(tmp_path / "cmmlu")
    by_id = {it.id: it for it in items}
    compared = 0
    for subject, name in zip(SUBJECTS, tasks):
        samples = results["samples"][name]
        assert len(samples) == len(chosen[subject])
        for s in samples:
            item_id = f"{subject}/{s['doc']['id']}"
            # the same prompt: lm-eval's context is the one zerolm eval built
            context = s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else None
            if context is None:  # newer lm-eval logs arguments as dicts
                context = s["arguments"]["gen_args_0"]["arg_0"]
            assert context == cmmlu_prompt(by_id[item_id], dev[subject][:SHOTS]).context
            lls = [r[0] for r in s["filtered_resps"]]
            pred = max(range(len(lls)), key=lambda i: lls[i])
            assert pred == ours[item_id]["pred"], (item_id, lls, ours[item_id]["logprobs"])
            # not just the argmax: the same log-likelihoods (float noise from batching aside)
            assert lls == pytest.approx(ours[item_id]["logprobs"], abs=1e-3)
            compared += 1
    assert compared == sum(len(v) for v in chosen.values())
