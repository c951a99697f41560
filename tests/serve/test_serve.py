"""`nomoat serve`: the real server process, driven with the official `openai` client over a loopback socket.

References are independent of the server: local generation with nomoat's engine on a model whose adapters were
merged into its weights, and transformers + peft for one adapter. The tiny model's end-of-sequence token lies outside
its vocabulary, so every generation runs to `max_tokens` and timings (overlap, cancellation) are deterministic.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import peft
import pytest
import torch
from serve_world import ADAPTERS, KEY, PROMPT_IDS, ROOT, Server, _make_adapter, _make_model, world

from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.apply import merge_adapters
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import load_hf

__all__ = ["KEY", "ROOT", "Server", "_make_adapter", "_make_model", "world"]  # shared with other files


@pytest.fixture(scope="module")
def server(world):
    a = world["adapters"]
    srv = Server(world, *(x for n in ADAPTERS for x in ("--adapter", f"{n}={a[n]}")), "--max-running", "8",
                 "--max-queue", "16", "--max-loaded-adapters", "6", "--max-completion-tokens", "512",
                 "--max-prompt-tokens", "200", "--max-body-bytes", "20000",
                 "--allow-adapter-dir", str(world["root"]), "--data-dir", str(_data_dir(world)))  # fmt: skip
    yield srv
    srv.close()


def _data_dir(world) -> Path:
    folder = world["root"] / "datasets"
    folder.mkdir(exist_ok=True)
    (folder / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                       '{"role": "assistant", "content": "hello"}]}\n')  # fmt: skip
    return folder


def test_serve_data_dir_is_what_the_studio_reads(server):
    files = httpx.get(f"{server.url}/v1/studio/data", headers=server.headers).json()["data"]
    assert [f["path"] for f in files] == ["chat.jsonl"]


@pytest.fixture(scope="module")
def busy_server(world):
    """One batch row and one queue slot: the third concurrent request is refused."""
    srv = Server(world, "--max-running", "1", "--max-queue", "1", "--max-completion-tokens", "4000")
    yield srv
    srv.close()


# ---- local references ------------------------------------------------------------------------------------------------

_REF_CACHE: dict = {}


def _local_engine(world, stack: tuple = ()) -> Engine:
    """nomoat's engine on the model with `stack` ((adapter, weight), ...) merged into its weights."""
    if stack not in _REF_CACHE:
        model = load_model(world["model"], dtype=torch.float32, device="cpu")
        if stack:
            merge_adapters(model, [(world["adapters"][n], w) for n, w in stack])
        _REF_CACHE[stack] = Engine(model, Tokenizer.from_dir(world["model"]), max_running=1, prefix_cache_bytes=0)
    return _REF_CACHE[stack]


def _local(world, ids, n, stack=(), **params):
    params = {"temperature": 0, "max_new_tokens": n, **params}
    return _local_engine(world, stack).generate(ids, SamplingParams(**params))


def _chat_ids(world, messages) -> list[int]:
    tok = Tokenizer.from_dir(world["model"])
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def _decode(world, ids) -> str:
    return Tokenizer.from_dir(world["model"]).decode(ids, skip_special_tokens=True)


# ---- chat, completions, streaming, logprobs, stop --------------------------------------------------------------------


def test_health_models_and_start_line(server, world):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
    models = {m.id: m for m in server.client().models.list()}
    assert set(models) == {"tiny", *ADAPTERS, "reg"}
    assert models["a"].parent == "tiny" and models["a"].loaded is True
    assert models["reg"].loaded is False  # in the registry, loads on first use
    log = server.log.read_text()
    assert f"ready at {server.url}/v1" in log and "curl" in log and "OpenAI(base_url=" in log


def test_chat_matches_local_generation_with_logprobs(server, world):
    messages = [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": "w5 w6 w9"}]
    out = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                  logprobs=True, top_logprobs=3)  # fmt: skip
    ref = _local(world, _chat_ids(world, messages), 12, logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    assert choice.message.content == ref.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(_chat_ids(world, messages))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    got = choice.logprobs.content
    assert [t.token for t in got] == [_decode(world, [i]) for i in ref.token_ids]
    for lp, r in zip(got, ref.logprobs):
        assert lp.logprob == pytest.approx(r.logprob, abs=1e-4)
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token  # greedy picks the top token
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx([v for _, v in r.top], abs=1e-4)
        assert bytes(lp.bytes) == lp.token.encode()


def test_streaming_equals_plain_with_same_seed(server):
    client = server.client()
    extra = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}
    kw = dict(model="tiny", max_tokens=24, temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.5, extra_body=extra)
    prompt = "w5 w6 w7 w8"
    plain = client.completions.create(prompt=prompt, **kw)
    chunks = list(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24  # include_usage's last chunk
    messages = [{"role": "user", "content": "w11 w12"}]
    plain = client.chat.completions.create(messages=messages, **kw)
    stream = client.chat.completions.create(messages=messages, stream=True, **kw)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    other = client.completions.create(prompt=prompt, **{**kw, "seed": 99})
    assert other.choices[0].text != plain.choices[0].message.content  # the seed matters (sanity)
    # The raw SSE stream ends with [DONE].
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "stream": True, "temperature": 0}
    raw = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers).text
    assert raw.rstrip().endswith("data: [DONE]") and raw.count("data: ") == 5


def test_completion_logprobs_and_token_prompt(server, world):
    out = server.client().completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=6, temperature=0, logprobs=2)
    ref = _local(world, PROMPT_IDS, 6, logprobs=True, top_logprobs=2)
    assert out.choices[0].text == ref.text
    lp = out.choices[0].logprobs
    assert lp.tokens == [_decode(world, [i]) for i in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([r.logprob for r in ref.logprobs], abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # fmt: skip
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = server.client().completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=6, temperature=0,
                                                  logprobs=2, stream=True)  # fmt: skip
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_stop_strings(server, world):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=10, temperature=0).choices[0].text
    words = full.split()
    stop = words[3]
    cut = full[: full.index(stop)]
    out = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=10, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=10, temperature=0, stop=stop,
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == cut


# ---- adapters --------------------------------------------------------------------------------------------------------


def test_adapter_matches_peft_and_merged_reference(server, world):
    client = server.client()
    got = client.completions.create(model="a", prompt=PROMPT_IDS, max_tokens=10, temperature=0).choices[0].text
    hf = peft.PeftModel.from_pretrained(load_hf(world["model"]), world["adapters"]["a"]).eval()
    ref = hf.generate(input_ids=torch.tensor([PROMPT_IDS]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[0, len(PROMPT_IDS) :].tolist()  # fmt: skip
    assert got == _decode(world, ref)
    base = client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=10, temperature=0).choices[0].text
    assert got != base
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    chat = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == _local(world, _chat_ids(world, messages), 10, (("b", 1.0),)).text


def test_stack_syntax(server, world):
    client = server.client()
    stack = (("a", 1.0), ("c", 0.5))
    want = _local(world, PROMPT_IDS, 10, stack).text
    for model in ("tiny+a:1.0+c:0.5", "a+c:0.5", "tiny+a+c:0.5"):
        out = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0)
        assert out.choices[0].text == want and out.model == model
    alone = client.completions.create(model="a", prompt=PROMPT_IDS, max_tokens=10, temperature=0).choices[0].text
    assert alone != want
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny+a:heavy", prompt="w5", max_tokens=2)
    assert e.value.body["param"] == "model"


def test_four_adapters_in_flight_match_each_alone(server):
    client = server.client()
    kw = dict(prompt=PROMPT_IDS, max_tokens=300, temperature=0)
    alone = {n: client.completions.create(model=n, **kw).choices[0].text for n in ADAPTERS}
    assert len(set(alone.values())) == 4

    def streamed(name: str) -> tuple[str, float, float]:
        parts, first = [], None
        for chunk in client.completions.create(model=name, stream=True, **kw):
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].text)
        return "".join(parts), first, time.perf_counter()

    with cf.ThreadPoolExecutor(4) as pool:
        results = dict(zip(ADAPTERS, pool.map(streamed, ADAPTERS)))
    assert {n: r[0] for n, r in results.items()} == alone
    # Really in flight together: every stream had its first token before any stream ended.
    assert max(r[1] for r in results.values()) < min(r[2] for r in results.values())


def test_lazy_registry_adapter_load_unload_and_lru(server, world):
    client, url, h = server.client(), server.url, server.headers
    before = server.metrics()
    out = client.completions.create(model="reg", prompt=PROMPT_IDS, max_tokens=8, temperature=0).choices[0].text
    assert out == _local_engine_text(world, "r")
    assert {m.id: m.loaded for m in client.models.list()}["reg"] is True
    # Load at run time from a folder, use, unload.
    r = httpx.post(f"{url}/v1/adapters", json={"name": "extra", "path": str(world["adapters"]["e"])}, headers=h)
    assert r.status_code == 200 and r.json()["id"] == "extra"
    assert "extra" in {m.id for m in client.models.list()}
    out = client.completions.create(model="extra", prompt=PROMPT_IDS, max_tokens=8, temperature=0).choices[0].text
    assert out == _local_engine_text(world, "e")
    m = server.metrics()
    assert m["nomoat_adapters_loaded"] == 6  # a b c d reg extra: the bound
    # A seventh adapter evicts the least recently used idle one.
    r = httpx.post(f"{url}/v1/adapters", json={"name": "extra2", "path": str(world["adapters"]["e"])}, headers=h)
    assert r.status_code == 200
    m = server.metrics()
    assert m["nomoat_adapters_loaded"] == 6
    assert m["nomoat_adapter_evictions_total"] == before["nomoat_adapter_evictions_total"] + 1
    assert r.status_code == 200
    assert httpx.delete(f"{url}/v1/adapters/extra", headers=h).json() == {"id": "extra", "object": "model",
                                                                           "deleted": True}  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="w5", max_tokens=2)
    r = httpx.delete(f"{url}/v1/adapters/extra", headers=h)
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    # Every adapter evicted earlier still answers (reloaded on use), identically.
    for name in ADAPTERS:
        client.completions.create(model=name, prompt="w5", max_tokens=2)
    # Names never reach outside the registry; bad folders and taken names are refused.
    for name in ("../reg", "a/b", ".hidden", "x" * 65):
        r = httpx.post(f"{url}/v1/adapters", json={"name": name}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", name
    r = httpx.post(f"{url}/v1/adapters", json={"name": "nosuch"}, headers=h)
    assert r.status_code == 404
    r = httpx.post(f"{url}/v1/adapters", json={"name": "bad", "path": str(world["root"])}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    r = httpx.post(f"{url}/v1/adapters", json={"name": "a", "path": str(world["adapters"]["b"])}, headers=h)
    assert r.status_code == 409
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="..%2Fhome", prompt="w5", max_tokens=2)


def _local_engine_text(world, folder_name: str) -> str:
    model = load_model(world["model"], dtype=torch.float32, device="cpu")
    merge_adapters(model, [(world["adapters"][folder_name], 1.0)])
    engine = Engine(model, Tokenizer.from_dir(world["model"]), max_running=1, prefix_cache_bytes=0)
    return engine.generate(PROMPT_IDS, SamplingParams(temperature=0, max_new_tokens=8)).text


# ---- errors, auth, limits -----------------------------------------------------------------------------------------


def test_api_key(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "w5"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(extra_body={"logit_bias": {"5": 1000}}), "logit_bias"),
        (dict(extra_body={"tools": [{"type": "function", "function": {"name": "f g"}}]}), "tools.0.function.name"),
        (dict(n=2, stream=True), "n"),
        (dict(n=100), "n"),
        (dict(extra_body={"tool_choice": "required"}), "tool_choice"),
        (dict(temperature=5), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=513), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(messages=[{"role": "user", "content": "w5", "audio": {"id": "a"}}]), "messages.0.audio"),
        (dict(messages=[{"role": "function", "content": "w5"}]), "messages.0.role"),
        (dict(messages=[{"role": "user", "content": " ".join(["w9"] * 300)}]), "messages"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(server, kwargs, param):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(**kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"
    if param == "max_tokens" and kwargs["max_tokens"] > 1:
        assert "512" in e.value.body["message"]  # states the limit
    if param == "messages" and len(kwargs["messages"][0]["content"]) > 100:
        assert "200" in e.value.body["message"]


def test_unknown_model_and_misc_errors(server):
    client, url, h = server.client(), server.url, server.headers
    for model in ("nope", "tiny+nope", "a+nope:0.5"):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=model, prompt="w5", max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ["w5", "w6"]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 9999]}, headers=h)
    assert r.status_code == 400 and "9999" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing", headers=h)
    assert r.status_code == 404 and "error" in r.json()
    big = {"model": "tiny", "prompt": "w5 " * 8000}  # 24 KB > 20000 bytes
    r = httpx.post(f"{url}/v1/completions", json=big, headers=h)
    assert r.status_code == 400 and "20000 bytes" in r.json()["error"]["message"]

    def chunked():
        yield json.dumps(big).encode()

    r = httpx.post(f"{url}/v1/completions", content=chunked(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and "20000 bytes" in r.json()["error"]["message"]


# ---- overload, cancellation, metrics --------------------------------------------------------------------------------


def _gauges(m):
    return m["nomoat_running_requests"], m["nomoat_queue_depth"]


def _total(m, name):
    """A counter summed over its labels."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def test_overload_429_and_cancel_on_disconnect(busy_server):
    srv, client = busy_server, busy_server.client()
    long = dict(model="tiny", prompt="w5 w6", max_tokens=4000, temperature=0)
    first = client.completions.create(stream=True, **long)
    next(iter(first))  # running: it has produced a token
    second = client.completions.create(stream=True, **long)  # the stream opens once the request is queued
    srv.wait_metric(lambda m: _gauges(m) == (1, 1))
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(**long)
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
    started = time.perf_counter()
    first.close()  # disconnect: the running request is cancelled, the queued one takes its row
    srv.wait_metric(lambda m: _gauges(m) == (1, 0) and _total(m, "nomoat_requests_cancelled_total") == 1)
    second.close()
    m = srv.wait_metric(lambda m: _gauges(m) == (0, 0))
    assert _total(m, "nomoat_requests_cancelled_total") == 2
    assert time.perf_counter() - started < 5  # long before 4000 tokens could have been generated (>= 8 s)
    # A plain (non-streamed) request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=long, headers=srv.headers, timeout=httpx.Timeout(5, read=0.5))
    m = srv.wait_metric(lambda m: _gauges(m) == (0, 0))
    assert _total(m, "nomoat_requests_cancelled_total") == 3
    assert m['nomoat_requests_rejected_total{reason="queue_full"}'] == 1
    # The freed row serves the next request at once.
    out = client.completions.create(model="tiny", prompt="w5", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_metrics(server):
    server.client().completions.create(model="tiny", prompt="w5", max_tokens=4)
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    for family, kind in (("nomoat_requests_total", "counter"), ("nomoat_completion_tokens_total", "counter"),
                         ("nomoat_request_duration_seconds", "histogram"),
                         ("nomoat_time_to_first_token_seconds", "histogram"), ("nomoat_queue_depth", "gauge"),
                         ("nomoat_adapters_loaded", "gauge")):  # fmt: skip
        assert f"# TYPE {family} {kind}" in text
    m = server.metrics()
    assert m['nomoat_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m["nomoat_completion_tokens_total"] >= 4 and m["nomoat_model_loaded"] == 1
    assert m['nomoat_request_duration_seconds_count{endpoint="/v1/completions"}'] >= 1
    assert m['nomoat_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] >= 1


# ---- in process: loading state, schema fuzzing --------------------------------------------------------------------


def test_health_is_503_while_loading(world):
    from nomoat.serve.app import ServeSettings, create_app

    release = threading.Event()

    def loader():
        release.wait(30)
        return Engine(load_model(world["model"], dtype=torch.float32, device="cpu"), Tokenizer.from_dir(world["model"]),
                      max_running=2, max_seq_len=256)  # fmt: skip

    app = create_app(loader, ServeSettings(model_name="tiny"))
    import asyncio

    async def probe():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
            assert r.status_code == 503
            release.set()
            for _ in range(200):
                if (await c.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

    asyncio.run(probe())


def test_a_failing_generation_answers_500_and_ends_streams_with_an_error(world):
    """When the engine's step fails, a plain request gets a 500 in OpenAI's error shape, a stream ends with an error
    event and [DONE]; the server keeps serving."""
    import asyncio

    from nomoat.serve.app import ServeSettings, create_app

    engine = Engine(load_model(world["model"], dtype=torch.float32, device="cpu"), Tokenizer.from_dir(world["model"]),
                    max_running=2, max_seq_len=256, prefix_cache_bytes=0)  # fmt: skip
    forward, fail = engine._forward, {"on": True}

    def flaky(*args, **kwargs):
        if fail["on"]:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    engine._forward = flaky
    app = create_app(engine, ServeSettings(model_name="tiny"))
    body = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 4}

    async def probe():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for _ in range(200):
                if (await c.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
            r = await c.post("/v1/completions", json={**body, "stream": True})
            events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-2])["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
            fail["on"] = False
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

    asyncio.run(probe())


def test_schemathesis_on_the_unmodified_schema_finds_no_failures(world):
    """The schema as served, given to schemathesis untouched: every response is checked against it (status codes,
    content types, headers, bodies) and none is a 5xx; random requests reach generation (200s on the routes)."""
    import hypothesis
    import schemathesis
    from schemathesis import checks

    from nomoat.serve.app import ServeSettings, create_app

    engine = Engine(load_model(world["model"], dtype=torch.float32, device="cpu"), Tokenizer.from_dir(world["model"]),
                    max_running=4, max_seq_len=128)  # fmt: skip
    settings = ServeSettings(model_name="tiny", api_key=KEY, adapters={"a": world["adapters"]["a"]},
                             max_completion_tokens=4, registry_home=str(world["home"]), max_loaded_adapters=2,
                             adapter_dirs=[world["root"]])  # fmt: skip
    app = create_app(engine, settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert schema.raw_schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in schema.raw_schema["paths"].items():
        for method, op in operations.items():
            ok = op["responses"]["200"]["content"]
            assert all(c.get("schema") for c in ok.values()), (method, path)  # no empty response schema
            assert ("security" in op) == path.startswith(("/v1", "/metrics")), (method, path)
    auth = {"Authorization": f"Bearer {KEY}"}
    verify = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
              checks.response_headers_conformance, checks.response_schema_conformance]  # fmt: skip
    failures, calls, statuses = [], 0, {}
    for result in schema.get_all_operations():
        operation = result.ok()
        # Negative cases need a body to break: a string path parameter or no input at all has none.
        modes = [schemathesis.GenerationMode.POSITIVE] + [schemathesis.GenerationMode.NEGATIVE] * bool(operation.body)
        for mode in modes:

            @hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal calls
                if case.path_parameters and case.path_parameters.get("name") in ("a",):
                    return  # keep the adapter the other cases use
                if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                    # Mostly real model names, so random parameters reach the engine (not just a 404).
                    case.body["model"] = ["tiny", "a", "tiny+a:0.5", case.body["model"]][calls % 4]
                response = case.call(headers=auth)
                calls += 1
                key = (case.path, response.status_code)
                statuses[key] = statuses.get(key, 0) + 1
                try:
                    case.validate_response(response, checks=verify, headers=auth)
                except Exception as e:  # noqa: BLE001 - schemathesis' failure group: collected, reported below
                    failures.append((case.method, case.path, case.body, response.status_code, str(e)[:800]))

            run()
    assert calls > 50, statuses
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert statuses.get((route, 200), 0) >= 1, (route, statuses)  # random requests reach the work
    assert statuses.get(("/v1/chat/completions", 200), 0) + statuses.get(("/v1/completions", 200), 0) > 10, statuses
    assert not any(status >= 500 for _, status in statuses), statuses
    assert not failures, failures[:3]
