#!/usr/bin/env python3
"""SFT throughput on CPU: zerolm's SFT step (packed rows, per-conversation attention,
the loop's `train_step` in a DeepSpeed engine) against trl's `SFTTrainer` (packing on,
its default best-fit-decreasing padding-free mode, completion-only loss) on the same
model shape and initial weights, the same conversations, the same sequence length and
rows per step, in one process with the same torch threads, one after the other.

Reported per run: real (non-padding) tokens/s, assistant (loss) tokens/s and padding
share, so packing's gain is visible; the ratio is ours / trl per CPU core.

    python3 bench/sft_step.py --threads 2 --steps 12 --seq 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import DEFAULT_DATA, REPO, side_by_side  # noqa: F401  (REPO: sys.path)

import torch  # noqa: E402


def conversations(data, n: int) -> list[list[dict]]:
    from train.conversations import check_conversation, to_messages

    rows = []
    for name in ("alpaca_zh_demo.json", "alpaca_en_demo.json"):
        rows += json.loads((data / "sft" / name).read_text(encoding="utf-8"))[: n // 2]
    convs = [to_messages(r) for r in rows]
    for c in convs:
        check_conversation(c)
    return convs


def tokenizer_dir(data, workdir):
    """A byte-level BPE tokenizer (zerolm's trainer, vocab 8000) on the SFT texts themselves."""
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer

    out = workdir / "tokenizer"
    if not (out / "_SUCCESS").exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        clean = workdir / "clean"  # a minimal clean-corpus folder: data/*.parquet + _SUCCESS
        (clean / "data").mkdir(parents=True, exist_ok=True)
        texts = [m["content"] for c in conversations(data, 2000) for m in c]
        pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts,
                                 "source": ["sft"] * len(texts)}), clean / "data" / "part.parquet")
        (clean / "_SUCCESS").write_text(json.dumps({"stage": "data", "config_hash": "bench"}))
        train_tokenizer(TokenizerConfig(input=str(clean), output=str(out), vocab_size=8000), echo=lambda *_: None)
    return out


def hf_model(mcfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.dim, intermediate_size=mcfg.ffn_dim,
        num_hidden_layers=mcfg.n_layers, num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.kv_heads,
        max_position_embeddings=mcfg.max_seq_len, rms_norm_eps=mcfg.norm_eps, tie_word_embeddings=False,
        attn_implementation="sdpa"))


def time_train_steps(engine, task, ctx, warmup: int, steps: int):
    """(wall seconds, StepStats summed) of `steps` loop steps after `warmup` untimed ones."""
    from train.loop import StepStats, train_step

    for step in range(warmup):
        train_step(engine, task, step, 1, ctx)
    total, t0 = StepStats(), time.time()
    for step in range(warmup, warmup + steps):
        total.merge(train_step(engine, task, step, 1, ctx))
    return time.time() - t0, total


def trl_window(warmup: int, steps: int, seen: dict | None = None):
    """A trl TrainerCallback timing its steps [warmup, warmup + steps): `.wall` seconds
    and `.delta(key)`, how much each counter of `seen` grew over them."""
    from transformers import TrainerCallback

    seen = {} if seen is None else seen

    class Window(TrainerCallback):
        start = end = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                self.start = (time.time(), dict(seen))

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == warmup + steps:
                self.end = (time.time(), dict(seen))

        @property
        def wall(self) -> float:
            return self.end[0] - self.start[0]

        def delta(self, key: str) -> float:
            return self.end[1][key] - self.start[1][key]

    return Window()


def bench_ours(args, convs, tok_dir, mcfg, init_state) -> dict:
    from train.chat import ChatTokenizer, truncate_at_turn
    from train.config import StageConfig
    from train.distributed import setup
    from train.export_hf import from_hf_state_dict
    from train.loop import build_engine
    from train.model import Transformer
    from train.packing import Examples, RowSampler, pack_rows, row_batch

    chat = ChatTokenizer(tok_dir)
    enc = [truncate_at_turn(e, args.seq + 1) for e in chat.encode_many(convs)]
    ex = Examples.build([(e.ids, e.mask, e.prompt_len) for e in enc if e is not None])
    rows = pack_rows(ex.lengths() - 1, args.seq, seed=0)
    sampler = RowSampler(rows, seed=0)
    ctx = setup(False)

    class Task:
        name = "sft-bench"

        def micro_batch(self, step, micro):
            return row_batch(ex, sampler.take(step * args.batch, args.batch), args.seq, chat.pad_id)

        def loss(self, engine, b):
            _, summed = engine(b["x"], b["y"], positions=b["positions"], doc_ids=b["doc_ids"], reduction="sum")
            return summed, b["count"], {}

    model = Transformer(mcfg)
    model.load_state_dict(from_hf_state_dict(init_state), strict=False)
    cfg = StageConfig.model_validate({"output": "/tmp/unused", "data": {"micro_batch_size": args.batch, "seq_len": args.seq},
                                      "deepspeed": {"zero_stage": 0, "precision": "fp32"}, "optim": {"lr": 1e-4}})
    engine, _, _ = build_engine(cfg, model, ctx, total_steps=10**6)
    wall, stats = time_train_steps(engine, Task(), ctx, args.warmup, args.steps)
    real, loss_tokens = stats.tokens, stats.count
    return {"what": "zerolm", "steps": args.steps, "wall_s": round(wall, 2), "tokens_per_s": round(real / wall),
            "loss_tokens_per_s": round(loss_tokens / wall),
            "padding": round(1 - real / (args.steps * args.batch * args.seq), 4), "rows": len(rows)}


def bench_trl(args, convs, tok_dir, mcfg, workdir) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    model = hf_model(mcfg)
    seen = {"real": 0, "loss": 0, "rows": 0}

    def count(_module, _args, kwargs):
        if torch.is_grad_enabled():
            seen["real"] += int((kwargs["position_ids"] >= 0).sum()) if "position_ids" in kwargs else kwargs["input_ids"].numel()
            seen["loss"] += int((kwargs["labels"] != -100).sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    window = trl_window(args.warmup, args.steps, seen)
    cfg = SFTConfig(output_dir=str(workdir / "trl"), max_length=args.seq, packing=True, per_device_train_batch_size=args.batch,
                    max_steps=args.warmup + args.steps, learning_rate=1e-4, logging_steps=10**6, save_strategy="no",
                    report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, optim="adamw_torch")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[window])
    rows = len(trainer.train_dataset)
    trainer.train()
    wall, real, loss_tokens = window.wall, window.delta("real"), window.delta("loss")
    return {"what": "trl", "steps": args.steps, "wall_s": round(wall, 2), "tokens_per_s": round(real / wall),
            "loss_tokens_per_s": round(loss_tokens / wall),
            "padding": round(1 - real / (args.steps * args.batch * args.seq), 4), "rows": rows}


def main() -> None:
    from pathlib import Path

    import trl

    from train.model_config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zerolm-bench-sft"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--order", default="ours,trl", help="which runs, in which order (e.g. ours,trl,ours)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    convs = conversations(args.data, args.examples)
    tok_dir = tokenizer_dir(args.data, args.workdir)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    mcfg = ModelConfig(vocab_size=vocab, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                       max_seq_len=args.seq, multiple_of=64)
    init = hf_model(mcfg).state_dict()
    side_by_side(args.order, lambda which: bench_ours(args, convs, tok_dir, mcfg, init) if which == "ours"
                 else bench_trl(args, convs, tok_dir, mcfg, args.workdir),
                 {"threads": args.threads, "seq": args.seq, "batch": args.batch,
                  "params_M": round(mcfg.num_params() / 1e6, 2), "trl": trl.__version__, "torch": torch.__version__},
                 {"tok_vs_trl": "tokens_per_s", "loss_tok_vs_trl": "loss_tokens_per_s"},
                 ["what", "wall_s", "tokens_per_s", "loss_tokens_per_s", "padding", "rows", "tok_vs_trl",
                  "loss_tok_vs_trl"])

if __name__ == "__main__":
    main()
