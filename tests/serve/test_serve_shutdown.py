"""`nomoat serve` stopping: SIGTERM drains the requests already running (a long stream ends whole) while new requests
get 503, up to `--shutdown-grace`; past it, the server exits anyway. Also the flags seen from outside the process:
the JSON access log and `--cors-origin`."""

from __future__ import annotations

import contextlib
import json
import signal
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


def test_sigterm_drains_running_streams_and_refuses_new_requests(world):
    srv = Server(world, "--max-completion-tokens", "4000", "--shutdown-grace", "300", "--log-format", "json",
                 "--cors-origin", "https://app.example")  # fmt: skip
    try:
        preflight = httpx.options(f"{srv.url}/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        body = {**LONG, "max_tokens": 3000}
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
            assert srv.proc.poll() is None  # still draining the stream
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
    assert len(done) == 1 and done[0]["completion_tokens"] == 3000
    assert done[0]["duration_s"] > 0 and done[0]["request_id"].startswith("cmpl-")
    assert {(r["path"], r["status"]) for r in records} >= {("/health", 503), ("/v1/completions", 503)}


def test_the_grace_period_bounds_the_drain(world):
    srv = Server(world, "--max-completion-tokens", "4000", "--shutdown-grace", "1")
    try:
        texts = []
        with httpx.Client(timeout=60) as client, contextlib.suppress(httpx.HTTPError):  # the stream is cut midway
            with client.stream("POST", f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 4000},
                               headers=srv.headers) as stream:  # fmt: skip
                lines = stream.iter_lines()
                texts.append(next(line for line in lines if line.startswith("data: ")))
                srv.proc.send_signal(signal.SIGTERM)
                texts.extend(line for line in lines if line.startswith("data: "))
        assert texts  # the stream had begun
        assert "data: [DONE]" not in texts  # 4000 tokens take several seconds: the stream was cut
        assert srv.proc.wait(60) is not None
    finally:
        srv.close()
