"""A client that goes away stops costing decode steps: its sequences leave the engine's
batch (across the engine process's pipe) whether it was streaming or waiting for a
whole response. Measured in decode steps from /metrics, not wall time, so a slow or
busy machine changes nothing."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.serve.serving import decode_steps, running_server, wait_idle

MAX_TOKENS = 240  # nearly the tiny model's whole context: seconds of decoding at batch 32
LONG = {"model": "tiny", "prompt": "中华人民共和国", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    yield from running_server(tiny_model_dir, "--max-batch", "64")


def open_stream_and_leave(url: str) -> None:
    """Start a streamed completion, read its first bytes, then close the connection."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_raw())


def test_streams_closed_after_their_first_bytes_stop_decoding(server):
    steps0 = wait_idle(server)
    with cf.ThreadPoolExecutor(32) as pool:
        list(pool.map(open_stream_and_leave, [server] * 32))
    # At once, while the 32 abandoned rows would still have most of their tokens to go:
    # the next request's decode steps are (nearly) its own.
    steps1, seqs1 = decode_steps(server)
    r = httpx.post(server + "/v1/completions", json={**LONG, "max_tokens": 16}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    steps2, seqs2 = decode_steps(server)
    assert (seqs2 - seqs1) / (steps2 - steps1) < 8, "the abandoned streams shared the next request's steps"
    steps = wait_idle(server) - steps0
    # Without aborting, the engine decodes every abandoned row to max_tokens.
    assert steps < MAX_TOKENS / 2, f"{steps} decode steps after 32 streams were closed"


def test_a_non_streaming_client_that_disconnects_stops_decoding(server):
    steps0 = wait_idle(server)
    body = json.dumps({**LONG, "n": 16}).encode()
    address = urlparse(server)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 60
        while decode_steps(server)[0] < steps0 + 3:  # it is decoding now
            assert time.time() < deadline, "the request never started decoding"
            time.sleep(0.01)
    steps = wait_idle(server) - steps0
    assert steps < MAX_TOKENS / 2, f"{steps} decode steps for a request whose client left"
    r = httpx.post(server + "/v1/completions", json={**LONG, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    metrics = httpx.get(server + "/metrics", timeout=10).text
    assert 'route="/v1/completions",status="499"' in metrics  # counted, and not as a 500
