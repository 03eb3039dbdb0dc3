"""The server's engine process: load errors reach the user as one line, a dead engine
fails requests at once (503) instead of hanging, and stopping the server stops it."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import signal
import subprocess
import time

import httpx
import openai
import psutil
import pytest

from tests.serve.serving import decode_steps as step_stats, start_server, wait_healthy


def engine_children(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if "multiprocessing.spawn" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]


def decode_steps(url: str) -> float:
    return step_stats(url)[0]


def test_weights_that_do_not_load_are_a_one_line_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir / "hf", broken)
    cfg = json.loads((broken / "model_config.json").read_text())
    cfg["n_layers"] += 1  # the weights no longer match: found only by the engine process
    (broken / "model_config.json").write_text(json.dumps(cfg))
    proc, _ = start_server(broken)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, out
    lines = [ln for ln in out.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("zerolm: error:") and "weights do not match" in lines[0], out


@pytest.mark.slow
def test_dead_engine_fails_requests_and_health_then_server_stops_cleanly(tiny_model_dir):
    proc, url = start_server(tiny_model_dir)
    try:
        wait_healthy(proc, url)
        (engine,) = engine_children(proc)
        # 32 choices x 240 tokens: seconds of decoding on CPU
        body = {"model": "tiny", "prompt": "中华人民共和国", "max_tokens": 240, "n": 32, "temperature": 0,
                "ignore_eos": True}
        steps0 = decode_steps(url)
        with cf.ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            while decode_steps(url) < steps0 + 5:  # the request is decoding now
                time.sleep(0.02)
            engine.send_signal(signal.SIGKILL)
            r = running.result()
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_unavailable" and "exited" in err["message"]
        started = time.time()
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and time.time() - started < 5  # fails at once, never hangs
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["dead"] == ["tiny"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=30)
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_stopping_the_server_stops_its_engine(tiny_model_dir):
    proc, url = start_server(tiny_model_dir)
    wait_healthy(proc, url)
    (engine,) = engine_children(proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    engine.wait(timeout=30)
    out = proc.stdout.read()
    assert "Traceback" not in out, out


def test_a_dead_engine_ends_streams_with_an_error_event_and_new_requests_get_503(tiny_model_dir):
    """Streams in flight when the engine dies end with an error event in OpenAI's shape
    (the openai client raises it) and `[DONE]`; afterwards streamed and whole requests
    get a 503 before any 200, instead of an empty 200 stream."""
    proc, url = start_server(tiny_model_dir)
    try:
        wait_healthy(proc, url)
        (engine,) = engine_children(proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        # 16 choices x 240 tokens: seconds of decoding on CPU, so both are in flight at the kill
        body = {"model": "tiny", "prompt": "中华人民共和国", "max_tokens": 240, "n": 16, "temperature": 0}
        sdk_stream = iter(client.completions.create(**body, stream=True, extra_body={"ignore_eos": True}))
        next(sdk_stream)
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True, "ignore_eos": True},
                          timeout=60) as raw:
            events = raw.iter_lines()
            assert next(events).startswith("data: {")
            engine.kill()
            tail = [line for line in events if line]
        assert raw.status_code == 200 and tail[-1] == "data: [DONE]", tail[-3:]
        err = json.loads(tail[-2].removeprefix("data: "))["error"]
        assert err["code"] == "engine_unavailable" and "exited" in err["message"], err
        assert set(err) == {"message", "type", "param", "code"}
        with pytest.raises(openai.APIError) as raised:
            list(sdk_stream)
        # the error event itself, not a dropped connection (APIConnectionError is an APIError too)
        assert type(raised.value) is openai.APIError and "exited" in raised.value.message

        chat = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
        for path, request in (("/v1/completions", {**body, "n": 1}), ("/v1/chat/completions", chat)):
            for stream in (True, False):
                r = httpx.post(url + path, json={**request, "stream": stream}, timeout=30)
                assert r.status_code == 503, (path, stream, r.status_code, r.text)
                assert r.json()["error"]["code"] == "engine_unavailable"
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(**chat, stream=True)
        assert refused.value.status_code == 503
        assert httpx.get(url + "/health", timeout=5).status_code == 503
    finally:
        proc.kill()
        proc.wait(timeout=30)
