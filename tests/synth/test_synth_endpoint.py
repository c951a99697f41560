"""`nomoat synth` against an endpoint that fails: retries with backoff, a clear report, a valid partial file, resume.

The endpoint is a tiny HTTP server in a thread, scripted per prompt: answers that vary with the request's seed, a
server error every time, a body that is not JSON, an error once and then answers, or a refused key.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.data import load_dataset
from nomoat.synth.output import provenance_path

runner = CliRunner()
KEY = "sk-secret-123"
PROMPTS = ["good one", "good two", "always broken", "garbage please", "flaky once"]


class Script:
    """What the endpoint does; `hits` counts the chat requests per prompt."""

    def __init__(self) -> None:
        self.broken = True  # False: every prompt is answered
        self.status_all: int | None = None  # answer every request with this status
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: str, kind: str = "application/json") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if script.status_all:
                return self._send(script.status_all, json.dumps({"error": {"message": "invalid api key"}}))
            self._send(200, json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}))

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            with script.lock:
                script.hits[prompt] += 1
                hits = script.hits[prompt]
            if script.status_all:
                return self._send(script.status_all, json.dumps({"error": {"message": "invalid api key"}}))
            if script.broken and prompt == "always broken":
                return self._send(500, json.dumps({"error": {"message": "the model crashed"}}))
            if script.broken and prompt == "garbage please":
                return self._send(200, "<html>definitely not json</html>", "text/html")
            if prompt == "flaky once" and hits == 1:
                return self._send(503, json.dumps({"error": {"message": "overloaded"}}))
            text = "y" * (1 + body["seed"] % 5)  # samples differ with their seeds, so a length reward ranks them
            self._send(200, json.dumps({"id": "c", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}))

    return Handler


@pytest.fixture
def endpoint():
    script = Script()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", script
    server.shutdown()
    server.server_close()


def _synth(url: str, prompts, out, *extra: str):
    args = ["synth", "--teacher-url", url, "--prompts", str(prompts), "--out", str(out), "--mode", "pairs",
            "--reward", "length=3", "--samples", "4", "--retries", "2", "--backoff", "0.01", "--concurrency", "3",
            "--no-progress", *extra]  # fmt: skip
    return runner.invoke(app, args, env={"OPENAI_API_KEY": KEY})


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_failures_are_retried_then_reported_and_the_partial_file_is_valid(endpoint, tmp_path):
    url, script = endpoint
    out = tmp_path / "pairs.jsonl"
    result = _synth(url, _prompts(tmp_path), out)
    assert result.exit_code == 1, result.output
    assert "2 requests failed after their retries" in result.output
    assert "HTTP 500: the model crashed" in result.output and "not a chat completion" in result.output
    assert "run the same command again" in result.output
    # every attempt was made: 4 samples x (1 + 2 retries) for the broken prompts; the flaky one got one retry
    assert script.hits["always broken"] == 12 and script.hits["garbage please"] == 12
    assert script.hits["flaky once"] == 5
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt"] for r in records) == ["flaky once", "good one", "good two"]
    for r in records:
        assert r["chosen"] != r["rejected"] and r["score_chosen"] > r["score_rejected"]
        assert r["score_chosen"] == max(0.0, 1 - abs(len(r["chosen"]) - 3) / 3)  # the length reward, recomputed
    assert len(load_dataset(out).examples) == 3  # what `nomoat train --method dpo` reads
    prov = json.loads(provenance_path(out).read_text())
    assert prov["status"] == "incomplete" and prov["records"] == 3
    assert prov["last_run"]["failed"] == 2
    assert {f["attempts"] for f in prov["last_run"]["failures"]} == {3}
    assert prov["teacher"] == {"kind": "remote", "url": url, "model": "scripted"}
    assert KEY not in provenance_path(out).read_text()  # the key is never recorded


def test_a_rerun_skips_what_is_written_and_finishes_the_rest(endpoint, tmp_path):
    url, script = endpoint
    prompts, out = _prompts(tmp_path), tmp_path / "pairs.jsonl"
    assert _synth(url, prompts, out).exit_code == 1
    first = out.read_text()
    script.broken = False
    script.hits.clear()
    result = _synth(url, prompts, out)
    assert result.exit_code == 0, result.output
    assert "5 records (3 from before)" in result.output
    assert set(script.hits) == {"always broken", "garbage please"}  # the written prompts were not asked again
    assert out.read_text().startswith(first)
    assert json.loads(provenance_path(out).read_text())["status"] == "complete"
    script.hits.clear()
    assert _synth(url, prompts, out).exit_code == 0 and not script.hits  # nothing left to do


def test_a_rerun_with_other_settings_is_refused(endpoint, tmp_path):
    url, _ = endpoint
    prompts, out = _prompts(tmp_path), tmp_path / "pairs.jsonl"
    _synth(url, prompts, out)
    result = _synth(url, prompts, out, "--seed", "7")
    assert result.exit_code == 2
    assert "made with other settings (seed: 0 -> 7)" in result.output


def test_a_refused_key_stops_the_run_with_a_clear_error(endpoint, tmp_path):
    url, script = endpoint
    script.status_all = 401
    out = tmp_path / "pairs.jsonl"
    result = _synth(url, _prompts(tmp_path), out)
    assert result.exit_code == 2
    assert "HTTP 401: invalid api key" in result.output and "--api-key-env" in result.output
    script.status_all = None
    result = _synth(url, _prompts(tmp_path), out, "--teacher-model", "scripted")
    assert result.exit_code == 1  # the model named: no model list needed, the chat requests go out
    script.status_all = 401
    script.hits.clear()
    result = _synth(url, _prompts(tmp_path), out, "--teacher-model", "scripted")
    assert result.exit_code == 2 and "refused the request: HTTP 401" in result.output
    assert sum(script.hits.values()) <= 3 + 3  # the queued requests stop going out after the refusal
    assert len(load_dataset(out).examples) == 3  # the records of the earlier run are still there, whole
    assert json.loads(provenance_path(out).read_text())["status"] == "stopped"


def test_unreachable_endpoint(tmp_path):
    result = _synth("http://127.0.0.1:9", _prompts(tmp_path), tmp_path / "o.jsonl")
    assert result.exit_code == 2 and "cannot reach http://127.0.0.1:9" in result.output
