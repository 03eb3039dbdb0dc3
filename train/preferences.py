"""Reading preference pairs the way users have them (reward model and DPO stages).

Record formats, detected per record:

  sharegpt  {"conversations": [{from, value}...], "chosen": {from, value}, "rejected": {...}}
            (LLaMA-Factory, ../shared/data/preference)
  trl       {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages};
            without "prompt", chosen and rejected are whole conversations sharing the
            prompt as their common prefix (trl's implicit-prompt form)
  openai    {"input": {"messages": [...]}, "preferred_output": [{role, content}],
             "non_preferred_output": [...]} (OpenAI's preference fine-tuning format)

Each becomes a `Pair`: the prompt messages (ending with a user turn), the chosen and the
rejected answer text, and an optional margin (a `margin` number in the record). What
cannot be used is a `BadRecord` with its reason, as for SFT (train/conversations.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from train.conversations import BadRecord, _text, _turns, check_conversation

PAIR_FORMATS = ("auto", "sharegpt", "trl", "openai")


@dataclass
class Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float = 0.0

    def conversations(self) -> tuple[list[dict], list[dict]]:
        return ([*self.prompt, {"role": "assistant", "content": self.chosen}],
                [*self.prompt, {"role": "assistant", "content": self.rejected}])


def _answer(value, what: str) -> str:
    """An answer given as a string, one message, or a list of messages (one assistant turn)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"empty_{what}")
        msgs = _turns(value, "role" if "role" in value[0] else "from",
                      "content" if "content" in value[0] else "value") if isinstance(value[0], dict) else None
        if msgs is None or len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise BadRecord(f"{what}_not_one_assistant_turn")
        return msgs[0]["content"]
    return _text(value, what)


def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _turns(value, "role" if "role" in value[0] else "from",
                      "content" if "content" in value[0] else "value")
    raise BadRecord("bad_prompt")


def _split_implicit(chosen, rejected) -> tuple[list[dict], object, object]:
    """trl's implicit prompt: chosen and rejected are whole conversations."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise BadRecord("missing_prompt")
    c, r = _prompt(chosen), _prompt(rejected)
    k = 0
    while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
        k += 1
    if c[:k] != r[:k] or k == 0:
        raise BadRecord("no_common_prompt")
    return c[:k], c[k:], r[k:]


def detect_pair_format(record: dict) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "preferred_output" in record or "input" in record:
        return "openai"
    if "chosen" in record or "rejected" in record:
        return "trl"  # (a side missing is then a missing_field)
    raise BadRecord("unknown_format")


def to_pair(record: dict, fmt: str = "auto") -> Pair:
    fmt = detect_pair_format(record) if fmt == "auto" else fmt
    if fmt == "sharegpt":
        prompt, chosen, rejected = (_prompt(record.get("conversations")), record.get("chosen"),
                                    record.get("rejected"))
        if record.get("system"):
            prompt = [{"role": "system", "content": _text(record["system"], "system")}] + prompt
    elif fmt == "openai":
        inp = record.get("input")
        if not isinstance(inp, dict):
            raise BadRecord("missing_field")
        prompt, chosen, rejected = (_prompt(inp.get("messages")), record.get("preferred_output"),
                                    record.get("non_preferred_output"))
    elif fmt == "trl":
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if "prompt" in record:
            prompt = _prompt(record["prompt"])
        else:
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
    else:
        raise BadRecord(f"unknown_format:{fmt}")
    if chosen is None or rejected is None:
        raise BadRecord("missing_field")
    pair = Pair(prompt, _answer(chosen, "chosen"), _answer(rejected, "rejected"))
    margin = record.get("margin")
    if margin is not None:
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin != margin:
            raise BadRecord("bad_margin")
        pair.margin = float(margin)
    check_pair(pair)
    return pair


def check_pair(pair: Pair) -> None:
    for side in ("chosen", "rejected"):
        if not getattr(pair, side).strip():
            raise BadRecord(f"empty_{side}")
    if pair.chosen.strip() == pair.rejected.strip():
        raise BadRecord("identical_pair")
    chosen, _ = pair.conversations()
    check_conversation(chosen)
    check_conversation(pair.conversations()[1])
