"""`zerolm pipeline run`: stages in the flow's order from one file, wired together, each
skipped when done (eval included: a rerun leaves its report alone), `--from`/`--until`,
a report of every stage, and a bad stage config refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zerolm.pipeline import load_pipeline, run_pipeline

pytestmark = pytest.mark.slow

TINY = {"preset": "tiny", "overrides": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}}


def pipeline_file(tmp_path, shared_data):
    stages = {  # listed out of order on purpose: the flow's order is the pipeline's
        "eval": {"limit": 5},
        "sft": {"output": str(tmp_path / "work" / "runs" / "chat"),  # a folder not named after its stage
                "data": {"paths": [str(shared_data / "sft" / "identity.json")], "seq_len": 128,
                         "micro_batch_size": 4, "placeholders": {"name": "Zero", "author": "zerolm"}},
                "max_steps": 4, "eval": {"every": 0, "generate": 0}, "checkpoint": {"every": 0},
                "scaling": {"launcher": "local"}},
        "data": {"read": {"inputs": [{"path": str(shared_data / "pretrain" / "zh" / "news_sentences.txt"),
                                      "source": "news"},
                                     {"path": str(shared_data / "pretrain" / "en" / "wiki_demo.txt"),
                                      "source": "wiki"}]}},
        "tokenizer": {"vocab_size": 1024},
        "pack": {"val_fraction": 0.05},
        "pretrain": {"model": TINY, "data": {"seq_len": 128, "micro_batch_size": 4}, "max_steps": 6,
                     "eval": {"every": 0, "max_windows": 2}, "checkpoint": {"every": 0},
                     "scaling": {"launcher": "local"}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"workdir": str(tmp_path / "work"), "stages": stages}))  # JSON is YAML
    return path


def test_stages_run_in_order_skip_when_done_and_report(ray_session, shared_data, tmp_path):
    cfg = load_pipeline(str(pipeline_file(tmp_path, shared_data)))
    work = tmp_path / "work"
    first = run_pipeline(cfg, until="pack", echo=lambda *_: None)
    assert [r["stage"] for r in first] == ["data", "tokenizer", "pack"]
    assert all(r["status"] == "ran" for r in first) and not (work / "runs").exists()
    assert first[0]["rows_out"] > 0 and first[2]["train_tokens"] > 0

    second = run_pipeline(cfg, echo=lambda *_: None)
    assert [(r["stage"], r["status"]) for r in second] == [
        ("data", "skipped (done)"), ("tokenizer", "skipped (done)"), ("pack", "skipped (done)"),
        ("pretrain", "ran"), ("sft", "ran"), ("eval", "ran")]
    # wired: sft started from pretrain, eval evaluated the last model on the pipeline's tokens
    sft_run = json.loads((work / "runs" / "chat" / "run.json").read_text())
    assert sft_run["config"]["init_from"] == str(work / "runs" / "pretrain")
    report = json.loads((work / "eval" / "bpb.json").read_text())
    assert report["model"] == "chat"  # eval took the last model, wherever its folder is
    assert report["overall"]["bpb"] > 0 and second[-1]["bpb"] == report["overall"]["bpb"]
    assert json.loads((work / "report.json").read_text()) == second

    stamp = (work / "eval" / "bpb.json").stat().st_mtime_ns
    third = run_pipeline(cfg, start="pretrain", echo=lambda *_: None)
    assert [(r["stage"], r["status"]) for r in third] == [
        ("pretrain", "skipped (done)"), ("sft", "skipped (done)"), ("eval", "skipped (done)")]
    assert (work / "eval" / "bpb.json").stat().st_mtime_ns == stamp  # a rerun does not rewrite the report


def test_a_bad_stage_config_is_refused_before_anything_runs(shared_data, tmp_path):
    path = pipeline_file(tmp_path, shared_data)
    r = subprocess.run([sys.executable, "-m", "zerolm", "pipeline", "run", str(path),
                        "--set", "stages.sft.optim.lr_typo=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "stage sft" in r.stderr and "lr_typo" in r.stderr, r.stderr
    assert not (tmp_path / "work" / "clean").exists()
    r = subprocess.run([sys.executable, "-m", "zerolm", "pipeline", "run", str(path), "--from", "sft",
                        "--until", "pack"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "comes after" in r.stderr
    path.write_text(json.dumps({"stages": {"dedup": {}}}))
    r = subprocess.run([sys.executable, "-m", "zerolm", "pipeline", "run", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown stage" in r.stderr


def test_only_old_eval_reports_are_recomputed_never_a_users_files(tmp_path):
    from zerolm.pipeline import _old_eval_reports

    old = tmp_path / "eval"
    old.mkdir()
    (old / "bpb.json").write_text(json.dumps({"task": "bpb", "model": "demo", "overall": {}}))
    assert _old_eval_reports(old) == [old / "bpb.json"]
    (old / "notes.json").write_text(json.dumps({"mine": True}))  # a user's file: the folder is not ours
    assert _old_eval_reports(old) == []
