"""A real OpenAI-compatible chat completions server on 127.0.0.1 that misbehaves on demand, for fault tests.

    server = FaultServer()                 # answers "echo: <last message>" (or `reply(request body)`)
    server.queue("drop", "429", "ok")      # the next requests get these faults, in order; then `default`
    server.die_after(3)                    # answer 3 requests, then drop the 4th and die for good
    server.restart()                       # a new server on the same port (the same backend spec)

Faults (one per request):
  ok         a well-formed chat completion
  drop       headers and half the body, then the connection is closed (a response cut off mid-body)
  reset      the connection is closed before any byte of a response
  stall      no answer for `stall` seconds (past the client's timeout), then a late answer to nobody
  429        HTTP 429 with `Retry-After: <retry_after>` (when set)
  500, 503   HTTP errors (503 also sends Retry-After when set)
  401        HTTP 401 whose message echoes the Authorization header (as careless servers do)
  malformed  HTTP 200, application/json, a body that is not JSON
  not_json   HTTP 200, text/html: a web page, not an API
  empty      HTTP 200, a chat completion with no choices
  die        drop this connection and stop listening: every later request is refused

GET /v1/models always answers (while alive). `log` keeps (time, fault, body, Authorization) per POST.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("ok", "drop", "reset", "stall", "429", "500", "503", "401", "malformed", "not_json", "empty", "die")


def completion(model: str, text: str) -> dict:
    return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


class FaultServer:
    def __init__(self, reply: Callable[[dict], str] | None = None, *, retry_after: float | None = None,
                 stall: float = 1.0, port: int = 0):
        self.reply = reply or (lambda body: "echo: " + body["messages"][-1]["content"])
        self.retry_after = retry_after
        self.stall = stall
        self.default = "ok"
        self.plan: list[str] = []
        self.log: list[tuple[float, str, dict, str | None]] = []
        self.lock = threading.Lock()
        self.alive = False
        self._httpd: ThreadingHTTPServer | None = None
        self._start(port)

    # ------------------------------------------------------------------ control

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def queue(self, *faults: str) -> "FaultServer":
        unknown = [f for f in faults if f not in FAULTS]
        assert not unknown, f"unknown faults {unknown}"
        with self.lock:
            self.plan.extend(faults)
        return self

    def die_after(self, n: int) -> "FaultServer":
        """Answer the next `n` requests, then die for good on the one after."""
        return self.queue(*(["ok"] * n), "die")

    @property
    def calls(self) -> int:
        return len(self.log)

    def faults_seen(self) -> list[str]:
        return [f for _, f, _, _ in self.log]

    def die(self) -> None:
        """Stop listening (new connections are refused); in-flight handlers end on their own."""
        with self.lock:
            httpd, self._httpd, self.alive = self._httpd, None, False
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def restart(self) -> "FaultServer":
        """Listen again on the same port, with nothing queued."""
        self.die()
        with self.lock:
            self.plan.clear()
        self._start(self._port)
        return self

    def close(self) -> None:
        self.die()

    def __enter__(self) -> "FaultServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ serving

    def _start(self, port: int) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client gave up on a stalled or cut answer

            def _send(self, code: int, payload: bytes, ctype: str = "application/json", headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _error(self, code: int, message: str, headers: dict | None = None):
                self._send(code, json.dumps({"error": {"message": message, "type": "fault"}}).encode(),
                           headers=headers)

            def _cut(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def do_GET(self):
                data = [{"id": "fault-model", "object": "model", "created": 0, "owned_by": "test"}]
                self._send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with server.lock:
                    fault = server.plan.pop(0) if server.plan else server.default
                    server.log.append((time.monotonic(), fault, body, self.headers.get("Authorization")))
                retry = {"Retry-After": str(server.retry_after)} if server.retry_after is not None else {}
                if fault == "ok":
                    text = server.reply(body)
                    self._send(200, json.dumps(completion(body.get("model", "m"), text)).encode())
                elif fault == "drop":
                    payload = json.dumps(completion(body.get("model", "m"), "cut off")).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self._cut()
                elif fault == "reset":
                    self._cut()
                elif fault == "stall":
                    time.sleep(server.stall)
                    self._send(200, json.dumps(completion(body.get("model", "m"), "too late")).encode())
                elif fault == "429":
                    self._error(429, "rate limited", retry)
                elif fault == "500":
                    self._error(500, "internal error")
                elif fault == "503":
                    self._error(503, "overloaded", retry)
                elif fault == "401":
                    self._error(401, f"Incorrect API key provided: {self.headers.get('Authorization')}")
                elif fault == "malformed":
                    self._send(200, b'{"id": "chatcmpl-fault", "choices": [{"index": 0, "message": {"content": "')
                elif fault == "not_json":
                    self._send(200, b"<html><body>Welcome to nginx!</body></html>", ctype="text/html")
                elif fault == "empty":
                    payload = completion(body.get("model", "m"), "")
                    payload["choices"] = []
                    self._send(200, json.dumps(payload).encode())
                elif fault == "die":
                    self._cut()
                    server.die()

        httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        httpd.daemon_threads = True
        self._port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        with self.lock:
            self._httpd, self.alive = httpd, True
