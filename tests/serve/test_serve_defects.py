"""The server in this process, on the failures users met: bad text, bad adapters, errors that break connections, wrong
methods, adapter paths, CORS, the access log and the metrics page. Requests go through httpx, in memory (ASGI) or
over a real socket to uvicorn in a thread where connections matter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import safetensors.torch
from prometheus_client.parser import text_string_to_metric_families
from serve_world import tiny_engine, uvicorn_thread, world

from nomoat.serve import convert
from nomoat.serve.app import ServeSettings, create_app

__all__ = ["world"]

BODY = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 3}


@pytest.fixture(scope="module")
def engine(world):
    return tiny_engine(world)


def _app(engine, **settings):
    return create_app(engine, ServeSettings(model_name="tiny", **settings))


def _calls(app, requests):
    """Run `requests(client)` (an async function) against `app` in memory."""

    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await requests(c)

    return asyncio.run(run())


def _models(app) -> set[str]:
    async def get(c):
        return {m["id"] for m in (await c.get("/v1/models")).json()["data"]}

    return _calls(app, get)


# ---- text that is not Unicode ----------------------------------------------------------------------------------------

LONE = "a\\ud800b"  # as the JSON escape: the body is valid JSON, the string is not valid Unicode


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", '{"model":"tiny","messages":[{"role":"user","content":"%s"}],"max_tokens":2}',
         "messages.0.content"),
        ("/v1/chat/completions", '{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"%s"}]}]'
                                 "}",
         "messages.0.content.0.text"),
        ("/v1/completions", '{"model":"tiny","prompt":"%s","max_tokens":2}', "prompt"),
        ("/v1/completions", '{"model":"tiny","prompt":"w5","stop":["x","%s"],"max_tokens":2}', "stop.1"),
        ("/v1/completions", '{"model":"%s","prompt":"w5","max_tokens":2}', "model"),
        ("/v1/adapters", '{"name":"x","path":"/tmp/%s"}', "path"),
        ("/v1/adapters", '{"name":"%s"}', "name"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_parameter(engine, path, body, param):
    app = _app(engine)

    async def post(c):
        return await c.post(path, content=(body % LONE).encode(), headers={"Content-Type": "application/json"})

    r = _calls(app, post)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_unicode"


def test_a_surrogate_pair_is_ordinary_text(engine):
    app = _app(engine)
    body = '{"model":"tiny","prompt":"w5 \\ud83d\\ude00 \\\\ud800","max_tokens":2}'  # a pair, and an escaped backslash

    async def post(c):
        return await c.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})

    r = _calls(app, post)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---- corrupt adapters --------------------------------------------------------------------------------------------


def _corrupt(world, root: Path, kind: str) -> Path:
    folder = root / f"bad-{kind}"
    shutil.copytree(world["adapters"]["a"], folder)
    weights = folder / "adapter_model.safetensors"
    if kind == "garbage":
        weights.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "shape":
        tensors = safetensors.torch.load_file(weights)
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = tensors[key][:, :-1].contiguous()
        safetensors.torch.save_file(tensors, weights)
    elif kind == "empty":
        weights.write_bytes(b"")
    return folder


@pytest.mark.parametrize("kind", ["garbage", "truncated", "shape", "empty"])
def test_a_corrupt_adapter_is_a_400_and_not_listed(world, engine, tmp_path, kind):
    folder = _corrupt(world, tmp_path, kind)
    app = _app(engine, adapter_dirs=[tmp_path, world["root"]])

    async def load(c):
        bad = await c.post("/v1/adapters", json={"name": "broken", "path": str(folder)})
        use = await c.post("/v1/completions", json={**BODY, "model": "broken"})
        # The name is free again: a good folder loads under it and serves.
        good = await c.post("/v1/adapters", json={"name": "broken", "path": str(world["adapters"]["a"])})
        served = await c.post("/v1/completions", json={**BODY, "model": "broken"})
        return bad, use, good, served

    before = set(engine.adapters)
    bad, use, good, served = _calls(app, load)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["code"] == "invalid_adapter" and bad.json()["error"]["param"] == "path"
    assert use.status_code == 404
    assert good.status_code == 200 and served.status_code == 200
    assert _models(app) == {"tiny", "broken"}
    assert len(engine.adapters) == len(before) + 1  # nothing half-loaded was left in the engine
    _calls(app, lambda c: c.delete("/v1/adapters/broken"))


# ---- a 500 keeps the connection ------------------------------------------------------------------------------------


def _client_addr(response: httpx.Response) -> tuple:
    return response.extensions["network_stream"].get_extra_info("client_addr")


@contextmanager
def _one_connection(app) -> Iterator[httpx.Client]:
    with uvicorn_thread(app) as url, httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1)) as c:
        yield c


def test_a_500_keeps_the_connection_open(world, engine, monkeypatch):
    app = _app(engine)

    def crash():
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(app.state.manager, "names", crash)
    with _one_connection(app) as c:
        first = c.get("/health")
        where = _client_addr(first)
        r = c.get("/v1/models")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers.get("connection") != "close"
        r = c.get("/health")
        assert r.status_code == 200 and _client_addr(r) == where


def test_a_stream_that_fails_midway_ends_cleanly_and_keeps_the_connection(world, engine, monkeypatch):
    app = _app(engine)
    chunk, calls = convert.text_chunk, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure")
        return chunk(*args, **kwargs)

    monkeypatch.setattr(convert, "text_chunk", failing)
    with _one_connection(app) as c:
        where = _client_addr(c.get("/health"))
        r = c.post("/v1/completions", json={**BODY, "max_tokens": 8, "stream": True})
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        r = c.post("/v1/completions", json=BODY)
        assert r.status_code == 200 and _client_addr(r) == where


# ---- methods --------------------------------------------------------------------------------------------------------


def test_a_wrong_method_is_a_405_with_allow(engine):
    app = _app(engine)

    async def probe(c):
        return {
            "get chat": await c.get("/v1/chat/completions"),
            "put completions": await c.put("/v1/completions", json=BODY),
            "post models": await c.post("/v1/models"),
            "get adapters": await c.get("/v1/adapters"),
            "put adapter": await c.put("/v1/adapters/a"),
            "post health": await c.post("/health"),
            "unknown": await c.get("/v1/nothing"),
            "page": await c.get("/"),
        }

    r = _calls(app, probe)
    for key, allow in (("get chat", "POST"), ("put completions", "POST"), ("post models", "GET"),
                       ("get adapters", "POST"), ("put adapter", "DELETE"), ("post health", "GET")):  # fmt: skip
        assert r[key].status_code == 405, key
        assert r[key].headers["allow"] == allow, key
        assert r[key].json()["error"]["code"] == "method_not_allowed", key
    assert r["unknown"].status_code == 404 and r["unknown"].json()["error"]
    assert r["page"].status_code == 200 and "html" in r["page"].headers["content-type"]


# ---- loading adapters by path ------------------------------------------------------------------------------------


def test_loading_by_path_is_off_unless_allowed(world, engine):
    app = _app(engine)

    async def load(c):
        by_path = await c.post("/v1/adapters", json={"name": "p", "path": str(world["adapters"]["a"])})
        by_name = await c.post("/v1/adapters", json={"name": "reg"})
        return by_path, by_name

    app_home = create_app(engine, ServeSettings(model_name="tiny", registry_home=str(world["home"])))
    by_path, _ = _calls(app, load)
    assert by_path.status_code == 403 and "--allow-adapter-dir" in by_path.json()["error"]["message"]
    assert "p" not in _models(app)
    _, by_name = _calls(app_home, load)
    assert by_name.status_code == 200  # the registry needs no permission
    _calls(app_home, lambda c: c.delete("/v1/adapters/reg"))


def test_loading_by_path_stays_inside_the_allowed_folders_and_tells_nothing(world, engine, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copytree(world["adapters"]["b"], allowed / "b")
    (allowed / "escape").symlink_to(world["adapters"]["c"], target_is_directory=True)
    (allowed / "file").write_text("x")
    app = _app(engine, adapter_dirs=[allowed])
    refused = {
        "missing inside": allowed / "nosuch",
        "a file inside": allowed / "file",
        "existing outside": world["adapters"]["c"],
        "missing outside": tmp_path / "nosuch",
        "a system folder": Path("/etc"),
        "dot-dot": allowed / ".." / "allowed" / ".." / "x",
        "a link out": allowed / "escape",
        "relative": Path("b"),
    }

    async def load(c):
        out = {k: await c.post("/v1/adapters", json={"name": "p", "path": str(p)}) for k, p in refused.items()}
        out["ok"] = await c.post("/v1/adapters", json={"name": "inside", "path": str(allowed / "b")})
        out["not an adapter"] = await c.post("/v1/adapters", json={"name": "p", "path": str(allowed)})
        return out

    r = _calls(app, load)
    assert r["ok"].status_code == 200
    assert r["not an adapter"].status_code == 400 and r["not an adapter"].json()["error"]["code"] == "invalid_adapter"
    answers = {k: (r[k].status_code, r[k].content, sorted(r[k].headers.items())) for k in refused}
    first = answers["missing inside"]
    assert first[0] == 403 and json.loads(first[1])["error"]["param"] == "path"
    assert all(a == first for a in answers.values()), answers  # one answer: nothing tells what exists
    assert _models(app) == {"tiny", "inside"}
    _calls(app, lambda c: c.delete("/v1/adapters/inside"))


# ---- CORS ----------------------------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_on_for_the_given_origins(engine):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip

    async def probe(c):
        options = await c.options("/v1/chat/completions", headers=preflight)
        get = await c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        other = await c.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        return options, get, other

    options, get, _ = _calls(_app(engine, api_key="k"), probe)
    assert "access-control-allow-origin" not in options.headers and "access-control-allow-origin" not in get.headers
    app = _app(engine, api_key="k", cors_origins=["https://app.example", "http://localhost:3000"])
    options, get, other = _calls(app, probe)
    assert options.status_code == 200  # a preflight carries no key: answered before the key check
    assert options.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in options.headers["access-control-allow-headers"].lower()
    assert get.status_code == 200 and get.headers["access-control-allow-origin"] == "https://app.example"
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


# ---- the access log -----------------------------------------------------------------------------------------------


@contextmanager
def _access_log(fmt: str) -> Iterator[io.StringIO]:
    from nomoat.serve.access import LOGGER, log_handler

    stream = io.StringIO()
    handler = log_handler(fmt, stream)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _some_requests(c):
    async def run():
        await c.post("/v1/completions", json={**BODY, "max_tokens": 4})
        r = await c.post("/v1/completions", json={**BODY, "max_tokens": 3, "stream": True})
        await c.get("/v1/nothing?secret=1")
        return r

    return run()


def test_access_log_json_has_one_line_per_request(engine):
    with _access_log("json") as stream:
        _calls(_app(engine), _some_requests)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("POST", "/v1/completions", 200), ("POST", "/v1/completions", 200), ("GET", "/v1/nothing", 404)]  # fmt: skip
    prompt = len(engine.tokenizer.encode("w5 w6"))
    assert [(x["prompt_tokens"], x["completion_tokens"]) for x in lines] == [(prompt, 4), (prompt, 3), (None, None)]
    assert all(x["duration_s"] >= 0 and x["time"] and "secret" not in json.dumps(x) for x in lines)


def test_access_log_text_has_one_line_per_request(engine):
    with _access_log("text") as stream:
        _calls(_app(engine), _some_requests)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert '"POST /v1/completions" 200' in lines[0] and "tokens=" in lines[0] and "+4" in lines[0]
    assert '"GET /v1/nothing" 404' in lines[2] and "secret" not in lines[2]


# ---- metrics ---------------------------------------------------------------------------------------------------------


def test_metrics_are_prometheus_and_openmetrics(engine):
    from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

    async def probe(c):
        await c.post("/v1/completions", json={**BODY, "max_tokens": 4})
        return await c.get("/metrics"), await c.get("/metrics", headers={"Accept": OPENMETRICS})

    plain, open_metrics = _calls(_app(engine), probe)
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")  # the format of a bare scrape
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(plain.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("nomoat_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert samples[("nomoat_completion_tokens_total", ())] == 4
    assert samples[("nomoat_request_duration_seconds_count", (("endpoint", "/v1/completions"),))] == 1
    assert samples[("nomoat_time_to_first_token_seconds_count", ())] == 1
    assert samples[("nomoat_model_loaded", ())] == 1 and samples[("nomoat_max_running", ())] == 2
    kinds = {name: families[name].type for name in families}
    assert kinds["nomoat_requests"] == "counter" and kinds["nomoat_queue_depth"] == "gauge"
    assert kinds["nomoat_request_duration_seconds"] == "histogram"
