"""Conversations to training tokens with the tokenizer's own chat template.

The template (tokenizer_config.json's `chat_template`, Jinja) is rendered exactly as
transformers' `apply_chat_template` renders it, so the ids trained on are the ids a
user's `AutoTokenizer.apply_chat_template(messages)` gives. Which characters are an
assistant's answer comes from rendering prefixes of the conversation: the answer to
turn i is what render(messages[:i+1]) adds to render(messages[:i],
add_generation_prompt=True), up to and including its end-of-turn token. The whole
text is then tokenized once, with offsets, and a token is trained on (mask 1) when it
starts inside such a span: every assistant turn of a multi-turn dialogue trains in
the same sequence, and each ends with `<|im_end|>` so the model learns to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from zerolm.errors import UserError

END_OF_TURN = "<|im_end|>"


@dataclass
class Encoded:
    ids: np.ndarray  # (n,) int32
    mask: np.ndarray  # (n,) uint8: 1 on the assistant tokens (answer text and its end-of-turn)
    answer_starts: list[int]  # token index where each assistant answer starts
    turn_ends: list[int]  # token index just after each assistant turn's end-of-turn token

    @property
    def prompt_len(self) -> int:
        """Tokens before the last answer (its generation prompt included)."""
        return self.answer_starts[-1]


def tokenizer_settings(d: Path) -> tuple[dict, str | None]:
    """tokenizer_config.json ({} if absent or unreadable) and the chat template: its
    `chat_template`, else a chat_template.jinja beside it (transformers 5 layout)."""
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cfg = {}
    template = cfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return cfg, template


class ChatTokenizer:
    def __init__(self, tokenizer_dir: str | Path):
        d = Path(tokenizer_dir)
        cfg, template = tokenizer_settings(d)
        if not template:
            raise UserError(f"{d}: the tokenizer has no chat template (tokenizer_config.json chat_template); "
                            "train one with `zerolm tokenizer train` or add a template")
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.end_id = self.tok.token_to_id(END_OF_TURN)
        if self.end_id is None:
            raise UserError(f"{d}: the tokenizer has no {END_OF_TURN} token to end assistant turns with")
        self.pad_id = self.tok.token_to_id("<|endoftext|>")
        self.pad_id = self.end_id if self.pad_id is None else self.pad_id
        self.special = {k: _content(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            self.template = compile_template(template)
        except TemplateError as exc:
            raise UserError(f"the chat template is not valid Jinja: {exc}") from None
        self.check_template()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def check_template(self) -> None:
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            self.spans(probe)
        except ValueError as exc:
            raise UserError(f"chat template unusable for training: {exc}") from None

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and each assistant answer's [start, end) characters."""
        full = self.render(messages)
        out = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError("the template does not render a conversation's prefixes as prefixes of it")
            end = upto.rfind(END_OF_TURN, len(before))
            if end < 0:
                raise ValueError(f"the template does not end assistant turns with {END_OF_TURN}")
            out.append((len(before), end + len(END_OF_TURN)))
        return full, out

    def encode_many(self, conversations: list[list[dict]]) -> list[Encoded]:
        rendered = [self.spans(c) for c in conversations]
        encodings = self.tok.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        return [self._labels(enc, spans) for enc, (_, spans) in zip(encodings, rendered)]

    def _labels(self, enc, spans: list[tuple[int, int]]) -> Encoded:
        ids = np.asarray(enc.ids, dtype=np.int32)
        starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)  # (n,) first character of each token
        ends = np.asarray([o[1] for o in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        turn_ends, answer_starts = [], []
        for a, b in spans:
            mask[(starts >= a) & (starts < b)] = 1
            answer_starts.append(int(np.searchsorted(starts, a, side="left")))
            last = np.flatnonzero((ends == b) & (ids == self.end_id))
            if not len(last):  # the end-of-turn token must be a token of its own
                raise ValueError("an assistant turn's end-of-turn token is not one token")
            turn_ends.append(int(last[0]) + 1)
        return Encoded(ids, mask, answer_starts, turn_ends)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """What generation starts from: the conversation with the generation prompt."""
        return self.tok.encode(self.render(messages, add_generation_prompt=True), add_special_tokens=False).ids


def truncate_at_turn(e: Encoded, max_tokens: int) -> Encoded | None:
    """e itself if it fits; else its longest prefix that ends with an assistant turn's
    end-of-turn token (later turns are dropped whole, never cut mid-answer); None if
    not even the first answer fits."""
    if len(e.ids) <= max_tokens:
        return e
    fitting = [t for t in e.turn_ends if t <= max_tokens]
    if not fitting:
        return None
    cut = fitting[-1]
    return Encoded(e.ids[:cut], e.mask[:cut], e.answer_starts[:len(fitting)], fitting)


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


@lru_cache(maxsize=16)
def compile_template(template: str):
    """As transformers compiles chat templates: a sandboxed, immutable Jinja
    environment with trim_blocks and lstrip_blocks (the file is user input: the
    sandbox keeps a template from reaching Python internals). Raises TemplateError."""
    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
