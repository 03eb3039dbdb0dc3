#!/usr/bin/env python3
"""DPO throughput on CPU: zerolm's DPO step (pairs packed into rows, policy + frozen
reference, the loop's `train_step` in a DeepSpeed engine) against trl's `DPOTrainer`
(sigmoid loss, frozen reference model, no precomputation) on the same model shape and
initial weights, the same preference pairs cut to the same length, in one process with
the same torch threads, one after the other. Reported: pairs/s and tokens/s.

    python3 bench/dpo_step.py --threads 2 --steps 10 --seq 256 --pairs 8
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from common import DEFAULT_DATA, side_by_side
from sft_step import hf_model, time_train_steps, tokenizer_dir, trl_window

import torch  # noqa: E402


def read_pairs(data, n: int):
    from train.preferences import to_pair

    rows = []
    for name in ("dpo_zh_demo.json", "dpo_en_demo.json"):
        rows += json.loads((data / "preference" / name).read_text(encoding="utf-8"))[: n // 2]
    return [to_pair(r) for r in rows]


def bench_ours(args, pairs, tok_dir, mcfg, init_state) -> dict:
    from train.chat import ChatTokenizer
    from train.distributed import setup
    from train.dpo import DPOConfig, DPOTask
    from train.export_hf import from_hf_state_dict
    from train.loop import build_engine, prepare_frozen
    from train.model import Transformer
    from train.packing import Examples
    from train.pairs import PairExamples, PairsSection, encode_pairs

    chat = ChatTokenizer(tok_dir)
    # prompts that leave no room are dropped, not cut: the pairs trl is given are these same ones
    fit = PairsSection(seq_len=args.seq, max_prompt_tokens=args.seq - 8, prompt_truncation="drop")
    enc, _, _ = encode_pairs(pairs, chat, fit)
    enc = [e for e in enc if e is not None]

    data = PairExamples(Examples.build([s for c, r, _ in enc for s in (c, r)]), np.zeros(len(enc), np.float32))
    ctx = setup(False)
    cfg = DPOConfig.model_validate({"output": "/tmp/unused", "init_from": "/tmp/unused",
                                    "data": {"seq_len": args.seq, "micro_batch_size": args.rows},
                                    "deepspeed": {"zero_stage": 0, "precision": "fp32"}, "optim": {"lr": 1e-5}})

    reference = Transformer(mcfg)
    reference.load_state_dict(from_hf_state_dict(init_state), strict=False)
    task = DPOTask.in_memory(cfg, ctx, mcfg, tok_dir, data, data, reference)
    model = Transformer(mcfg)
    model.load_state_dict(from_hf_state_dict(init_state), strict=False)
    prepare_frozen(task, model)
    engine, _, _ = build_engine(cfg, model, ctx, total_steps=10**6)
    wall, stats = time_train_steps(engine, task, ctx, args.warmup, args.steps)
    done_pairs, tokens = stats.count, stats.tokens
    return {"what": "zerolm", "wall_s": round(wall, 2), "pairs": int(done_pairs), "pairs_per_s": round(done_pairs / wall, 2),
            "tokens_per_s": round(tokens / wall)}


def bench_trl(args, pairs, tok_dir, mcfg, init_state, workdir) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
    model, ref = hf_model(mcfg), hf_model(mcfg)
    model.load_state_dict(init_state)
    ref.load_state_dict(init_state)
    seen = {"tokens": 0}

    def count(_module, _args, kwargs):
        if torch.is_grad_enabled():
            seen["tokens"] += int(kwargs["attention_mask"].sum()) if kwargs.get("attention_mask") is not None \
                else kwargs["input_ids"].numel()

    model.register_forward_pre_hook(count, with_kwargs=True)
    window = trl_window(args.warmup, args.steps, seen)

    cfg = DPOConfig(output_dir=str(workdir / "trl-dpo"), max_length=2 * args.seq, per_device_train_batch_size=args.pairs,
                    max_steps=args.warmup + args.steps, learning_rate=1e-5, logging_steps=10**6, save_strategy="no",
                    report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, beta=0.1, optim="adamw_torch")
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[window])
    trainer.train()
    wall = window.wall
    return {"what": "trl", "wall_s": round(wall, 2), "pairs": args.steps * args.pairs,
            "pairs_per_s": round(args.steps * args.pairs / wall, 2), "tokens_per_s": round(window.delta("tokens") / wall)}


def main() -> None:
    from pathlib import Path

    import trl

    from train.model_config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zerolm-bench-sft"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=256, help="tokens per side (prompt + answer)")
    p.add_argument("--pairs", type=int, default=8, help="trl: pairs per step")
    p.add_argument("--rows", type=int, default=4, help="ours: rows of 2 x seq positions per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--order", default="ours,trl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok_dir = tokenizer_dir(args.data, args.workdir)
    pairs = read_pairs(args.data, 600)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    mcfg = ModelConfig(vocab_size=vocab, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                       max_seq_len=2 * args.seq, multiple_of=64)
    init = hf_model(mcfg).state_dict()
    side_by_side(args.order, lambda which: bench_ours(args, pairs, tok_dir, mcfg, init) if which == "ours"
                 else bench_trl(args, pairs, tok_dir, mcfg, init, args.workdir),
                 {"threads": args.threads, "seq": args.seq, "params_M": round(mcfg.num_params() / 1e6, 2),
                  "trl": trl.__version__, "torch": torch.__version__},
                 {"pairs_vs_trl": "pairs_per_s"}, ["what", "wall_s", "pairs", "pairs_per_s", "tokens_per_s", "pairs_vs_trl"])

if __name__ == "__main__":
    main()
