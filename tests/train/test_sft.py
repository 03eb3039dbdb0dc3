"""`zerolm train sft` through the stage runner on real Ray Train + DeepSpeed ZeRO-2 (2 CPU
workers): metrics, held-out evaluation through the serving engine, the chat export
that transformers loads and `zerolm serve` chats with, resume after a killed worker,
and bad input as one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
import torch

from tests.serve.serving import start_server, wait_healthy
from train.checkpoint import list_checkpoints
from train.metrics import read_metrics
from train.runner import run_stage
from train.sft import SFTConfig
from zerolm.errors import UserError


def config(init, shared_data, out, **kw) -> SFTConfig:
    base = {
        "output": str(out), "init_from": str(init),
        "data": {"paths": [str(shared_data / "sft" / "*.json"), str(shared_data / "sft" / "*.jsonl")],
                 "seq_len": 256, "micro_batch_size": 4, "grad_accum": 2, "val_max": 32,
                 "placeholders": {"name": "Zero", "author": "zerolm"}},
        "optim": {"lr": 2e-3}, "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2}, "max_steps": 6, "log_every": 1,
        "eval": {"every": 3, "generate": 8, "max_new_tokens": 16}, "checkpoint": {"every": 3},
    }
    for key, value in kw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return SFTConfig.model_validate(base)


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir, "train")]


@pytest.fixture(scope="module")
def sft_run(ray_session, tiny_model_dir, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    return out, run_stage("sft", config(tiny_model_dir, shared_data, out), echo=lambda *_: None)


def test_metrics_data_and_lineage(sft_run, tiny_model_dir):
    from train.weights import weights_sha256

    out, result = sft_run
    rows = read_metrics(out, "train")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["count"] > 0 and 0 <= r["padding"] < 0.5 and 0 < r["trained_share"] < 1 for r in rows)
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["val/loss"] > 0 and 0 <= e["val/end_rate"] <= 1 and e["val/answer_tokens"] > 0 for e in evals)
    assert result["eval"]["val/loss"] == evals[-1]["val/loss"]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] + 1.0
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "sft" and run["inputs"]["init"]["weights_sha256"] == weights_sha256(tiny_model_dir / "hf")
    assert len(run["inputs"]["data"]) == 4 and all(len(f["sha256"]) == 64 for f in run["inputs"]["data"])
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["records_in"] == (stats["train_examples"] + stats["val_examples"] + stats["rejected"]
                                   + stats["dropped"]) == 2123
    assert stats["dropped_by_reason"]["too_long"] > 0  # seq_len 256: long answers cannot be cut mid-turn
    assert stats["unfilled_placeholders"] == {}
    assert json.loads((out / "_SUCCESS").read_text())["stage"] == "sft"


def test_chat_export_loads_in_transformers(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.chat import ChatTokenizer
    from train.weights import load_transformer

    out, _ = sft_run
    tok = AutoTokenizer.from_pretrained(out / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert tok.eos_token == "<|im_end|>" and hf.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    msgs = [{"role": "user", "content": "北京是哪个国家的首都？"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == ChatTokenizer(out / "hf").prompt_ids(msgs)
    ours = load_transformer(out / "hf")
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4


def test_served_as_chat(sft_run, tmp_path):
    out, _ = sft_run
    proc, url = start_server(out, log=tmp_path / "server.log")
    try:
        wait_healthy(proc, url, log=tmp_path / "server.log")
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Describe a process of making crepes."}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_rerun_is_noop_and_other_config_refused(sft_run, tiny_model_dir, shared_data):
    out, result = sft_run
    assert run_stage("sft", config(tiny_model_dir, shared_data, out), echo=lambda *_: None) == result
    with pytest.raises(UserError, match="another config"):
        run_stage("sft", config(tiny_model_dir, shared_data, out, optim={"lr": 1e-3}), echo=lambda *_: None)


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_losses(sft_run, tiny_model_dir, shared_data, tmp_path, monkeypatch):
    ref_dir, _ = sft_run
    out = tmp_path / "run"
    monkeypatch.setenv("ZEROLM_CRASH_AT_STEP", "4")  # after step 4; the last checkpoint is step 3
    monkeypatch.setenv("ZEROLM_CRASH_MARKER", str(tmp_path / "crashed"))
    with pytest.raises(Exception):
        run_stage("sft", config(tiny_model_dir, shared_data, out), echo=lambda *_: None)
    assert (tmp_path / "crashed").exists() and [s for s, _ in list_checkpoints(out)] == [3]
    # another number of workers cannot continue its optimizer shards and data positions
    with pytest.raises(UserError, match="started with 2 workers and this run asks for 1"):
        run_stage("sft", config(tiny_model_dir, shared_data, out, scaling={"num_workers": 1}), echo=lambda *_: None)
    run_stage("sft", config(tiny_model_dir, shared_data, out), echo=lambda *_: None)
    assert losses(out) == losses(ref_dir)  # bit-identical: the data position is the step


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zerolm", "train", "sft", *args, "--set", "scaling.launcher=local",
                           "--set", "max_steps=1", "--set", "data.seq_len=128"], capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_exit_2(tiny_model_dir, shared_data, tmp_path):
    data = str(shared_data / "sft" / "identity.json")
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir / "hf", no_template)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "junk.jsonl").write_text('{"text": "not a conversation"}\n{"oops\n')
    cases = [
        (["--init", str(tmp_path / "nothing"), "--data", data], "does not exist"),
        (["--init", str(no_template), "--data", data], "no chat template"),
        (["--init", str(tiny_model_dir), "--data", str(tmp_path / "junk.jsonl")], "no usable SFT example"),
        (["--init", str(tiny_model_dir), "--data", str(tmp_path / "*.parquet")], "no data file matches"),
        (["--init", str(tiny_model_dir)], "no SFT data"),
    ]
    for args, message in cases:
        r = _cli(*args, "--output", str(tmp_path / "run"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr[-1500:])
    assert not (tmp_path / "run").exists()
