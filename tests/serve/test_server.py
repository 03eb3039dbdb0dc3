"""`zerolm serve` as users meet it: a real server in a subprocess on a free port, the
unmodified `openai` client, raw HTTP for the extra routes, errors, and load."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest

from tests.serve.serving import start_server, wait_healthy

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--api-key", KEY, "--max-batch", "64")
    wait_healthy(proc, url)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body, key=KEY):
    return httpx.post(server + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_openai_client_completion_and_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="人民日报", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 6
    again = client.completions.create(model="tiny", prompt="人民日报", max_tokens=6, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    seeded = [client.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=1.0, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_openai_client_streams_chat(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                            max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                          max_tokens=8, temperature=0)
    assert full.choices[0].message.content == text


def test_typed_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=9)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "n": 500})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * (9 << 20)})
    assert r.status_code == 400 and "body" in r.json()["error"]["message"]
    chunks = (b'{"model": "tiny", "prompt": "' if i == 0 else b"x" * (1 << 20) for i in range(10))
    r = httpx.post(server + "/v1/completions", content=chunks, timeout=60,  # chunked: no Content-Length
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "body_too_large", r.text
    small = (part for part in (b'{"model": "tiny", ', b'"prompt": "x", "max_tokens": 2}'))
    r = httpx.post(server + "/v1/completions", content=small, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": [[1, 2, 999999]]})
    assert r.status_code == 400
    # extra fields real clients send are ignored
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1, "presence_penalty": 0,
                                         "user": "u", "best_of": 1})
    assert r.status_code == 200


def test_bad_content_parts_and_lone_surrogates_are_400s_and_the_connection_lives_on(server):
    surrogate = '"a\\ud800b"'  # JSON text whose string decodes to a lone surrogate
    bad_bodies = [
        *(b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % v
          for v in (b"5", b"null", b"[1]", b'{"a": 1}', surrogate.encode())),
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": %s}]}' % surrogate.encode(),
        b'{"model": "tiny", "prompt": %s, "max_tokens": 1}' % surrogate.encode(),
        b'{"model": "tiny", "prompt": "x", "stop": [%s], "max_tokens": 1}' % surrogate.encode(),
    ]
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=server, headers=headers, timeout=60) as session:  # one keep-alive connection
        for body in bad_bodies:
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            r = session.post(path, content=body)
            assert r.status_code == 400, (body, r.status_code, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            ok = session.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "你好"}]}]})
            assert ok.status_code == 200, ok.text


def test_echo_logprobs_layout_for_lm_eval(server):
    ids = post(server, "/tokenize", {"model": "tiny", "prompt": "中共中央总书记江泽民"}).json()["tokens"]
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": [ids], "max_tokens": 0, "echo": True,
                                         "logprobs": 1, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["usage"]["prompt_tokens"] == len(ids) == len(lp["tokens"])  # ids used as given
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(own <= max(top.values()) for own, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    assert r["choices"][0]["text"] == "中共中央总书记江泽民"
    assert post(server, "/detokenize", {"model": "tiny", "tokens": ids}).json() == {"prompt": "中共中央总书记江泽民"}
    # lm-eval's is_greedy: a greedy token's logprob equals its top-1 entry bit for bit
    g = post(server, "/v1/completions", {"model": "tiny", "prompt": [ids], "max_tokens": 4, "echo": True,
                                         "logprobs": 1, "temperature": 0}).json()["choices"][0]["logprobs"]
    for own, top in zip(g["token_logprobs"][len(ids):], g["top_logprobs"][len(ids):]):
        assert own == max(top.values())


def test_stop_strings_excluded_and_info_routes(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "1", "max_tokens": 30, "temperature": 0}).json()
    text = r["choices"][0]["text"]
    if len(text) > 3:
        stop = text[2:4]
        s = post(server, "/v1/completions", {"model": "tiny", "prompt": "1", "max_tokens": 30, "temperature": 0,
                                             "stop": [stop]}).json()["choices"][0]
        assert s["text"] == text[: text.find(stop)] and s["finish_reason"] == "stop"
    info = httpx.get(server + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|endoftext|>" and "<|im_start|>" in info["chat_template"]
    metrics = httpx.get(server + "/metrics", headers=AUTH).text
    assert "zerolm_requests_total" in metrics and "zerolm_batch_size_bucket" in metrics


def test_completion_ends_at_end_of_document_unless_ignore_eos(server):
    # One request at a time: alone in the batch, a seeded sample is the same with and
    # without ignore_eos up to the end of the document. (Among other requests that
    # finish at different times its float rounding, and so rarely a draw, may differ.)
    body = {"model": "tiny", "prompt": "新华社北京", "max_tokens": 48, "temperature": 1.0}
    free = [post(server, "/v1/completions", {**body, "seed": s, "ignore_eos": True}).json()["choices"][0]
            for s in range(16)]
    ended = [post(server, "/v1/completions", {**body, "seed": s}).json()["choices"][0] for s in range(16)]
    eos = "<|endoftext|>"
    hits = 0
    for f, e in zip(free, ended):
        if eos in f["text"]:  # the same seeded sample, cut where the document ended
            hits += 1
            assert e["text"] == f["text"][: f["text"].index(eos)] and e["finish_reason"] == "stop"
        else:
            assert e["text"] == f["text"] and e["finish_reason"] == f["finish_reason"] == "length"
    assert hits > 0  # the model was trained on short documents: some samples must end


def test_64_concurrent_requests_batched_equal_sequential(server):
    prompts = [f"第{i}条新闻：" if i % 2 else f"Item {i} of the list:" for i in range(64)]

    def ask(p):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def batch_stats() -> tuple[float, float]:
        lines = httpx.get(server + "/metrics", headers=AUTH).text.splitlines()
        value = lambda name: float(next(ln.split()[-1] for ln in lines if ln.startswith(name)))  # noqa: E731
        return value("zerolm_batch_size_sum"), value("zerolm_batch_size_count")

    sum0, steps0 = batch_stats()
    with cf.ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, prompts))
    sum1, steps1 = batch_stats()
    alone = [ask(p) for p in prompts[:8]]
    assert together[:8] == alone
    # sequences per decode step during the burst: they were decoded together
    assert (sum1 - sum0) / (steps1 - steps0) > 8


def test_many_large_scoring_requests_at_once(server):
    """Echo + top-5 logprobs of 200-token prompts from 48 clients at once: about a
    megabyte of results crosses the pipe from the engine process while requests keep
    arriving; all arrive, each equal to the same request sent alone."""
    text = "中华人民共和国国务院新闻办公室今天发表白皮书。" * 20
    ids = post(server, "/tokenize", {"model": "tiny", "prompt": text}).json()["tokens"][:200]
    bodies = [{"model": "tiny", "prompt": [ids[k:] + ids[:k]], "max_tokens": 2, "echo": True, "logprobs": 5,
               "temperature": 0} for k in range(48)]

    def ask(body):
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]

    with cf.ThreadPoolExecutor(48) as pool:
        together = list(pool.map(ask, bodies))
    assert all(len(lp["tokens"]) == 202 and len(lp["top_logprobs"][5]) == 5 for lp in together)
    for k in (0, 17, 47):
        alone = ask(bodies[k])
        assert alone["tokens"] == together[k]["tokens"]
        assert alone["token_logprobs"][1:] == pytest.approx(together[k]["token_logprobs"][1:], abs=1e-4)


def test_metrics_need_the_key_label_routes_by_template_and_stay_small(server):
    """20,000 requests to unique unknown paths grew /metrics from 9 KB to 11 MB when it
    labelled by raw path; by route template it grows by one series."""
    assert httpx.get(server + "/metrics").status_code == 401
    before = len(httpx.get(server + "/metrics", headers=AUTH).text)
    with httpx.Client(headers=AUTH) as http:
        for i in range(300):
            assert http.get(f"{server}/no/such/path/{i}").status_code == 404
    text = httpx.get(server + "/metrics", headers=AUTH).text
    assert 'route="unmatched",status="404"} 300.0' in text and "/no/such/path" not in text
    assert len(text) - before < 2000, len(text) - before
    assert 'route="/metrics",status="401"' in text


def test_an_internal_error_is_counted_as_a_500():
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.registry import Registry

    app = create_app(Registry())

    @app.get("/v1/boom/{item}")
    async def boom(item: str):
        raise ValueError(item)

    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.get("/v1/boom/x")
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        assert 'zerolm_requests_total{route="/v1/boom/{item}",status="500"} 1.0' in http.get("/metrics").text
