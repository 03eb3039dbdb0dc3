"""The HTTP layer: FastAPI routes, OpenAI-shaped errors, API key, body-size limit and
Prometheus metrics. Everything model-related is in engine.py / openai_api.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from serve import openai_api as oa
from serve.engine_process import EngineDied
from serve.registry import Registry, ServedModel
from serve.schemas import (ChatRequest, CompletionRequest, DetokenizeRequest, EvaluationRequest,
                           RewardRequest, TokenizeRequest)

OPEN_ROUTES = {"/health"}  # reachable without the API key (liveness probes); /metrics needs it
UNMATCHED = "unmatched"  # the route label of any path no route serves
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first": only /metrics sees it


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends.
    When the client disconnects, Starlette cancels the task that iterates the body; if
    that task was waiting in `send` (not inside the generator), the generator stays
    suspended at its `yield` until garbage collection, and its `finally`, which aborts
    the request's sequences (serve/openai_api.py stream_events), runs late or never:
    measured, 2 of 32 abandoned streams decoded to max_tokens. Closing it here runs
    that `finally` at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("zerolm_requests_total", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("zerolm_request_latency_seconds", "request latency", ["route"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.prompt_tokens = Counter("zerolm_prompt_tokens_total", "prompt tokens", ["model"], registry=self.registry)
        self.generated = Counter("zerolm_generation_tokens_total", "generated tokens", ["model"],
                                 registry=self.registry)
        self.batch = Histogram("zerolm_batch_size", "requests decoded together", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=self.registry)
        self.step = Histogram("zerolm_decode_step_seconds", "wall time of one decode step (a token for every "
                              "running sequence)", buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
                              registry=self.registry)

    def observe_step(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.step.observe(seconds)


class _BodyLimit:
    """ASGI middleware for bodies sent without a Content-Length (chunked): reads them up
    to max_bytes before the app runs and answers 400 past that, so no body is unbounded.
    (A declared length over the limit is refused in `guard` before anything is read.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(k == b"content-length" for k, _ in scope["headers"]):
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _error(400, f"request body over {self.max_bytes} bytes", code="body_too_large")(
                    scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(oa.APIError(status, message, type=type, param=param, code=code).body(), status_code=status)


def create_app(registry: Registry, *, api_key: str | None = None, max_body_bytes: int = 8 << 20,
               metrics: Metrics | None = None, eval_sets: dict | None = None) -> FastAPI:
    """eval_sets: name -> serve.eval.api.EvalDataset, the local sets /v1/evaluations may name."""
    @asynccontextmanager
    async def lifespan(_app):
        yield
        registry.close()  # stop engine processes with the server (also under TestClient)

    app = FastAPI(title="zerolm", version="0.1.0", lifespan=lifespan)
    reward_lock = asyncio.Lock()
    m = metrics or Metrics()
    app.state.metrics, app.state.registry, app.state.eval_sets = m, registry, dict(eval_sets or {})

    def route_of(request: Request) -> str:
        """The route's template, never the raw path: one label per route, so requests to
        unknown paths cannot grow /metrics (each raw path would be a new time series)."""
        for r in app.router.routes:
            match, _ = r.matches(request.scope)
            if match == Match.FULL:
                return getattr(r, "path", UNMATCHED)
        return UNMATCHED

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started, route = time.time(), route_of(request)
        if api_key and route not in OPEN_ROUTES:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {api_key}":
                m.requests.labels(route, "401").inc()
                return _error(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                              type="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            m.requests.labels(route, "400").inc()
            return _error(400, f"request body over {max_body_bytes} bytes", code="body_too_large")
        try:
            response = await call_next(request)
        except Exception:  # answered 500 by the handler outside this middleware: count it here
            m.requests.labels(route, "500").inc()
            raise
        m.requests.labels(route, str(response.status_code)).inc()
        m.latency.labels(route).observe(time.time() - started)
        return response

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        msg = err.get("msg", "invalid request")
        return _error(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", param=".".join(loc) or None)

    @app.exception_handler(oa.APIError)
    async def api_error(_request, exc: oa.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(EngineDied)
    async def engine_died(_request, exc: EngineDied):
        err = oa.stream_error(exc)  # the same error a stream in flight ends with
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(oa.ClientGone)
    async def client_gone(_request, _exc: oa.ClientGone):
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; its sequences were aborted

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}", type="internal_error")

    def model_or_404(name: str | None) -> ServedModel:
        served = registry.get(name)
        if served is None:
            raise oa.APIError(404, f"The model '{name}' does not exist; served: {sorted(registry.models)}",
                              param="model", code="model_not_found")
        return served

    def generator_or_400(name: str | None) -> ServedModel:
        served = model_or_404(name)
        if served.scorer is not None:
            raise oa.APIError(400, f"'{served.name}' is a reward model: it scores conversations on /v1/rewards and "
                                   "generates nothing", param="model", code="reward_model")
        if not served.alive:  # a 503 now, before a stream's 200 could promise tokens
            raise EngineDied(served.batcher.dead_reason)
        return served

    def count(served: ServedModel, prompt: int, generated: int) -> None:
        m.prompt_tokens.labels(served.name).inc(prompt)
        m.generated.labels(served.name).inc(generated)

    @app.get("/health")
    async def health():
        dead = sorted(name for name, s in registry.models.items() if not s.alive)
        if dead:  # an engine process died: probes should restart this server
            return JSONResponse({"status": "error", "models": sorted(registry.models), "dead": dead},
                                status_code=503)
        return {"status": "ok", "models": sorted(registry.models)}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "zerolm",
             "max_model_len": s.codec.context} for s in registry.models.values()]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        served = generator_or_400(req.model)
        prompts, engine_reqs = oa.completion_requests(req, served)
        if req.stream:
            cid = f"cmpl-{uuid.uuid4().hex[:24]}"

            def chunk(i, text, res):
                choice = {"index": i, "text": text or "", "logprobs": None,
                          "finish_reason": res.finish_reason if res else None}
                if res is not None:
                    count(served, len(res.prompt_ids) if i % req.n == 0 else 0, len(res.output_ids))
                return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": served.name,
                        "choices": [choice]}

            return ClosingStreamingResponse(oa.stream_events(served, engine_reqs, chunk),
                                            media_type="text/event-stream")
        results = await oa.run_all(served, engine_reqs, http)
        body = oa.completion_response(req, served, prompts, results)
        count(served, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return body

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: Request):
        served = generator_or_400(req.model)
        prompt_ids, engine_reqs = oa.chat_requests(req, served)
        if req.stream:
            cid, started = f"chatcmpl-{uuid.uuid4().hex[:24]}", set()

            def chunk(i, text, res):
                delta = {} if res else {"content": text}
                if i not in started:
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                if res is not None:
                    count(served, len(prompt_ids) if i == 0 else 0, len(res.output_ids))
                return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": served.name, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                           "finish_reason": res.finish_reason if res else None}]}

            return ClosingStreamingResponse(oa.stream_events(served, engine_reqs, chunk),
                                            media_type="text/event-stream")
        results = await oa.run_all(served, engine_reqs, http)
        body = oa.chat_response(req, served, prompt_ids, results)
        count(served, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return body

    @app.post("/v1/rewards")
    async def rewards(req: RewardRequest):
        served = model_or_404(req.model)
        if served.scorer is None:
            raise oa.APIError(400, f"'{served.name}' is not a reward model", param="model", code="not_a_reward_model")
        if (req.messages is None) == (req.conversations is None):
            raise oa.APIError(400, "give one conversation as 'messages' or several as 'conversations'",
                              param="messages")
        convs = [req.messages] if req.messages is not None else req.conversations
        scored = [oa.reward_conversation(c, i) for i, c in enumerate(convs)]
        ids = [served.scorer.ids(c) for c in scored]
        for i, seq in enumerate(ids):
            if len(seq) > served.scorer.context:
                raise oa.APIError(400, f"conversation {i} has {len(seq)} tokens, over the model's context of "
                                       f"{served.scorer.context}", param="messages", code="context_length_exceeded")
        async with reward_lock:  # one forward at a time: the scorer's model is not re-entrant on a GPU stream
            scores = await asyncio.to_thread(served.scorer.score_ids, ids)
        m.prompt_tokens.labels(served.name).inc(sum(map(len, ids)))
        return {"object": "list", "model": served.name,
                "data": [{"object": "reward", "index": i, "score": s} for i, s in enumerate(scores)]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        served = model_or_404(req.model)
        text = req.prompt if req.prompt is not None else req.text
        if text is None:
            raise oa.APIError(400, "give the text as 'prompt'", param="prompt")
        ids = served.codec.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.codec.context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        served = model_or_404(req.model)
        vocab = served.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise oa.APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": served.codec.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        served = model_or_404(model)
        meta = served.loaded.meta
        return {"model": served.name, "eos_token": meta.eos_token, "bos_token": meta.bos_token,
                "pad_token": meta.pad_token, "chat_template": meta.chat_template,
                "model_max_length": served.codec.context,
                "vocab_size": served.loaded.tokenizer.get_vocab_size(with_added_tokens=True),
                "special_tokens": meta.specials, "stop_token_ids": list(meta.stop_ids)}

    @app.post("/v1/evaluations")
    async def evaluations(req: EvaluationRequest):
        served = generator_or_400(req.model)
        from serve.eval.api import run_evaluation  # evaluation code loads only when used

        return await asyncio.to_thread(run_evaluation, served, req, app.state.eval_sets)

    return app
