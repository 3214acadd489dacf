"""Shared pytest fixtures. `http_server`: a real HTTP server on 127.0.0.1 that tests script answer by answer.

    def test_retry(http_server):
        http_server.route("/f.bin", Reply(500), Reply(body=b"data"))   # a 500, then the file
        mofkit.download(http_server.url + "/f.bin", ...)
        assert http_server.hits("/f.bin") == 2

An answer is a `Reply`, raw bytes, a JSON-able dict/list, or a callable(Request) -> any of those (for answers
that depend on the request, e.g. `ranged(data)` honours Range headers). A route's answers are served in order
and the last one repeats. `intercept(monkeypatch, "drive.google.com")` sends requests' https traffic for those
hosts here as /<host>/<path>, so code that hard-codes a host (gdown and Google Drive) talks to this server.
"""
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

# One torch thread, here and in the kernels and scripts tests start (they inherit the environment): on a shared
# 2-core machine torch's default pool (a thread per core, spin-waiting between ops) made the suite ~10x slower
# under load; the tests' tensors are small, so one thread is also fastest on an idle machine.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
import torch  # noqa: E402  (after the thread settings)

torch.set_num_threads(1)

__all__ = ["Reply", "Request", "ranged"]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0                # sleep before answering: a server that hangs past the client's timeout
    content_length: int | None = None   # announce this many bytes; more than len(body) = a truncated download


@dataclass
class Request:
    method: str
    path: str
    query: dict      # name -> last value
    headers: dict


def ranged(data, content_type="application/octet-stream"):
    """An answer serving `data` that honours 'Range: bytes=N-' with 206 Partial Content, like a static server."""
    def answer(request):
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        headers = {"Accept-Ranges": "bytes", "Content-Type": content_type}
        if match is None:
            return Reply(200, data, headers)
        start = int(match.group(1))
        return Reply(206, data[start:], {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
    return answer


def _as_reply(answer, request):
    if callable(answer):
        answer = answer(request)
    if isinstance(answer, Reply):
        return answer
    if isinstance(answer, bytes):
        return Reply(body=answer)
    return Reply(body=json.dumps(answer).encode(), headers={"Content-Type": "application/json"})


class LocalServer:
    def __init__(self):
        self.routes = {}
        self.requests = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                parts = urlsplit(self.path)
                request = Request("GET", parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()},
                                  dict(self.headers))
                with server._lock:
                    server.requests.append(request)
                    answers = server.routes.get(parts.path)
                    answer = (answers.pop(0) if len(answers) > 1 else answers[0]) if answers else Reply(404)
                reply = _as_reply(answer, request)
                time.sleep(reply.delay_s)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    length = len(reply.body) if reply.content_length is None else reply.content_length
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out) first
                    pass

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # teardown must not wait for a handler still sleeping in a hang test
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def route(self, path, *answers):
        """Serve `answers` at `path` (query ignored), in order; the last one repeats."""
        with self._lock:
            self.routes[path] = list(answers)

    def hits(self, path):
        return sum(r.path == path for r in self.requests)

    def intercept(self, monkeypatch, *hosts):
        """Route requests' traffic for `hosts` (any scheme) to this server as /<host>/<path>?<query>."""
        import requests.adapters
        send, netloc = requests.adapters.HTTPAdapter.send, urlsplit(self.url).netloc

        def rerouted(adapter, request, *args, **kwargs):
            parts = urlsplit(request.url)
            if parts.hostname in hosts:
                request.url = urlunsplit(("http", netloc, f"/{parts.hostname}{parts.path}", parts.query, ""))
            return send(adapter, request, *args, **kwargs)

        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", rerouted)

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_server():
    server = LocalServer()
    yield server
    server.close()
