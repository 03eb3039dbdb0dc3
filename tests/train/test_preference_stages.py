"""`zerolm train reward`, `zerolm train dpo` and `zerolm data prefs` on real Ray Train +
DeepSpeed ZeRO-2 (2 CPU workers) and real preference data with bad pairs mixed in:
accounting, finite losses, the reward model's transformers export and HTTP scoring,
the reference never trained (and precomputing it changes nothing), resumable pairs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import httpx
import pyarrow.parquet as pq
import pytest
import torch

from tests.serve.serving import start_server, wait_healthy
from train.metrics import read_metrics
from train.runner import run_stage

BAD = [
    ({"conversations": [{"from": "human", "value": "Say hi."}], "chosen": {"from": "gpt", "value": "Hi!"},
      "rejected": {"from": "gpt", "value": "Hi!"}}, "identical_pair"),
    ({"prompt": "Say hi.", "chosen": "", "rejected": "Go away."}, "empty_chosen"),
    ({"prompt": "Say hi.", "chosen": "Hello!"}, "missing_field"),
    ({"question": "no pair here"}, "unknown_format"),
    ({"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Bye.", "margin": "big"}, "bad_margin"),
]


@pytest.fixture(scope="module")
def pairs_file(shared_data, tmp_path_factory):
    """80 real pairs (zh + en) with bad records and one prompt too long for seq_len mixed in."""
    real = []
    for name in ("dpo_zh_demo.json", "dpo_en_demo.json"):
        real += json.loads((shared_data / "preference" / name).read_text(encoding="utf-8"))[:40]
    lines = [json.dumps(r, ensure_ascii=False) for r in real]
    for k, (bad, _) in enumerate(BAD):
        lines.insert(7 * k + 3, json.dumps(bad))
    lines.insert(20, json.dumps({"prompt": "重复 " * 400, "chosen": "好。", "rejected": "不好。"}, ensure_ascii=False))
    lines.insert(30, '{"prompt": "broken json", ')
    path = tmp_path_factory.mktemp("prefdata") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stage_cfg(kind, init, pairs, out, **kw) -> dict:
    base = {"output": str(out), "init_from": str(init),
            "data": {"paths": [str(pairs)], "seq_len": 128, "micro_batch_size": 2, "val_fraction": 0.15, "val_min": 4},
            "optim": {"lr": 1e-4}, "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            "scaling": {"num_workers": 2}, "max_steps": 6, "log_every": 1,
            "eval": {"every": 3, "at_start": True}, "checkpoint": {"every": 3}}
    for key, value in kw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    from train.stages import get_stage

    return get_stage(kind).config.model_validate(base)


@pytest.fixture(scope="module")
def reward_run(ray_session, sft_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "run"
    result = run_stage("reward", stage_cfg("reward", sft_model_dir, pairs_file, out, reward={"center": 0.01}),
                       echo=lambda *_: None)
    return out, result


@pytest.fixture(scope="module")
def dpo_run(ray_session, sft_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = stage_cfg("dpo", sft_model_dir, pairs_file, out, data={"prompt_truncation": "drop"})
    return out, run_stage("dpo", cfg, echo=lambda *_: None)


def _accounting(out, records: int, long_prompt: str) -> dict:
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["records_in"] == records == (stats["train_pairs"] + stats["val_pairs"] + stats["rejected"]
                                              + stats["dropped"])
    reasons = sorted(json.loads(line)["reason"] for line in (out / "data" / "rejects.jsonl").read_text().splitlines())
    assert reasons == sorted([r for _, r in BAD] + ["bad_json"])
    if long_prompt == "cut":  # the default: its last seq_len // 2 tokens stay, next to the answers
        assert stats["prompts_cut"] >= 1 and "prompt_too_long" not in stats["dropped_by_reason"]
    else:
        assert stats["dropped_by_reason"]["prompt_too_long"] >= 1 and stats["prompts_cut"] == 0
    return stats


def test_reward_metrics_accounting_and_finite_loss(reward_run):
    out, result = reward_run
    _accounting(out, 80 + len(BAD) + 2, "cut")
    rows = read_metrics(out, "train")
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [0, 3, 6]
    for key in ("val/accuracy", "val/margin", "val/chosen", "val/rejected", "val/loss"):
        assert all(math.isfinite(e[key]) for e in evals), key
    assert result["eval"]["val/accuracy"] == evals[-1]["val/accuracy"]


def test_reward_export_scores_like_transformers(reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train.reward_model import RewardScorer

    out, _ = reward_run
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    convs = [[{"role": "user", "content": "北京是哪个国家的首都？"}, {"role": "assistant", "content": "中国。"}],
             [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."}]]
    ours = RewardScorer(out / "hf").score(convs)
    with torch.no_grad():
        for conv, score in zip(convs, ours):
            ids = tok.apply_chat_template(conv, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert abs(hf(torch.tensor([list(ids)])).logits[0, 0].item() - score) < 1e-4


def test_reward_model_is_served_on_v1_rewards(reward_run, tmp_path):
    from train.reward_model import RewardScorer

    out, _ = reward_run
    conv = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."}]
    proc, url = start_server(out, log=tmp_path / "server.log")
    try:
        wait_healthy(proc, url, log=tmp_path / "server.log")
        r = httpx.post(url + "/v1/rewards", json={"model": "tiny", "messages": conv}, timeout=60)
        assert r.status_code == 200, r.text
        assert abs(r.json()["data"][0]["score"] - RewardScorer(out / "hf").score([conv])[0]) < 1e-5
        bad = httpx.post(url + "/v1/rewards", json={"model": "tiny", "messages": conv[:1]}, timeout=60)
        assert bad.status_code == 400 and "assistant" in bad.json()["error"]["message"]
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": conv[:1]}, timeout=60)
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "reward_model"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dpo_trains_the_policy_not_the_reference(dpo_run, sft_model_dir):
    from train.weights import load_transformer

    out, result = dpo_run
    _accounting(out, 80 + len(BAD) + 2, "dropped")
    rows = read_metrics(out, "train")
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    evals = read_metrics(out, "eval")
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["val/reward_accuracy"] == 0 and abs(first["val/kl_chosen"]) < 1e-6
    assert abs(first["val/loss"] - math.log(2)) < 1e-5  # policy == reference: every pair at log 2
    assert last["val/kl_chosen"] > 1e-6 and last["val/loss"] != first["val/loss"]
    for key in ("val/margin", "val/rewards/chosen", "val/rewards/rejected", "val/logp_accuracy"):
        assert math.isfinite(last[key]), key
    # the export is the policy, a chat model; the SFT weights it started from are unchanged
    policy, sft = load_transformer(out / "hf"), load_transformer(sft_model_dir / "hf")
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), sft.state_dict().values()))
    assert json.loads((out / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_precomputed_reference_gives_the_same_losses(sft_model_dir, pairs_file, tmp_path):
    local = {"scaling": {"launcher": "local", "num_workers": 1}, "deepspeed": {"zero_stage": 0},
             "max_steps": 4, "eval": {"every": 0, "at_start": False}}
    live = stage_cfg("dpo", sft_model_dir, pairs_file, tmp_path / "live", **local)
    pre = stage_cfg("dpo", sft_model_dir, pairs_file, tmp_path / "pre", dpo={"precompute_ref": True}, **local)
    run_stage("dpo", live, echo=lambda *_: None)
    run_stage("dpo", pre, echo=lambda *_: None)
    a, b = read_metrics(tmp_path / "live", "train"), read_metrics(tmp_path / "pre", "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert (tmp_path / "pre" / "data" / "ref_logps_train.npy").is_file()


@pytest.mark.parametrize("loss", ["ipo", "robust", "simpo"])
def test_other_losses_run_finite(sft_model_dir, pairs_file, tmp_path, loss):
    cfg = stage_cfg("dpo", sft_model_dir, pairs_file, tmp_path / loss, max_steps=2,
                    dpo={"loss": loss, "label_smoothing": 0.1 if loss == "robust" else 0.0},
                    scaling={"launcher": "local", "num_workers": 1}, deepspeed={"zero_stage": 0},
                    eval={"every": 0, "at_start": False})
    result = run_stage("dpo", cfg, echo=lambda *_: None)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / loss, "train"))
    assert math.isfinite(result["eval"]["val/loss"])


def test_prefs_pairs_resume_and_feed_dpo(sft_model_dir, shared_data, tmp_path):
    from train.prefs import PrefsConfig, run_prefs
    from train.preferences import to_pair

    prompts = tmp_path / "prompts.jsonl"
    rows = json.loads((shared_data / "sft" / "identity.json").read_text())[:24]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"instruction": 3}\n')
    cfg = PrefsConfig(model=str(sft_model_dir), prompts=[str(prompts)], output=str(tmp_path / "prefs"), samples=2,
                      max_new_tokens=48, chunk=8, batch=16)
    stats = run_prefs(cfg, echo=lambda *_: None)
    assert stats["records_in"] == 25 and stats["rejected"] == 1 and stats["candidates"] == 48
    assert stats["pairs_out"] + stats["dropped"] == 48 and stats["pairs_out"] > 0
    table = pq.read_table(tmp_path / "prefs" / "pairs").to_pylist()
    for row in table:
        pair = to_pair(row)
        assert pair.chosen != pair.rejected and pair.prompt[-1]["role"] == "user"
    # an interruption after the second part: the rerun writes the same pairs
    out = tmp_path / "prefs"
    (out / "_SUCCESS").unlink()
    (out / "pairs" / "part-00002.parquet").unlink()
    (out / "progress" / "part-00002.json").unlink()
    again = run_prefs(cfg, echo=lambda *_: None)
    assert again == stats and pq.read_table(out / "pairs").to_pylist() == table
    assert run_prefs(cfg, echo=lambda *_: None) == stats  # finished: nothing to do


def test_prefs_reward_filter_keeps_only_agreeing_pairs(sft_model_dir, reward_run, shared_data, tmp_path):
    from train.prefs import PrefsConfig, run_prefs

    rm, _ = reward_run
    cfg = PrefsConfig(model=str(sft_model_dir), prompts=[str(shared_data / "sft" / "identity.json")], samples=1,
                      output=str(tmp_path / "prefs"), max_new_tokens=48, reward=str(rm))
    stats = run_prefs(cfg, echo=lambda *_: None)
    rows = pq.read_table(tmp_path / "prefs" / "pairs").to_pylist()
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows) and len(rows) == stats["pairs_out"]
    assert stats["pairs_out"] + stats["dropped"] == stats["candidates"] == 91


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zerolm", *args], capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_exit_2(sft_model_dir, pairs_file, tmp_path):
    sft = str(sft_model_dir)
    cases = [
        (["train", "dpo", "--init", str(tmp_path / "nothing"), "--data", str(pairs_file)], "does not exist"),
        (["train", "reward", "--init", sft], "no preference data"),
        (["train", "dpo", "--init", sft, "--data", str(pairs_file), "--set", "dpo.loss=kto"], "dpo.loss"),
        (["train", "dpo", "--init", sft, "--data", str(pairs_file), "--set", "dpo.label_smoothing=0.1"], "cdpo"),
        (["data", "prefs", "--model", sft, "--prompts", str(pairs_file), "--reward", sft], "not a reward model"),
    ]
    for args, message in cases:
        extra = ["--set", "data.seq_len=128"] if args[0] == "train" else []
        r = _cli(*args, *extra, "--output", str(tmp_path / "out"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr[-1500:])
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
