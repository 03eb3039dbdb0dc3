#!/usr/bin/env python3
"""GRPO step throughput on CPU: zerolm's GRPO step (rollout through the serving engine
on a copy of the current weights: batched, KV-cached; then the update in a DeepSpeed
engine, the loop's `train_step`) against trl's `GRPOTrainer` (HF `generate`, no vLLM),
on the same model shape and initial weights, the same prompts, the same group size G,
the same completion length, a frozen reference with the same KL coefficient, the same
rule reward, in one process with the same torch threads, one after the other.

From random initial weights the end token is rarely sampled: our completions all run
to the full length (asserted); trl's occasionally stop early (about 63 of 64 tokens on
average), which if anything favours trl. Generated tokens/s counts prompts x G x
max_new per step for both. Reported: steps/s, generated tokens/s, and ours / trl.

    python3 bench/rl_step.py --threads 2 --steps 4 --prompts 4 --group 4 --new 64
"""

from __future__ import annotations

import argparse
import os

from common import DEFAULT_DATA, side_by_side
from sft_step import hf_model, time_train_steps, tokenizer_dir, trl_window

import torch  # noqa: E402


def prompts(n: int) -> list[dict]:
    from train.rewards import arithmetic_problems

    return arithmetic_problems(n, seed=0)


def bench_ours(args, probs, tok_dir, mcfg, init_state, precision: str) -> dict:
    from train.chat import ChatTokenizer
    from train.distributed import setup
    from train.export_hf import from_hf_state_dict
    from train.grpo import GRPOConfig, GRPOTask
    from train.loop import build_engine, prepare_frozen
    from train.model import Transformer
    from train.rl import Prompts

    chat = ChatTokenizer(tok_dir)
    items = [{"messages": [{"role": "user", "content": p["prompt"]}], "record": {"answer": p["answer"]},
              "ids": chat.prompt_ids([{"role": "user", "content": p["prompt"]}])} for p in probs]
    ctx = setup(False)
    n = args.prompts * args.group
    cfg = GRPOConfig.model_validate({
        "output": "/tmp/unused", "init_from": "/tmp/unused", "reward": "format", "reward_max_tokens": args.new,
        "data": {"seq_len": 128 + args.new, "micro_batch_size": n},
        "rollout": {"prompts": args.prompts, "samples": args.group, "max_new_tokens": args.new},
        "policy": {"kl_coef": 0.04}, "deepspeed": {"zero_stage": 0, "precision": precision}, "optim": {"lr": 1e-6}})
    reference = Transformer(mcfg)
    reference.load_state_dict(from_hf_state_dict(init_state), strict=False)
    task = GRPOTask.in_memory(cfg, ctx, mcfg, tok_dir, Prompts(items), Prompts(items[:1]), reference)
    model = Transformer(mcfg)
    model.load_state_dict(from_hf_state_dict(init_state), strict=False)
    prepare_frozen(task, model)
    engine, _, _ = build_engine(cfg, model, ctx, total_steps=10**6)
    wall, stats = time_train_steps(engine, task, ctx, args.warmup, args.steps)
    generated = args.steps * n * args.new  # every completion runs to max_new (checked below)
    assert stats.count == generated, (stats.count, generated)  # answer tokens: generated ones
    return {"what": "zerolm", "precision": precision, "wall_s": round(wall, 2), "steps_per_s": round(args.steps / wall, 3),
            "gen_tokens_per_s": round(generated / wall)}


def bench_trl(args, probs, tok_dir, mcfg, init_state, workdir, precision: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in probs])
    model = hf_model(mcfg)
    model.load_state_dict(init_state)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    # with beta > 0 trl loads its reference from the model's folder: give it one
    init_dir = workdir / "trl-grpo-init"
    model.save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    def format_reward(completions, **kw):  # a constant: a rule costs nothing next to the step (ours scores 0 too)
        return [0.0 for _ in completions]

    window = trl_window(args.warmup, args.steps)
    n = args.prompts * args.group
    cfg = GRPOConfig(output_dir=str(workdir / "trl-grpo"), per_device_train_batch_size=n, num_generations=args.group,
                     max_completion_length=args.new, max_steps=args.warmup + args.steps, learning_rate=1e-6,
                     beta=0.04, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, seed=0, optim="adamw_torch", temperature=1.0, loss_type="dapo",
                     bf16=precision == "amp_bf16")
    trainer = GRPOTrainer(model=str(init_dir), reward_funcs=format_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[window])
    trainer.train()
    wall = window.wall
    return {"what": "trl", "precision": precision, "wall_s": round(wall, 2), "steps_per_s": round(args.steps / wall, 3),
            "gen_tokens_per_s": round(args.steps * n * args.new / wall)}


def main() -> None:
    from pathlib import Path

    import trl
    from tokenizers import Tokenizer

    from train.model_config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zerolm-bench-sft"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--new", type=int, default=64, help="completion tokens")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--order", default="ours,trl")
    p.add_argument("--precision", default="fp32,amp_bf16",
                   help="settings run for each side: fp32, amp_bf16 (fp32 weights, bf16 autocast; trl: bf16=True)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok_dir = tokenizer_dir(args.data, args.workdir)
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    mcfg = ModelConfig(vocab_size=vocab, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                       max_seq_len=128 + args.new, multiple_of=64)
    init = hf_model(mcfg).state_dict()
    probs = prompts(64)
    settings = args.precision.split(",")
    side_by_side(args.order, lambda which: [bench_ours(args, probs, tok_dir, mcfg, init, p) if which == "ours"
                                            else bench_trl(args, probs, tok_dir, mcfg, init, args.workdir, p)
                                            for p in settings],
                 {"threads": args.threads, "prompts": args.prompts, "group": args.group, "new_tokens": args.new,
                  "params_M": round(mcfg.num_params() / 1e6, 2), "trl": trl.__version__},
                 {"vs_trl": "steps_per_s"}, ["what", "precision", "wall_s", "steps_per_s", "gen_tokens_per_s", "vs_trl"])

if __name__ == "__main__":
    main()
