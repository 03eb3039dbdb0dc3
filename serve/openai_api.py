"""OpenAI-compatible completions and chat completions on top of the engine.

Turns validated requests into engine Requests (prompts as text or token ids, n
choices, stop strings, limits), and engine Results into OpenAI response objects,
including the logprobs layout lm-evaluation-harness reads (`tokens`,
`token_logprobs` with None first, `top_logprobs`, `text_offset`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError

from serve.engine import Request, Result, TokenLogprob
from serve.engine_process import EngineDied
from serve.registry import ServedModel
from serve.sampling import SamplingParams
from serve.schemas import ChatRequest, CompletionRequest
from train.chat import compile_template
from zerolm.text import lone_surrogate

if TYPE_CHECKING:
    from starlette.requests import Request as StarletteRequest

MAX_CHOICES = 64  # prompts x n in one request
MAX_TOKENS_LIMIT = 4096


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        # Messages quote what the client sent (a model name, a field): a lone surrogate
        # in it (JSON "\ud800") cannot be written as UTF-8 and would turn the 4xx into a
        # 500 while rendering, so it is shown escaped instead.
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str | None) -> str | None:
    if text is None or lone_surrogate(text) is None:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ClientGone(Exception):
    """The HTTP client disconnected before its result was ready (its sequences were
    aborted); nobody is left to answer."""


def stream_error(exc: BaseException) -> APIError:
    """What a stream that fails after its 200 reports in its last event."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDied):
        return APIError(503, str(exc), type="server_error", code="engine_unavailable")
    return APIError(500, f"internal error: {type(exc).__name__}", type="internal_error")


@dataclass
class Prepared:
    prompt_ids: list[int]
    prompt_text: str


def prompts_of(req: CompletionRequest, served: ServedModel) -> list[Prepared]:
    """A string, a list of strings, token ids, or a list of token-id lists. Token ids
    are used as given: no re-tokenizing, nothing added."""
    eng, p = served.codec, req.prompt
    vocab = served.loaded.config.vocab_size
    if isinstance(p, str):
        items = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = eng.encode(item)
            out.append(Prepared(ids, item))
        else:
            if any(not 0 <= t < vocab for t in item):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append(Prepared(list(item), eng.decode(list(item))))
        if not out[-1].prompt_ids:
            raise APIError(400, "prompt encodes to no tokens", param="prompt")
    return out


def check_lengths(served: ServedModel, prompt_len: int, max_tokens: int, n_choices: int) -> None:
    ctx = served.codec.context
    if n_choices > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts x n), got {n_choices}", param="n")
    if max_tokens > MAX_TOKENS_LIMIT:
        raise APIError(400, f"max_tokens is at most {MAX_TOKENS_LIMIT}", param="max_tokens")
    if prompt_len + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")


def sampling(req, served: ServedModel, max_tokens: int, seed_offset: int, logprobs: int | None,
             stop_ids: tuple = ()) -> SamplingParams:
    seed = None if req.seed is None else req.seed + seed_offset
    if req.ignore_eos:
        stop_ids = ()
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          repetition_penalty=req.repetition_penalty, seed=seed, stop=tuple(req.stop or ()),
                          stop_ids=stop_ids, logprobs=logprobs)


async def run_all(served: ServedModel, requests: list[Request], http: "StarletteRequest | None" = None
                  ) -> list[Result]:
    """Submit the requests and wait for all their results. Cancelling this (or the
    client of `http` disconnecting) cancels the engine futures, and with them the
    sequences (serve/batching.py): nothing decodes for a client that is gone."""
    gathered = asyncio.gather(*(asyncio.wrap_future(served.batcher.submit(r)) for r in requests))
    gone = asyncio.ensure_future(_disconnected(http)) if http is not None else None
    try:
        if gone is None:
            return list(await gathered)
        await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            raise ClientGone()
        return list(gathered.result())
    finally:
        gathered.cancel()  # a no-op once done; else it aborts every sequence of this request
        if gone is not None:
            gone.cancel()


async def _disconnected(http: "StarletteRequest") -> None:
    """Returns when the client of a request whose body was read has disconnected:
    past the body, the next ASGI message a server sends is http.disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------ completions
def completion_requests(req: CompletionRequest, served: ServedModel) -> tuple[list[Prepared], list[Request]]:
    prompts = prompts_of(req, served)
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    for p in prompts:
        check_lengths(served, len(p.prompt_ids), max_tokens, len(prompts) * req.n)
    # A completion ends at the end-of-document token, as OpenAI's and vLLM's do.
    meta = served.loaded.meta
    eos = (meta.specials[meta.eos_token],) if meta.eos_token in meta.specials else ()
    engine_reqs = []
    for p in prompts:
        for k in range(req.n):
            engine_reqs.append(Request(p.prompt_ids, sampling(req, served, max_tokens, k, req.logprobs, eos),
                                       prompt_logprobs=req.echo and req.logprobs is not None))
    return prompts, engine_reqs


def _logprobs_block(served: ServedModel, entries: list[TokenLogprob | None], token_ids: list[int],
                    offset0: int) -> dict:
    tok_text = served.codec.token_text
    tokens, token_lps, tops, offsets, pos = [], [], [], [], offset0
    for tid, e in zip(token_ids, entries):
        text = tok_text(tid)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        token_lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {tok_text(a): lp for a, lp in e.top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def completion_response(req: CompletionRequest, served: ServedModel, prompts: list[Prepared],
                        results: list[Result]) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for idx, res in enumerate(results):
        p = prompts[idx // req.n]
        if idx % req.n == 0:
            prompt_tokens += len(p.prompt_ids)
        completion_tokens += len(res.output_ids)
        text = (p.prompt_text if req.echo else "") + res.text
        logprobs = None
        if req.logprobs is not None:
            block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if req.echo:
                block = _logprobs_block(served, res.prompt_logprobs, p.prompt_ids, 0)
            out_ids = [e.token_id for e in (res.output_logprobs or [])]
            gen = _logprobs_block(served, res.output_logprobs or [], out_ids, len(p.prompt_text) if req.echo else 0)
            logprobs = {k: block[k] + gen[k] for k in block}
        choices.append({"index": idx, "text": text, "logprobs": logprobs, "finish_reason": res.finish_reason,
                        **_incomplete(res)})
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# ------------------------------------------------------------------ chat

def render_chat(req: ChatRequest, served: ServedModel) -> list[int]:
    meta = served.loaded.meta
    if not meta.chat_template:
        raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        template = compile_template(meta.chat_template)  # the renderer training uses (train/chat.py)
    except TemplateError as exc:
        raise APIError(400, f"model {served.name!r} has an invalid chat template: {exc}", param="messages") from None
    text = template.render(
        messages=messages, add_generation_prompt=True, bos_token=meta.bos_token or "", eos_token=meta.eos_token or "")
    # The template's special tokens (<|im_start|>, ...) are parsed as such here.
    return served.loaded.tokenizer.encode(text, add_special_tokens=False).ids


def chat_requests(req: ChatRequest, served: ServedModel) -> tuple[list[int], list[Request]]:
    ids = render_chat(req, served)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:  # what fits; a prompt over the context is then refused by check_lengths
        max_tokens = max(0, min(512, served.codec.context - len(ids)))
    check_lengths(served, len(ids), max_tokens, req.n)
    top = (req.top_logprobs or 0) if req.logprobs else None
    return ids, [Request(ids, sampling(req, served, max_tokens, k, top, served.loaded.meta.stop_ids))
                 for k in range(req.n)]


def _chat_logprobs(served: ServedModel, entries: list[TokenLogprob]) -> dict:
    text = served.codec.token_text

    def item(tid, lp):
        t = text(tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(a, lp) for a, lp in e.top]}
                        for e in entries]}


def _incomplete(res: Result) -> dict:
    """Cut at max_tokens inside a character: the text leaves those bytes out and says how
    many (an extra field; OpenAI clients ignore it)."""
    return {"incomplete_utf8_bytes": res.incomplete_bytes} if res.incomplete_bytes else {}


def chat_response(req: ChatRequest, served: ServedModel, prompt_ids: list[int], results: list[Result]) -> dict:
    choices = []
    for i, res in enumerate(results):
        lp = _chat_logprobs(served, res.output_logprobs or []) if req.logprobs else None
        choices.append({"index": i, "message": {"role": "assistant", "content": res.text}, "logprobs": lp,
                        "finish_reason": res.finish_reason, **_incomplete(res)})
    completion = sum(len(r.output_ids) for r in results)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                      "total_tokens": len(prompt_ids) + completion}}


# ------------------------------------------------------------------ streaming
async def stream_events(served: ServedModel, requests: list[Request], chunk_of) -> "asyncio.AsyncIterator[str]":
    """Server-sent events: one `data:` line per text delta of any choice, then a final
    chunk per choice with its finish_reason, then `data: [DONE]`.

    A failure after the 200 (the engine process died) ends the stream with an event
    in OpenAI's error shape, which the openai client raises as an APIError, then
    `[DONE]`. When the client disconnects, Starlette cancels this generator, and the
    `finally` aborts the sequences still decoding."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        r.on_text = (lambda i: lambda text: loop.call_soon_threadsafe(deltas.put_nowait, (i, text)))(i)
    results_task = asyncio.ensure_future(run_all(served, requests))
    results_task.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))
    try:
        while True:
            item = await deltas.get()
            if item is None:
                break
            yield _event(chunk_of(item[0], item[1], None))
        try:
            results = results_task.result()
        except Exception as exc:  # noqa: BLE001 - after the 200, the error can only be an event
            yield _event(stream_error(exc).body())
        else:
            for i, res in enumerate(results):
                yield _event(chunk_of(i, None, res))
        yield "data: [DONE]\n\n"
    finally:
        results_task.cancel()


def _event(data: dict) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


def reward_conversation(messages, index: int) -> list[dict]:
    """A conversation to score: [system?] user, assistant, ... ending with the answer."""
    from train.conversations import BadRecord, check_conversation

    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        check_conversation(msgs)
    except BadRecord as exc:
        raise APIError(400, f"conversation {index}: {exc.args[0].replace('_', ' ')} (give [system,] user, assistant, "
                            "... ending with the assistant answer to score)", param="messages") from None
    return msgs
