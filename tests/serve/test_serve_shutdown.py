"""`nomoat serve` stopping: SIGTERM drains the requests already running (a long stream ends whole) while new requests
get 503, up to `--shutdown-grace`; past it, the server exits anyway. Also the flags seen from outside the process:
the JSON access log and `--cors-origin`."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time

import httpx
from serve_world import Server, world

__all__ = ["world"]

LONG = {"model": "tiny", "prompt": "w5 w6", "stream": True, "stream_options": {"include_usage": True}}


def _wait_for_drain(srv: Server) -> httpx.Response:
    """Poll /health (new connections each time) until the draining server answers 503."""
    deadline = time.time() + 30
    while True:
        r = httpx.get(f"{srv.url}/health", timeout=5)  # a refused connection fails the test: the socket must stay open
        if r.status_code == 503:
            return r
        assert time.time() < deadline, "the server never started draining"
        time.sleep(0.05)


def _stalled_request(srv: Server, body: dict) -> tuple[socket.socket, bytes]:
    """A request whose body is only half sent: it stays in flight, whatever the model's speed, until the rest comes.

    Returns the connected socket and the unsent rest of the body."""
    data = json.dumps(body).encode()
    auth = srv.headers["Authorization"]
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth}\r\nContent-Length: {len(data)}\r\n\r\n").encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    half = len(data) // 2
    sock.sendall(head + data[:half])
    time.sleep(0.5)  # the headers are parsed and the app called long before this
    return sock, data[half:]


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_sigterm_drains_running_streams_and_refuses_new_requests(world):
    srv = Server(world, "--max-completion-tokens", "4000", "--shutdown-grace", "300", "--log-format", "json",
                 "--cors-origin", "https://app.example")  # fmt: skip
    try:
        preflight = httpx.options(f"{srv.url}/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        body = {**LONG, "max_tokens": 3000}
        stalled, rest = _stalled_request(srv, {"model": "tiny", "prompt": "w5 w6", "max_tokens": 2})
        with httpx.Client(timeout=300) as client, client.stream("POST", f"{srv.url}/v1/completions", json=body,
                                                                 headers=srv.headers) as stream:  # fmt: skip
            lines = stream.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]  # running: a first chunk came
            srv.proc.send_signal(signal.SIGTERM)
            health = _wait_for_drain(srv)
            assert health.json()["error"]["code"] == "shutting_down"
            refused = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 2, "stream": False},
                                 headers=srv.headers)  # fmt: skip
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close" and refused.json()["error"]["code"] == "shutting_down"
            assert srv.proc.poll() is None  # still draining: the stalled request is in flight whatever the speed
            stalled.sendall(rest)  # a request admitted before the signal is answered in full
            answer = stalled.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 200"), answer[:200]
            stalled.close()
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 3000
        finish = [json.loads(e.removeprefix("data: "))["choices"] for e in events[:-1]]
        assert [c[0]["finish_reason"] for c in finish if c][-1] == "length"
        assert srv.proc.wait(60) == 0  # exits by itself once drained
    finally:
        srv.close()
    records = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith("{")]
    done = [r for r in records if (r["method"], r["path"], r["status"]) == ("POST", "/v1/completions", 200)]
    assert len(done) == 2 and sorted(r["completion_tokens"] for r in done) == [2, 3000]
    assert all(r["duration_s"] > 0 and r["request_id"].startswith("cmpl-") for r in done)
    assert {(r["path"], r["status"]) for r in records} >= {("/health", 503), ("/v1/completions", 503)}


def test_the_grace_period_bounds_the_drain(world):
    srv = Server(world, "--max-completion-tokens", "4000", "--shutdown-grace", "1")
    try:
        short = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 2}
        stalled, _ = _stalled_request(srv, short)  # never finishes by itself
        texts = []
        with httpx.Client(timeout=60) as client, contextlib.suppress(httpx.HTTPError):  # the stream may be cut midway
            with client.stream("POST", f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 4000},
                               headers=srv.headers) as stream:  # fmt: skip
                lines = stream.iter_lines()
                texts.append(next(line for line in lines if line.startswith("data: ")))
                signalled = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                texts.extend(line for line in lines if line.startswith("data: "))
        assert texts  # the stream had begun
        assert srv.proc.wait(60) is not None  # exits although a request is still in flight
        waited = time.monotonic() - signalled
        assert waited >= 1.0, f"exited {waited:.2f} s after SIGTERM, before the 1 s grace, with a request in flight"
        cut = _read_all(stalled)  # its connection is closed: nothing, or the error a cancelled request gets
        assert cut == b"" or cut.startswith(b"HTTP/1.1 500"), cut[:200]
        stalled.close()
    finally:
        srv.close()
