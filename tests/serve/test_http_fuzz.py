"""A bounded, seeded fuzz of the HTTP API: valid bodies of every route, mutated one or
two fields at a time (wrong types, extreme numbers, NaN, deep nesting, lone surrogates,
control characters, truncated or non-JSON bytes, wrong content types). Whatever a
client sends: never a 5xx, every error in OpenAI's shape, and the keep-alive
connection keeps serving. A failure prints the seed's case so it can be replayed."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.serve.serving import running_server

CASES = 240
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
TEMPLATES = {
    "/v1/completions": {"model": "tiny", "prompt": "北京", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9,
                        "n": 1, "stop": ["。"], "logprobs": 1, "echo": False, "seed": 1},
    "/v1/chat/completions": {**CHAT, "temperature": 0, "top_logprobs": 1, "logprobs": True,
                             "max_completion_tokens": 2},
    "/v1/rewards": {"model": "tiny", "messages": CHAT["messages"] + [{"role": "assistant", "content": "好"}]},
    "/tokenize": {"model": "tiny", "prompt": "北京欢迎你"},
    "/detokenize": {"model": "tiny", "tokens": [1, 2, 3]},
    "/v1/evaluations": {"model": "tiny", "task": "bpb", "texts": ["今天天气很好。"]},
}
ODD_VALUES = [None, True, -1, 0, 2 ** 31, 2 ** 63, 10 ** 30, -1e308, 1e308, 0.5, "", "x" * 5000,
              "\ud800", "\x00\x1b[31m", "中" * 300, [], [None], [[1, [2]]], {}, {"a": {"b": []}},
              [-5, 2 ** 40], [{"role": "user"}], [{"role": "tool", "content": [{"type": "text", "text": 1}]}]]
RAW_BODIES = [b"", b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"model": NaN}', b'{"model": "tiny", "n": Infinity}',
              b"[" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, "{\"prompt\": \"\\ud800\"}".encode()]


DEEP = "__deeply_nested__"  # replaced in the body's text: json.dumps itself cannot nest 2000 deep


def mutate(rng: random.Random, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(rng.choice((1, 1, 2))):
        key = rng.choice([*body, "unknown_field"])
        action = rng.random()
        if action < 0.15:
            body.pop(key, None)
        elif action < 0.25:
            body[key] = DEEP
        elif action < 0.3 and isinstance(body.get(key), (int, float)) and not isinstance(body[key], bool):
            body[key] = float("nan")  # json.dumps writes NaN, which Python's parser reads back
        else:
            body[key] = rng.choice(ODD_VALUES)
    return body


def cases(seed: int):
    rng = random.Random(seed)
    paths = list(TEMPLATES)
    for i in range(CASES):
        path = rng.choice(paths)
        if i % 12 == 11:
            yield path, rng.choice(RAW_BODIES), rng.choice(("application/json", "text/plain"))
        else:
            text = json.dumps(mutate(rng, TEMPLATES[path]), ensure_ascii=rng.random() < 0.5)
            depth = rng.choice((50, 2000))
            text = text.replace(f'"{DEEP}"', "[" * depth + "1" + "]" * depth)
            yield path, text.encode("utf-8", "surrogatepass"), "application/json"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    yield from running_server(tiny_model_dir, "--max-batch", "16")


def test_fuzzed_requests_never_get_a_5xx_and_errors_keep_their_shape(server):
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server, timeout=120) as session:  # one keep-alive connection throughout
        for i, (path, body, content_type) in enumerate(cases(seed=15)):
            r = session.post(path, content=body, headers={"content-type": content_type})
            case = f"case {i}: POST {path} {body[:300]!r} -> {r.status_code} {r.text[:300]}"
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, case
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, case
                assert isinstance(err["message"], str) and err["message"], case
            if i % 20 == 19:  # the connection still serves real work
                ok = session.post("/v1/chat/completions", json=CHAT)
                assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None, case
    print("status counts:", statuses)
    # the fuzz reached both the handlers and the validators
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= CASES // 3, statuses
