"""Online RL on the stage framework: what GRPO (train/grpo.py) and PPO (train/ppo.py)
share. A rollout samples answers to prompts with the current policy, scores them, and
the following optimizer steps learn from them:

    rollout r (every `steps_per_rollout` steps, from the weights of that moment)
      prompts (seeded per rollout and rank) x rollout.samples answers each, sampled
      by the serving engine (batched, KV-cached, seeded per answer) on a copy of the
      current weights -> rewards (rule plugins or reward models, train/rewards.py)
      -> log-probs of the reference (and of the policy itself, when several updates
      learn from one rollout) -> advantages (the algorithm's own)
    steps: policy.epochs passes over the rollout's answers in micro-batches

Rollouts run in the training process, between steps: each worker samples its own
prompts with its own engine copy. The alternative, engine actors placed by Ray that
receive new weights after every update, was measured on CPU (bench/rollout_placement.py,
docs/benchmarks.md): waiting for an actor is slower by the weight transfer through the
object store; an actor that generates the next rollout during the update is faster on
2 cores, but its answers come from the weights before the update (off-policy by one
update, which the losses here do not correct). It pays off when generation has
devices of its own.

Losses sum over response tokens (their <|im_end|> included); the loop divides by the
number of response tokens over all micro-batches and ranks (token-level
normalisation, as DAPO recommends over per-sequence means).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from train.chat import ChatTokenizer
from train.config import BaseDataSection, EvalSection, OptimSection, StageConfig
from train.conversations import BadRecord, check_conversation, parse_files, to_messages
from train.distributed import WorkerContext, all_reduce_sum
from train.export_hf import export_hf
from train.losses import IGNORE_INDEX
from train.loop import frozen_autocast
from train.model_config import ModelConfig
from train.runner import FineTuneStage, Plan, absolute, write_prepared
from train.rewards import RULES, Sample, check_reward_spec, reward_source
from train.weights import find_model_dir, load_transformer, weights_sha256
from zerolm.config import StrictModel
from zerolm.errors import UserError

DATA = "data"


class RLDataSection(BaseDataSection):
    paths: list[str] = Field(default_factory=list)  # prompts: .json, .jsonl or .parquet
    format: str = "auto"  # of conversations whose last turn is the user's (or an answer, dropped)
    prompt_field: str = "prompt"
    micro_batch_size: int = Field(default=8, ge=1)  # sampled answers per micro-batch
    val_prompts: int = Field(default=16, ge=0)  # held out for evaluation


class RolloutSection(StrictModel):
    prompts: int = Field(default=4, ge=1)  # per worker per rollout
    samples: int = Field(default=4, ge=1, le=64)  # answers per prompt (GRPO's group size G)
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0, le=2)  # 1.0: the samples follow the trained policy
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)


class PolicySection(StrictModel):
    clip: float = Field(default=0.2, gt=0)  # PPO ratio clip ε
    kl_coef: float = Field(default=0.04, ge=0)  # β of the KL to the reference
    kl_estimator: Literal["k1", "k3"] = "k3"
    epochs: int = Field(default=1, ge=1)  # passes over each rollout's answers


class RLEvalSection(EvalSection):
    every: int = Field(default=10, ge=0)
    prompts: int = Field(default=16, ge=0)  # held-out prompts answered greedily


class RLConfig(StageConfig):
    init_from: str = ""
    reward: str = ""  # a rule (train/rewards.py RULES), a reward-model run, or "a+b"
    reward_max_tokens: int = Field(default=64, ge=1)  # the format rule's length limit
    data: RLDataSection = Field(default_factory=RLDataSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    eval: RLEvalSection = Field(default_factory=RLEvalSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1e-6, weight_decay=0.0, min_lr_ratio=1.0))
    rollouts: int = Field(default=20, ge=1)  # rollout rounds (max_steps overrides)
    log_every: int = Field(default=1, ge=1)

    def steps_per_rollout(self) -> int:
        answers = self.rollout.prompts * self.rollout.samples
        per_step = self.data.micro_batch_size * self.data.grad_accum
        if answers % per_step:
            raise UserError(f"a rollout gives {answers} answers per worker (rollout.prompts x rollout.samples), "
                            f"not a multiple of data.micro_batch_size x data.grad_accum = {per_step}")
        return self.policy.epochs * answers // per_step


# ----------------------------------------------------------------- prompts

class Prompts:
    """Tokenized prompts with their records, saved as JSON lines (RUN_DIR/data)."""

    def __init__(self, items: list[dict]):
        self.items = items  # {"messages", "ids", "record"}

    def __len__(self) -> int:
        return len(self.items)

    def _text(self) -> str:
        return "".join(json.dumps(i, ensure_ascii=False, sort_keys=True) + "\n" for i in self.items)

    def digest(self) -> str:
        return hashlib.sha256(self._text().encode("utf-8")).hexdigest()

    def save(self, path: Path) -> None:
        path.with_suffix(".jsonl").write_text(self._text(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Prompts":
        lines = path.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()
        return cls([json.loads(line) for line in lines if line])


def prompt_messages(record: dict, fmt: str, prompt_field: str) -> list[dict]:
    """The conversation up to the answer: a bare prompt, or any SFT format whose final
    assistant turn (if any) is dropped."""
    if fmt == "auto" and prompt_field in record and "response" not in record:
        value = record[prompt_field]
        if not isinstance(value, str):
            raise BadRecord("non_string_prompt")
        msgs = [{"role": "user", "content": value}]
    else:
        msgs = to_messages(record, fmt, prompt_field=prompt_field)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
    check_conversation(msgs + [{"role": "assistant", "content": "-"}])
    return msgs


def prepare_prompts(cfg: RLConfig, chat: ChatTokenizer, echo=print):
    d = cfg.data
    items, rejects, records, files = parse_files(
        d.paths, lambda r: (prompt_messages(r, d.format, d.prompt_field), r),
        missing="no prompts: give --prompts FILE_OR_GLOB")
    room = d.seq_len - min(cfg.rollout.max_new_tokens, 8)  # a prompt leaves room for an answer
    kept, too_long = [], 0
    for (msgs, record), _ in items:
        ids = chat.prompt_ids(msgs)
        if len(ids) > room:
            too_long += 1
            continue
        extra = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) and k != d.prompt_field}
        kept.append({"messages": msgs, "ids": ids, "record": extra})
    if len(kept) <= d.val_prompts:
        raise UserError(f"{len(kept)} usable prompts ({len(rejects)} rejected, {too_long} longer than "
                        f"data.seq_len - 8): need more than data.val_prompts={d.val_prompts}")
    order = np.random.default_rng(d.seed).permutation(len(kept))
    val = [kept[i] for i in order[:d.val_prompts]]
    train = [kept[i] for i in order[d.val_prompts:]]
    stats = {"records_in": records, "train_prompts": len(train), "val_prompts": len(val),
             "rejected": len(rejects), "dropped_prompt_too_long": too_long}
    echo(f"RL prompts: {records} records -> {len(train)} train + {len(val)} held out; rejected {len(rejects)}, "
         f"too long {too_long}")
    return Prompts(train), Prompts(val), stats, rejects, files


def answer_tensors(seqs: list[list[int]], starts: list[int], pad_id: int):
    """Prompt + answer token lists -> inputs x, targets y (the answer's tokens only,
    IGNORE_INDEX elsewhere) and `real` (1 on non-padding inputs), each (N, T)."""
    N, T = len(seqs), max(len(s) for s in seqs) - 1
    x = torch.full((N, T), pad_id, dtype=torch.long)
    y = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros(N, T)
    for i, (s, p0) in enumerate(zip(seqs, starts)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, p0 - 1:len(s) - 1] = torch.tensor(s[p0:])
        real[i, :len(s) - 1] = 1
    return x, y, real


class RLStage(FineTuneStage):
    """grpo and ppo: --init, --prompts, --reward."""

    task_class: type  # the stage's RLTask
    summary_keys = ("val/reward", "val/end_rate")
    next_step = "chat with it: zerolm serve --model chat={output}"

    def task(self, cfg: RLConfig, run_dir: Path, ctx: WorkerContext) -> "RLTask":
        return self.task_class(cfg, run_dir, ctx)

    def add_arguments(self, parser) -> None:
        parser.add_argument("--init", help="the model to start from: a finished run folder (SFT) or an HF folder")
        parser.add_argument("--prompts", nargs="+", action="extend", metavar="FILE_OR_GLOB",
                            help="prompts: records with a 'prompt' (plus e.g. 'answer') or conversations")
        parser.add_argument("--reward", help=f"a rule ({', '.join(RULES)}), a reward-model run, or several joined by +")

    def cli_flags(self, args) -> dict:
        return {"init_from": args.init, "reward": args.reward,
                "data": {"paths": args.prompts} if args.prompts else None}

    def absolute(self, cfg):
        cfg = super().absolute(cfg)
        parts = [p if p in RULES else absolute(p) for p in (cfg.reward or "").split("+") if p]
        return cfg.model_copy(update={"reward": "+".join(parts)})

    def plan(self, cfg: RLConfig, echo=print) -> Plan:
        init, chat = self.start_point(cfg)
        parts = check_reward_spec(cfg.reward)
        if cfg.rollout.max_new_tokens >= cfg.data.seq_len:
            raise UserError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt "
                            f"in data.seq_len={cfg.data.seq_len}")
        train, val, stats, rejects, files = prepare_prompts(cfg, chat, echo)
        spr = cfg.steps_per_rollout()
        total = cfg.max_steps or cfg.rollouts * spr
        rewards = [p if p in RULES else {"path": p, "weights_sha256": weights_sha256(
            find_model_dir(Path(p)))} for p in parts]
        lineage = {"init": init.lineage(), "prompts": [str(f) for f in files], "reward": rewards}

        def write(run_dir: Path) -> None:
            write_prepared(run_dir, init.model_dir, {"prompts_train": train, "prompts_val": val}, stats=stats,
                           rejects=rejects)

        r = cfg.rollout
        return Plan(model_config=init.config, total_steps=total, lineage=lineage, write=write, info={"data": stats},
                    describe=f"{self.name} of {init.config.num_params() / 1e6:.2f}M params from {init.path}: "
                             f"{total} steps, a rollout of {r.prompts} prompts x {r.samples} answers per worker "
                             f"every {spr} steps, reward {cfg.reward}")


# ----------------------------------------------------------------- the task

class RLTask:
    """Rollouts, rewards, reference log-probs, micro-batches; an algorithm adds its
    model, advantages and loss."""

    name = "rl"

    def __init__(self, cfg: RLConfig, run_dir: Path, ctx: WorkerContext):
        mcfg = ModelConfig.load(run_dir)
        self.setup(cfg, ctx, mcfg, run_dir / DATA / "tokenizer", Prompts.load(run_dir / DATA / "prompts_train"),
                   Prompts.load(run_dir / DATA / "prompts_val"),
                   load_transformer(find_model_dir(cfg.init_from), mcfg, device=ctx.device))

    @classmethod
    def in_memory(cls, cfg: RLConfig, ctx: WorkerContext, mcfg: ModelConfig, tokenizer_dir: Path,
                  train: Prompts, val: Prompts, reference: torch.nn.Module) -> "RLTask":
        """The task over prompts already in memory, with a given reference (benchmarks)."""
        task = cls.__new__(cls)
        task.setup(cfg, ctx, mcfg, tokenizer_dir, train, val, reference)
        return task

    def setup(self, cfg: RLConfig, ctx: WorkerContext, mcfg: ModelConfig, tokenizer_dir: Path, train: Prompts,
              val: Prompts, reference: torch.nn.Module) -> None:
        self.cfg, self.ctx, self.mcfg = cfg, ctx, mcfg
        self.tokenizer_dir = tokenizer_dir
        self.chat = ChatTokenizer(self.tokenizer_dir)
        self.train_prompts, self.val_prompts = train, val
        self.reward_fn = reward_source(cfg.reward, max_tokens=cfg.reward_max_tokens, device=ctx.device)
        self.reference = reference
        self.spr = cfg.steps_per_rollout()
        self.sampler = None
        self.rollout_index, self.data = -1, None

    # -------------------------------------------------------------- loop hooks
    def frozen_models(self) -> dict:
        out = {"reference": self.reference}
        out.update({f"reward_{i}": m for i, m in enumerate(self.reward_fn.models)})
        return out

    def flops_per_token(self) -> float:
        return self.mcfg.flops_per_token(self.cfg.data.seq_len)

    def actor_weights(self, state: dict) -> dict:
        """The policy's own tensors of the trained module's state dict."""
        return state

    def policy_state(self, engine) -> dict:
        from train.generation import current_weights
        return self.actor_weights(current_weights(engine))

    def export(self, state_dict: dict, out_dir: Path) -> None:
        export_hf(self.actor_weights(state_dict), self.mcfg, out_dir, tokenizer_dir=self.tokenizer_dir, chat=True)

    def begin_step(self, engine, step: int) -> None:
        r = step // self.spr
        if r != self.rollout_index:  # the first step of a rollout (or of a resumed run)
            self.data = self.rollout(engine, r)
            self.rollout_index = r
        self.step_in_rollout = step % self.spr

    def micro_batch(self, step: int, micro: int) -> dict:
        d, D = self.cfg.data, self.data
        n = D["x"].shape[0]
        per_epoch = n // (d.micro_batch_size * d.grad_accum)
        epoch, within = divmod(self.step_in_rollout, per_epoch)
        order = np.random.default_rng((d.seed, self.rollout_index, epoch, self.ctx.rank)).permutation(n) \
            if epoch else np.arange(n)
        start = (within * d.grad_accum + micro) * d.micro_batch_size
        idx = torch.from_numpy(order[start:start + d.micro_batch_size]).to(self.ctx.device)
        b = {k: v[idx] for k, v in D.items() if isinstance(v, torch.Tensor)}
        b["count"] = float(b["mask"].sum().item())
        b["tokens"] = float(b["real"].sum().item())
        if step % self.spr == 0 and micro == 0:
            b["rollout_metrics"] = D["metrics"]  # logged once per rollout
        return b

    # -------------------------------------------------------------- rollouts
    def _sample(self, engine, prompts: list[dict], samples: int, *, greedy: bool, seed: int):
        """Answers through the serving engine on the current weights: (results, seconds)."""
        from serve.engine import Request
        from serve.sampling import SamplingParams
        from train.generation import PolicySampler

        state = self.policy_state(engine)  # every rank: a collective under ZeRO-3
        if self.sampler is None:
            self.sampler = PolicySampler(state, self.mcfg, self.tokenizer_dir, self.ctx.device)
        else:
            self.sampler.refresh(state)
        r = self.cfg.rollout
        requests = []
        for i, p in enumerate(prompts):
            room = min(r.max_new_tokens, self.cfg.data.seq_len - len(p["ids"]))
            for j in range(samples):
                params = SamplingParams(max_tokens=room, temperature=0.0 if greedy else r.temperature,
                                        top_p=r.top_p, top_k=r.top_k, seed=seed * 1000003 + i * samples + j,
                                        stop_ids=(self.chat.end_id,),
                                        # the policy's own distribution, which the loss's ratios assume
                                        valid_utf8=False)
                requests.append(Request(list(p["ids"]), params))
        t = time.perf_counter()
        results = self.sampler.generate(requests) if requests else []
        return results, time.perf_counter() - t

    def score(self, prompts: list[dict], results, samples: int) -> list[float]:
        items = [Sample(prompt=prompts[k // samples]["messages"], text=res.text, tokens=len(res.output_ids),
                        ended=res.finish_reason == "stop", record=prompts[k // samples]["record"])
                 for k, res in enumerate(results)]
        return self.reward_fn(items)

    def _prompts_for(self, r: int) -> list[dict]:
        rng = np.random.default_rng((self.cfg.data.seed, r, self.ctx.rank))
        n, P = len(self.train_prompts), self.cfg.rollout.prompts
        return [self.train_prompts.items[i] for i in rng.choice(n, P, replace=n < P)]

    @torch.no_grad()
    def rollout(self, engine, r: int) -> dict:
        G = self.cfg.rollout.samples
        prompts = self._prompts_for(r)
        results, secs = self._sample(engine, prompts, G, greedy=False,
                                     seed=(self.cfg.data.seed * 7919 + r) * 131 + self.ctx.rank)
        rewards = self.score(prompts, results, G)
        seqs, starts = [], []
        for k, res in enumerate(results):
            answer = list(res.output_ids) + ([self.chat.end_id] if res.finish_reason == "stop" else [])
            prompt = prompts[k // G]["ids"]
            seqs.append(list(prompt) + answer)
            starts.append(len(prompt))
        N, dev = len(seqs), self.ctx.device
        x, y, real = answer_tensors(seqs, starts, self.chat.pad_id)
        data = {"x": x.to(dev), "y": y.to(dev), "real": real.to(dev), "mask": (y != IGNORE_INDEX).float().to(dev),
                "rewards": torch.tensor(rewards, dtype=torch.float32, device=dev)}
        with frozen_autocast(self.cfg, dev):
            data["ref_logp"] = self._logp_chunks(self.reference, data)
        engine.eval()
        self.extra_rollout_tensors(engine, data)  # old log-probs, values: the algorithm's
        engine.train()
        generated = sum(len(res.output_ids) for res in results)
        lengths = data["mask"].sum(1)
        data["metrics"] = {
            "reward": (sum(rewards), N), "response_tokens": (lengths.sum().item(), N),
            "ended": (sum(res.finish_reason == "stop" for res in results), N),
            "rollout/tokens_per_s": generated / max(secs, 1e-9), "rollout/seconds": secs}
        self.advantages(data)
        return data

    def _logp_chunks(self, model, data: dict) -> torch.Tensor:
        """Per-token log-probs of the answer tokens (N, T), 0 elsewhere, no gradient."""
        mb = self.cfg.data.micro_batch_size
        return torch.cat([self.token_logp(model, data["x"][i:i + mb], data["y"][i:i + mb])
                          for i in range(0, data["x"].shape[0], mb)])

    @staticmethod
    def token_logp(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, nll = model(x, y, reduction="none")  # (B, T), 0 where y is IGNORE_INDEX
        return -nll

    @staticmethod
    @torch.no_grad()
    def token_metrics(b: dict, logp: torch.Tensor, **per_token: torch.Tensor) -> dict:
        """A micro-batch's metrics as (sum, count) over its answer tokens: each given
        per-token tensor (kl, clip_fraction, ...), and `entropy`, -log p of the sampled
        tokens (a one-sample estimate of the policy's entropy, exact in expectation at
        temperature 1); plus the rollout's own metrics on its first micro-batch."""
        mask, n = b["mask"], b["count"]
        out = {k: ((v.float() * mask).sum().item(), n) for k, v in per_token.items()}
        out["entropy"] = ((-logp * mask).sum().item(), n)
        return {**out, **b.get("rollout_metrics", {})}

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Greedy answers to held-out prompts with the current weights: mean reward,
        share that ended their turn, mean length."""
        k = min(self.cfg.eval.prompts, len(self.val_prompts))
        mine = self.val_prompts.items[:k][self.ctx.rank::self.ctx.world_size]
        results, _ = self._sample(engine, mine, 1, greedy=True, seed=0)
        rewards = self.score(mine, results, 1) if mine else []
        total, ended, length, n = all_reduce_sum(
            [sum(rewards), sum(r.finish_reason == "stop" for r in results), sum(len(r.output_ids) for r in results),
             len(mine)], self.ctx.device)
        return {"val/reward": total / n, "val/end_rate": ended / n, "val/answer_tokens": length / n} if n else {}

    # -------------------------------------------------------------- the algorithm's
    def extra_rollout_tensors(self, engine, data: dict) -> None:
        raise NotImplementedError

    def advantages(self, data: dict) -> None:
        raise NotImplementedError
