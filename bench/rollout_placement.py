#!/usr/bin/env python3
"""Where RL rollouts run on CPU: in the training process, or in a Ray engine actor
that receives the new weights after each update. One round = one rollout (prompts x G
answers through the serving engine, batched and KV-cached) + one update on it
(forward and backward of the answers' log-probs, AdamW), on the same model:

  in_process     the trainer copies its weights into its own engine (train/generation.py
                 PolicySampler.refresh), generates, then updates: what train/rl.py does.
  actor_sync     the trainer puts its weights in Ray's object store; an engine actor
                 loads them and generates while the trainer waits; then the update.
  actor_overlap  the actor generates round r+1 with the weights before update r while
                 the trainer runs update r (one update behind: the pipelined layout of
                 RLHF systems with generation on other devices); trainer and actor then
                 share the cores, so each gets half of them.

Reported per mode: seconds per round, of which the weight transfer and the generation
as the trainer sees them, and generated tokens/s.

    python3 bench/rollout_placement.py --threads 2 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import time

from common import DEFAULT_DATA, emit, machine, print_table, ray_session
from sft_step import hf_model, tokenizer_dir

import torch  # noqa: E402


class Setup:
    """The model, its optimizer and the requests of every round."""

    def __init__(self, args, mcfg, state, tok_dir):
        from train.chat import ChatTokenizer
        from train.model import Transformer
        from train.rewards import arithmetic_problems

        self.args, self.mcfg, self.tok_dir = args, mcfg, tok_dir
        self.chat = ChatTokenizer(tok_dir)
        self.model = Transformer(mcfg)
        self.model.load_state_dict(state, strict=False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        probs = arithmetic_problems(args.prompts * (args.rounds + 2), seed=0)
        self.prompts = [self.chat.prompt_ids([{"role": "user", "content": p["prompt"]}]) for p in probs]

    def requests(self, r: int) -> list:
        from serve.engine import Request
        from serve.sampling import SamplingParams

        a = self.args
        return [Request(list(ids), SamplingParams(max_tokens=a.new, temperature=1.0, seed=r * 1000 + i * a.group + j,
                                                  stop_ids=(self.chat.end_id,)))
                for i, ids in enumerate(self.prompts[r * a.prompts:(r + 1) * a.prompts]) for j in range(a.group)]

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def update(self, requests, outputs: list[list[int]]) -> None:
        from train.losses import IGNORE_INDEX
        from train.rl import answer_tensors

        seqs = [list(q.prompt_ids) + list(o) for q, o in zip(requests, outputs)]
        x, y, _ = answer_tensors(seqs, [len(q.prompt_ids) for q in requests], self.chat.pad_id)
        adv = torch.linspace(-1, 1, len(seqs))[:, None]  # any advantages: the cost is the same
        _, nll = self.model(x, y, reduction="none")
        ((nll * adv).sum() / (y != IGNORE_INDEX).sum()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run_in_process(s: Setup, threads: int) -> dict:
    from train.generation import PolicySampler

    torch.set_num_threads(threads)
    sampler = PolicySampler(s.state(), s.mcfg, s.tok_dir, torch.device("cpu"))
    transfer = generate = 0.0
    rounds = s.args.rounds + 1  # round 0 warms up
    for r in range(rounds):
        if r == 1:
            t0, transfer, generate = time.perf_counter(), 0.0, 0.0
        t = time.perf_counter()
        sampler.refresh(s.state())
        t1 = time.perf_counter()
        reqs = s.requests(r)
        outs = [res.output_ids for res in sampler.generate(reqs)]
        t2 = time.perf_counter()
        transfer, generate = transfer + t1 - t, generate + t2 - t1
        s.update(reqs, outs)
    return _row("in_process", time.perf_counter() - t0, transfer, generate, s.args)


def _engine_actor(threads: int):
    import ray

    @ray.remote(num_cpus=1)
    class EngineActor:
        def __init__(self, state, mcfg, tok_dir):
            from train.generation import PolicySampler

            torch.set_num_threads(threads)
            self.sampler = PolicySampler(state, mcfg, tok_dir, torch.device("cpu"))

        def refresh(self, state) -> None:
            self.sampler.refresh(state)

        def generate(self, requests) -> list[list[int]]:
            return [res.output_ids for res in self.sampler.generate(requests)]

    return EngineActor


def run_actor(s: Setup, threads: int, overlap: bool) -> dict:
    import ray

    trainer_threads = max(1, threads // 2) if overlap else threads
    torch.set_num_threads(trainer_threads)
    # the actor gets as many threads as the trainer
    actor = _engine_actor(trainer_threads).remote(s.state(), s.mcfg, s.tok_dir)
    rounds = s.args.rounds + 1
    transfer = generate = 0.0
    pending = actor.generate.remote(s.requests(0)) if overlap else None
    for r in range(rounds):
        if r == 1:
            t0, transfer, generate = time.perf_counter(), 0.0, 0.0
        reqs = s.requests(r)
        t = time.perf_counter()
        if overlap:  # round r was generated during update r-1; start round r+1 now
            outs = ray.get(pending)
            t1 = time.perf_counter()
            ray.get(actor.refresh.remote(ray.put(s.state())))
            pending = actor.generate.remote(s.requests(r + 1))
            t2 = time.perf_counter()
            generate, transfer = generate + t1 - t, transfer + t2 - t1
        else:
            ray.get(actor.refresh.remote(ray.put(s.state())))
            t1 = time.perf_counter()
            outs = ray.get(actor.generate.remote(reqs))
            t2 = time.perf_counter()
            transfer, generate = transfer + t1 - t, generate + t2 - t1
        s.update(reqs, outs)
    wall = time.perf_counter() - t0
    if overlap:
        ray.get(pending)
    ray.kill(actor)
    return _row("actor_overlap" if overlap else "actor_sync", wall, transfer, generate, s.args)


def _row(mode: str, wall: float, transfer: float, generate: float, args) -> dict:
    n = args.rounds
    return {"mode": mode, "round_s": round(wall / n, 3), "transfer_s": round(transfer / n, 3),
            "generate_wait_s": round(generate / n, 3),
            "gen_tokens_per_s": round(args.prompts * args.group * args.new * n / wall)}


def main() -> None:
    from pathlib import Path

    from tokenizers import Tokenizer

    from train.export_hf import from_hf_state_dict
    from train.model_config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zerolm-bench-sft"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--modes", default="in_process,actor_sync,actor_overlap")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok_dir = tokenizer_dir(args.data, args.workdir)
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    mcfg = ModelConfig(vocab_size=vocab, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128 + args.new,
                       multiple_of=64)
    state = from_hf_state_dict(hf_model(mcfg).state_dict())
    rows = []
    with ray_session(num_cpus=args.threads):
        for mode in args.modes.split(","):
            s = Setup(args, mcfg, state, tok_dir)  # every mode from the same weights
            row = run_in_process(s, args.threads) if mode == "in_process" else \
                run_actor(s, args.threads, overlap=mode == "actor_overlap")
            row.update({"threads": args.threads, "prompts": args.prompts, "group": args.group, "new": args.new,
                        "params_M": round(mcfg.num_params() / 1e6, 2), **machine()})
            emit(row)
            rows.append(row)
    base = next((r for r in rows if r["mode"] == "in_process"), rows[0])
    for r in rows:
        r["vs_in_process"] = round(base["round_s"] / r["round_s"], 2)
    print_table(rows, ["mode", "round_s", "transfer_s", "generate_wait_s", "gen_tokens_per_s", "vs_in_process"])


if __name__ == "__main__":
    main()
