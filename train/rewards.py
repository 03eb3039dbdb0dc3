"""Rewards for online RL: rule plugins (one small function each) and reward models.

A rule scores one sampled answer from what is known about it: its text, its length
in tokens, whether it ended its turn (<|im_end|>), and the prompt's own record (e.g.
the known answer of a generated arithmetic problem). Adding a rule is one function
and one line in RULES. `reward_source("arithmetic")` gives a rule; a path gives a
reward model (a `zerolm train reward` run or its export), which scores the whole
conversation; "a+b" sums several.

`arithmetic_problems` makes verifiable prompts: word problems in Chinese and English
with their answers, from a seed (nothing to download).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zerolm.errors import UserError


@dataclass
class Sample:
    """One sampled answer, as rules see it."""

    prompt: list[dict]  # the conversation before the answer
    text: str
    tokens: int  # generated tokens, <|im_end|> not counted
    ended: bool  # ended its turn with <|im_end|> (not cut by max_new_tokens)
    record: dict  # the prompt's record: e.g. {"answer": "12"}


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in a text ("... 所以一共是 12 个。" -> 12.0), commas in numbers allowed."""
    found = _NUMBER.findall(text.replace(",", "").replace("，", " "))
    return float(found[-1]) if found else None


def arithmetic(sample: Sample, max_tokens: int = 64) -> float:
    """1 when the answer's last number equals the record's `answer`, else 0 (verifiable)."""
    if "answer" not in sample.record:
        raise UserError("the arithmetic reward needs an 'answer' field in every prompt record")
    got = final_number(sample.text)
    return float(got is not None and abs(got - float(sample.record["answer"])) < 1e-6)


def format_reward(sample: Sample, max_tokens: int = 64) -> float:
    """1 when the answer ends its turn within max_tokens tokens and is not empty."""
    return float(sample.ended and 0 < sample.tokens <= max_tokens and bool(sample.text.strip()))


RULES: dict[str, Callable[..., float]] = {"arithmetic": arithmetic, "format": format_reward}


class RewardFunction:
    """Scores a batch of samples: the sum of its parts (rules and reward models)."""

    def __init__(self, parts: list, names: list[str]):
        self.parts, self.names = parts, names

    def __call__(self, samples: list[Sample]) -> list[float]:
        total = [0.0] * len(samples)
        for part in self.parts:
            for i, r in enumerate(part(samples)):
                total[i] += r
        return total

    @property
    def models(self) -> list:
        """The reward models among the parts (frozen models of the task)."""
        return [p.scorer.model for p in self.parts if isinstance(p, _ModelReward)]


class _RuleReward:
    def __init__(self, rule, max_tokens: int):
        self.rule, self.max_tokens = rule, max_tokens

    def __call__(self, samples: list[Sample]) -> list[float]:
        return [self.rule(s, self.max_tokens) for s in samples]


class _ModelReward:
    def __init__(self, path: str, device):
        from train.reward_model import RewardScorer
        from train.weights import find_model_dir

        self.scorer = RewardScorer(find_model_dir(Path(path)), device=device)

    def __call__(self, samples: list[Sample]) -> list[float]:
        convs = [s.prompt + [{"role": "assistant", "content": s.text}] for s in samples]
        return self.scorer.score(convs)


def check_reward_spec(spec: str) -> list[str]:
    """The parts of a --reward value, each a rule name or an existing path (checked
    before anything starts)."""
    parts = [p.strip() for p in (spec or "").split("+") if p.strip()]
    if not parts:
        raise UserError(f"no reward: give --reward RULE_OR_RM_RUN (rules: {', '.join(RULES)})")
    from train.reward_model import is_reward_model
    from train.weights import find_model_dir

    for p in parts:
        if p in RULES:
            continue
        if not Path(p).exists():
            raise UserError(f"reward {p!r} is neither a rule ({', '.join(RULES)}) nor an existing reward-model folder")
        if not is_reward_model(find_model_dir(Path(p))):
            raise UserError(f"reward {p!r} is not a reward model (train one with `zerolm train reward`)")
    return parts


def reward_source(spec: str, *, max_tokens: int = 64, device="cpu") -> RewardFunction:
    parts = check_reward_spec(spec)
    return RewardFunction([_RuleReward(RULES[p], max_tokens) if p in RULES else _ModelReward(p, device)
                           for p in parts], parts)


# ----------------------------------------------------------------- verifiable prompts

_ZH = [("小明有{a}个苹果，又买了{b}个，现在一共有几个苹果？", "+"), ("书架上有{a}本书，借走了{b}本，还剩几本？", "-"),
       ("每盒有{a}支笔，{b}盒一共有几支笔？", "*"), ("计算：{a} + {b} = ?", "+"), ("计算：{a} - {b} = ?", "-")]
_EN = [("Tom has {a} apples and buys {b} more. How many apples does he have now?", "+"),
       ("A shelf holds {a} books and {b} are taken away. How many are left?", "-"),
       ("Each box has {a} pens. How many pens are in {b} boxes?", "*"), ("Compute: {a} + {b} = ?", "+"),
       ("Compute: {a} - {b} = ?", "-")]


def arithmetic_problems(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """n word problems, half Chinese, half English: {"prompt", "answer", "response"}
    (a worked answer, for SFT before RL)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        zh = i % 2 == 0
        template, op = rng.choice(_ZH if zh else _EN)
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = template.format(a=a, b=b)
        response = f"{a} {op.replace('*', '×')} {b} = {answer}，答案是 {answer}。" if zh else \
            f"{a} {op.replace('*', 'x')} {b} = {answer}, so the answer is {answer}."
        out.append({"prompt": prompt, "answer": str(answer), "response": response})
    return out
