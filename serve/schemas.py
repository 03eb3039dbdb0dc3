"""Request bodies of the HTTP API (OpenAI's field names). Unknown fields are ignored,
because real clients send many (presence_penalty, user, ...); known fields are
validated, and a violation is a 400 in OpenAI's error shape (see serve/app.py)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from zerolm.text import lone_surrogate


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _utf8(value):
    """Strings of a request must be encodable: JSON's "\\ud800" escape decodes to a lone
    surrogate, which no tokenizer can encode (a 400 here, not a 500 later)."""
    for s in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        bad = lone_surrogate(s) if isinstance(s, str) else None
        if bad is not None:
            raise ValueError(f"text holds a lone surrogate (\\u{ord(s[bad]):04x}) at character {bad}")
    return value


class SamplingFields(_Lenient):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension (vLLM): 0 = off
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # extension (vLLM)
    n: int = Field(default=1, ge=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    # Extension (vLLM): keep generating past the end-of-document / end-of-turn token,
    # e.g. for benchmarks that need a fixed number of new tokens.
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 8 or any(len(s) > 200 for s in stops):
            raise ValueError("at most 8 stop strings of at most 200 characters")
        return _utf8(stops)


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    _prompt_text = field_validator("prompt")(classmethod(lambda cls, v: _utf8(v)))
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    max_tokens: Optional[int] = Field(default=16, ge=0)  # OpenAI's default for completions


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = ""

    @field_validator("content")
    @classmethod
    def _parts(cls, value):
        """A string, or OpenAI's content parts [{"type": "text", "text": "..."}]; a text
        part's text must be a string; other part types (images, audio) are refused."""
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type", "text")
                if kind != "text":
                    raise ValueError(f"content part {i}: type {kind!r} is not supported (text only)")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i}: 'text' must be a string, got "
                                     f"{type(part.get('text')).__name__}")
                _utf8(part["text"])
        return _utf8(value)

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class TokenizeRequest(_Lenient):
    model: Optional[str] = None
    prompt: Optional[str] = None
    text: Optional[str] = None  # accepted as a synonym of prompt
    _strings = field_validator("prompt", "text")(classmethod(lambda cls, v: _utf8(v)))


class DetokenizeRequest(_Lenient):
    model: Optional[str] = None
    tokens: list[int]


class EvaluationRequest(_Lenient):
    model: str
    task: Literal["bpb", "multiple_choice"]
    # bpb: raw texts to score; multiple_choice: items {question, choices, answer,
    # subject?} or a named local set (see serve/eval)
    texts: Optional[list[str]] = None
    dataset: Optional[str] = None
    items: Optional[list[dict]] = None
    shots: int = Field(default=0, ge=0, le=10)
    limit: Optional[int] = Field(default=None, ge=1)


class RewardRequest(_Lenient):
    """POST /v1/rewards: one conversation (`messages`) or several (`conversations`),
    each ending with the assistant answer to score."""

    model: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    conversations: Optional[list[list[ChatMessage]]] = Field(default=None, max_length=256)
