"""Chat backends against real servers on loopback: mlx_lm.server with the embedded model, and a small
HTTP server of our own that answers 429/500 first (to exercise retries, backoff and concurrency)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mlx_cai import chat
from mlx_cai.sampling import SamplingConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Script:
    """What the fake-free test server answers: a queue of statuses, then 200s; tracks concurrency."""

    def __init__(self, statuses=(), delay=0.0):
        self.statuses = list(statuses)
        self.delay = delay
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.bodies = []


def serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.calls += 1
                script.inflight += 1
                script.max_inflight = max(script.max_inflight, script.inflight)
                status = script.statuses.pop(0) if script.statuses else 200
                script.bodies.append((body, self.headers.get("Authorization")))
            time.sleep(script.delay)
            with script.lock:
                script.inflight -= 1
            if status != 200:
                payload = json.dumps({"error": {"message": f"status {status}"}}).encode()
            else:
                text = "echo: " + body["messages"][-1]["content"]
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def convs(*texts):
    return [[{"role": "user", "content": t}] for t in texts]


def test_retries_429_and_500_with_backoff_then_succeeds():
    script = Script(statuses=[429, 500])
    server, url = serve(script)
    try:
        b = chat.OpenAIBackend(model="m", base_url=url, backoff=0.01, max_retries=3)
        [g] = b.complete(convs("hi"), SamplingConfig(max_tokens=5))
        assert g.text == "echo: hi" and g.finish_reason == "stop" and g.completion_tokens == 2
        assert script.calls == 3
    finally:
        server.shutdown()


def test_gives_up_after_max_retries_with_one_line_error():
    server, url = serve(Script(statuses=[503] * 10))
    try:
        b = chat.OpenAIBackend(model="m", base_url=url, backoff=0.01, max_retries=2)
        with pytest.raises(chat.BackendError, match="gave up after 3 tries"):
            b.complete(convs("hi"), SamplingConfig(max_tokens=5))
    finally:
        server.shutdown()


def test_client_errors_are_not_retried():
    script = Script(statuses=[400])
    server, url = serve(script)
    try:
        b = chat.OpenAIBackend(model="m", base_url=url, backoff=0.01)
        with pytest.raises(chat.BackendError, match="HTTP 400"):
            b.complete(convs("hi"), SamplingConfig(max_tokens=5))
        assert script.calls == 1
    finally:
        server.shutdown()


def test_concurrency_is_bounded_and_order_kept():
    script = Script(delay=0.05)
    server, url = serve(script)
    try:
        b = chat.OpenAIBackend(model="m", base_url=url, concurrency=2)
        texts = [f"q{i}" for i in range(8)]
        out = b.complete(convs(*texts), SamplingConfig(max_tokens=5))
        assert [g.text for g in out] == [f"echo: {t}" for t in texts]
        assert script.max_inflight == 2
    finally:
        server.shutdown()


def test_api_key_comes_from_the_environment_only(monkeypatch):
    script = Script()
    server, url = serve(script)
    try:
        monkeypatch.setenv("MY_KEY", "sk-test-123")
        b = chat.from_spec(f"openai:m@{url}", api_key_env="MY_KEY")
        b.complete(convs("hi"), SamplingConfig(max_tokens=5))
        assert script.bodies[0][1] == "Bearer sk-test-123"
        assert "sk-test" not in json.dumps(vars(b), default=str).replace(repr(b._client), "")
    finally:
        server.shutdown()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(chat.BackendError, match=r"\$OPENAI_API_KEY"):
        chat.from_spec("openai:gpt-4o@https://api.example.invalid/v1").check()


def test_down_server_fails_check_quickly():
    b = chat.OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(chat.BackendError, match="not reachable"):
        b.check()


def test_spec_parsing():
    assert isinstance(chat.from_spec("smollm2-135m"), chat.LocalBackend)
    lb = chat.from_spec("local:smollm2-135m::runs/x/final")
    assert lb.model_spec == "smollm2-135m" and lb.adapter == "runs/x/final"
    ob = chat.from_spec("openai:gpt-4o@http://127.0.0.1:8080/v1")
    assert ob.model == "gpt-4o" and ob.base_url == "http://127.0.0.1:8080/v1"


@pytest.fixture(scope="module")
def mlx_lm_server():
    """mlx_lm.server serving the embedded model on 127.0.0.1, started and stopped here."""
    from mlx_cai import models

    folder = models.resolve("smollm2-135m")
    port = free_port()
    code = ("import sys, mlx_cai.backend; from mlx_lm.server import main; "
            f"sys.argv=['mlx_lm.server','--model',{str(folder)!r},'--host','127.0.0.1','--port','{port}']; main()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            time.sleep(0.5)
    yield url, str(folder)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.integration
def test_openai_backend_against_mlx_lm_server(mlx_lm_server):
    url, folder = mlx_lm_server
    b = chat.OpenAIBackend(model=folder, base_url=url, timeout=120, concurrency=2)
    b.check()
    out = b.complete(convs("What is the capital of France?", "Say hello."), SamplingConfig(max_tokens=12))
    assert "Paris" in out[0].text
    assert all(g.completion_tokens > 0 and g.prompt_tokens > 10 for g in out)
    short = b.complete(convs("Write a long story about a dragon."), SamplingConfig(max_tokens=4))[0]
    assert short.finish_reason == "length"
