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


# --- independent references (tests/fixtures/forcefield): never read from mofkit ----------------------------------

FORCEFIELD = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "forcefield"
# 1 kcal/mol / k_B = 4184 / 8.314462618 = 503.2195 K; the kit (and RASPA-style UFF tables) round it to 503.22,
# which test_uff_matches_a_second_transcription pins to 1e-5 of the exact value
KCAL_PER_MOL_IN_K = 503.22


def _table(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.fixture(scope="session")
def uff_reference():
    """element -> (epsilon_K, sigma_A) from lammps-interface's transcription of Rappe et al. 1992 (not mofkit's)."""
    return {row["element"]: (float(row["D1_kcal_mol"]) * KCAL_PER_MOL_IN_K, float(row["x1_A"]) / 2 ** (1 / 6))
            for row in _table(FORCEFIELD / "uff_lammps_interface.csv")}


@pytest.fixture(scope="session")
def probe_reference():
    """probe -> (epsilon_K, sigma_A) as published (tests/fixtures/forcefield/probes.csv names each source)."""
    return {row["probe"]: (float(row["epsilon_K"]), float(row["sigma_A"])) for row in _table(FORCEFIELD / "probes.csv")}


@pytest.fixture(scope="session")
def coremof_elements():
    """The 77 elements that occur in CoRE MOF 2019-ASR."""
    text = (FORCEFIELD / "coremof_2019_elements.txt").read_text()
    return " ".join(line for line in text.splitlines() if not line.startswith("#")).split()


@pytest.fixture(scope="session")
def brute_force_lj(uff_reference, probe_reference):
    """Independent float64 LJ reference: explicit loop over every image within the cutoff, no neighbour lists,
    parameters from the fixtures. brute_force_lj(atoms, points_A, probe="H2", cutoff_A=12.8) -> energies (K)."""
    import itertools
    import numpy as np

    def energy(atoms, points, probe="H2", cutoff_A=12.8):
        eps_p, sig_p = probe_reference[probe]
        symbols = atoms.get_chemical_symbols()
        eps = np.array([np.sqrt(uff_reference[s][0] * eps_p) for s in symbols])
        sig = np.array([(uff_reference[s][1] + sig_p) / 2 for s in symbols])
        cell, pos = atoms.cell.array, atoms.get_positions()
        widths = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(np.roll(cell, -1, 0), np.roll(cell, -2, 0)),
                                                           axis=1)
        frac_pts, frac_atoms = points @ np.linalg.inv(cell), pos @ np.linalg.inv(cell)
        lo = np.floor(frac_pts.min(0) - frac_atoms.max(0) - cutoff_A / widths) - 1
        hi = np.ceil(frac_pts.max(0) - frac_atoms.min(0) + cutoff_A / widths) + 1
        total = np.zeros(len(points))
        for shift in itertools.product(*[range(int(l), int(h) + 1) for l, h in zip(lo, hi)]):
            r = np.linalg.norm(points[:, None, :] - (pos + np.array(shift) @ cell)[None], axis=-1)
            sr6 = (sig / r) ** 6
            total += np.where(r < cutoff_A, 4 * eps * (sr6 ** 2 - sr6), 0.0).sum(1)
        return total

    return energy
