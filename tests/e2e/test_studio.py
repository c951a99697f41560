"""nomoat studio in a real headless Chromium (Debian's package, driven by playwright): the whole path in the browser.

A real `nomoat studio` process serves the embedded demo model with an API key and one `--data-dir`. The tests upload
a small dataset, preview it, train an adapter for a few steps while the loss chart fills, load the adapter and chat
with it; check that a model reply carrying HTML never runs; edit a question and regenerate; export a conversation
and train on the export; answer under a JSON schema and call a required tool from the chat page's switches; and refuse
a path outside `--data-dir`. Screenshots of each page go to the artifacts folder
(`$NOMOAT_ARTIFACTS`, else pytest's temporary folder); `NOMOAT_UPDATE_DOCS=1` also writes docs/studio.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from nomoat.demo import MODEL_DIR
from processes import NomoatServer, chromium

KEY = "studio-key-1"
MS = 30_000
TRAIN_MS = 600_000  # a training job: a fresh process loads torch and the model (slow on a busy 2-core machine)
ROOT = Path(__file__).resolve().parents[2]
PAIRS = [(2, 3), (4, 4), (7, 1), (6, 5), (9, 2), (3, 8), (1, 1), (5, 5)]
CHATS = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                       {"role": "assistant", "content": str(a + b)}]} for a, b in PAIRS]
# Elements sticking out past the right edge of the screen (tables and code scroll inside their own boxes).
WIDER_THAN_SCREEN = """(id) => [...document.getElementById(id).querySelectorAll('*')]
  .filter(e => e.getClientRects().length && !e.closest('.table-wrap, pre, .log, option'))
  .filter(e => e.getBoundingClientRect().right > innerWidth + 1)
  .map(e => e.tagName + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : '')).slice(0, 5)"""
XSS_REPLY = ('Look: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> '
             '[click](javascript:window.__xss=3)\n\n```python\nprint("hi")\n```\n')  # fmt: skip


def _artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("NOMOAT_ARTIFACTS")
    out = Path(folder) if folder else tmp_path_factory.mktemp("studio-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def studio(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    data = root / "data"
    data.mkdir()
    (data / "allowed.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (root / "secret.jsonl").write_text(json.dumps(CHATS[0]) + "\n")
    srv = NomoatServer(["studio", "--no-browser", "--api-key", KEY, "--data-dir", str(data)], root / "studio.log",
                       env={"NOMOAT_HOME": str(root / "home")}, timeout=600)  # fmt: skip
    yield {"url": srv.url, "root": root, "artifacts": _artifacts(tmp_path_factory)}
    srv.stop()


def _page(browser, studio, width=1280, height=900):
    """A page with the key entered, that fails the test on page errors or any request leaving the server."""
    page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
    page.errors, page.outside = [], []
    page.on("pageerror", lambda e: page.errors.append(str(e)))

    def only_local(route):
        if route.request.url.startswith(studio["url"]):
            route.continue_()
        else:
            page.outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{studio['url']}/")
    page.get_by_test_id("api-key").wait_for(state="visible", timeout=MS)
    page.get_by_label("Key", exact=True).fill(KEY)
    page.get_by_test_id("api-key-save").click()
    page.wait_for_function("!document.querySelector('[data-testid=send]').disabled", timeout=MS)
    return page


def _done(page):
    assert not page.errors, page.errors
    assert not page.outside, page.outside
    page.close()


def _shot(page, studio, name, view=None) -> Path:
    """Save a screenshot; of a whole page `view` (its own scroll box) from its top, in a tall window."""
    path = studio["artifacts"] / f"{name}.png"
    if view:
        size = page.viewport_size
        page.set_viewport_size({"width": size["width"], "height": 2400})
        page.evaluate("(id) => { document.getElementById(id).scrollTop = 0; }", f"view-{view}")
        page.screenshot(path=str(path))
        page.set_viewport_size(size)
    else:
        page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    return path


def _answers(page, pane="a"):
    return page.locator(f"[data-testid=pane-{pane}] [data-testid=assistant-message]")


def _wait_answer(page, n, pane="a"):
    page.wait_for_function(
        "([p, n]) => document.querySelectorAll(`[data-testid=pane-${p}] [data-testid=assistant-message]"
        ":not([data-state=streaming])`).length >= n", arg=[pane, n], timeout=MS)  # fmt: skip
    return _answers(page, pane).nth(n - 1)


def _reference(studio, model, messages, max_tokens=12, **extra) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **extra}
    r = httpx.post(f"{studio['url']}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _greedy(page, max_tokens=12):
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("System prompt").fill("")


def test_xss_in_a_model_reply_never_runs(browser, studio):
    page = _page(browser, studio)
    chunks = [{"choices": [{"index": 0, "delta": {"content": XSS_REPLY[i:i + 9]}, "finish_reason": None}]}
              for i in range(0, len(XSS_REPLY), 9)]  # fmt: skip
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=sse,
                                                                       content_type="text/event-stream"))  # fmt: skip
    page.get_by_test_id("prompt").fill("say something dangerous")
    page.get_by_test_id("prompt").press("Enter")
    answer = _wait_answer(page, 1)
    text = answer.get_by_test_id("assistant-text")
    page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert page.evaluate("window.__xss") is None
    assert text.locator("img, script, iframe").count() == 0
    assert '<img src=x onerror="window.__xss=1">' in text.inner_text()  # shown as text
    assert "<script>window.__xss=2</script>" in text.inner_text()
    assert all("javascript:" not in (a.get_attribute("href") or "") for a in text.locator("a").all())
    assert text.locator("pre code.hljs").count() == 1 and answer.get_by_test_id("copy-code").count() == 1
    answer.get_by_test_id("copy-code").click()
    _done(page)


def test_edit_and_regenerate_replaces_the_answer(browser, studio):
    page = _page(browser, studio)
    page.get_by_test_id("clear").click()
    _greedy(page)
    page.get_by_test_id("prompt").fill("What is 2 + 3?")
    page.get_by_test_id("send").click()
    first = _wait_answer(page, 1).get_by_test_id("assistant-text").inner_text()
    base = page.get_by_test_id("model-select").input_value()
    assert first == _reference(studio, base, [{"role": "user", "content": "What is 2 + 3?"}])
    # With the keyboard alone: focus Edit, Enter opens the editor (focused), type, Ctrl+Enter saves and regenerates.
    page.get_by_test_id("user-message").first.get_by_test_id("edit-message").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.dataset.testid") == "edit-area"
    page.keyboard.press("Control+a")
    page.keyboard.type("What is 4 + 4?")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelector('[data-testid=user-text]')?.textContent === 'What is 4 + 4?'",
                           timeout=MS)  # fmt: skip
    second = _wait_answer(page, 1).get_by_test_id("assistant-text").inner_text()
    assert page.get_by_test_id("user-message").count() == 1 and _answers(page).count() == 1
    assert second == _reference(studio, base, [{"role": "user", "content": "What is 4 + 4?"}])
    # The conversation is kept in the browser: it survives a reload, with its answer.
    page.reload()
    page.wait_for_function("!document.querySelector('[data-testid=send]').disabled", timeout=MS)
    assert page.get_by_test_id("user-text").all_inner_texts() == ["What is 4 + 4?"]
    assert page.get_by_test_id("assistant-text").all_inner_texts() == [second]
    _shot(page, studio, "chat")
    _done(page)


def test_export_gives_a_file_that_nomoat_train_accepts(browser, studio, tmp_path):
    page = _page(browser, studio)
    page.get_by_test_id("clear").click()
    _greedy(page, max_tokens=6)
    page.get_by_label("System prompt").fill("Answer briefly.")
    for question in ("What is 7 + 1?", "And 2 + 2?"):
        page.get_by_test_id("prompt").fill(question)
        page.get_by_test_id("send").click()
        _wait_answer(page, 1 if question.startswith("What") else 2)
    page.once("dialog", lambda d: d.accept("arith chat"))
    page.get_by_test_id("conv-item").first.get_by_test_id("conv-rename").click()
    assert page.get_by_test_id("conv-open").first.inner_text() == "arith chat"
    with page.expect_download() as info:
        page.get_by_test_id("export-conversation").click()
    path = tmp_path / "export.jsonl"
    info.value.save_as(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == 1
    roles = [m["role"] for m in records[0]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert records[0]["messages"][1]["content"] == "What is 7 + 1?"
    _done(page)
    out = subprocess.run([sys.executable, "-m", "nomoat", "train", str(MODEL_DIR), "--data", str(path), "--max-steps",
                          "1", "--seq-len", "64", "--batch-size", "1", "--name", "exported", "--output-dir",
                          str(tmp_path / "runs"), "--no-progress"], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "runs" / "exported" / "adapter" / "adapter_config.json").is_file()


def test_a_path_outside_the_data_dir_is_refused(browser, studio):
    page = _page(browser, studio)
    statuses = page.evaluate(
        """async ([key, model]) => {
          const out = [];
          for (const path of ["../secret.jsonl", "/etc/passwd", "allowed.jsonl"]) {
            const r = await fetch("v1/studio/data/preview", {method: "POST",
              headers: {"Content-Type": "application/json", Authorization: `Bearer ${key}`},
              body: JSON.stringify({root: "0", path, model, seq_len: 64})});
            out.push(r.status);
          }
          return out;
        }""",
        [KEY, str(MODEL_DIR)],
    )
    assert statuses == [403, 403, 200]
    _done(page)


def test_train_watch_load_and_chat(browser, studio, tmp_path):
    page = _page(browser, studio)
    page.get_by_test_id("nav-train").click()
    page.wait_for_function("document.title === 'nomoat studio · train'", timeout=MS)
    upload = tmp_path / "arith.jsonl"
    upload.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    page.get_by_test_id("upload-file").set_input_files(str(upload))
    page.get_by_test_id("upload").click()
    page.wait_for_function("[...document.querySelectorAll('#train-data option')].some(o => o.text.startsWith("
                           "'upload: arith.jsonl'))", timeout=MS)  # fmt: skip
    options = page.get_by_test_id("train-data").locator("option").all_inner_texts()
    assert any(o.startswith("upload: arith.jsonl") for o in options)
    assert any("allowed.jsonl" in o for o in options) and not any("secret" in o for o in options)
    assert page.get_by_test_id("train-model").input_value() == "nomoat-demo"
    page.get_by_test_id("train-seq").fill("64")
    page.get_by_test_id("preview").click()
    page.get_by_test_id("data-summary").wait_for(timeout=MS)
    assert page.get_by_test_id("preview-example").count() == 3
    assert page.get_by_test_id("preview-example").first.locator("mark").first.inner_text().startswith("5")
    page.get_by_test_id("train-name").fill("arith")
    page.get_by_test_id("train-steps").fill("4")
    page.get_by_test_id("train-batch").fill("2")
    page.get_by_test_id("train-lr").fill("0.001")
    page.get_by_test_id("train-start").click()
    page.wait_for_function("Number(document.getElementById('chart-loss').dataset.points || 0) >= 1", timeout=TRAIN_MS)
    page.wait_for_function("document.getElementById('job-summary').dataset.status === 'done'", timeout=TRAIN_MS)
    assert page.get_by_test_id("chart-loss").get_attribute("data-points") == "4"
    assert page.get_by_test_id("chart-lr").locator("canvas").count() == 1
    assert "output: arith" in page.get_by_test_id("job-summary").inner_text()
    assert "done:" in page.get_by_test_id("job-log").inner_text()
    shot = _shot(page, studio, "train", view="train")  # the whole page: form, preview, jobs, charts, log
    if os.environ.get("NOMOAT_UPDATE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "studio.png").write_bytes(shot.read_bytes())

    # One click: the adapter loads into the server and a chat with it opens.
    page.get_by_test_id("job-chat").click()
    page.wait_for_function("location.hash === '#chat'", timeout=MS)
    assert page.get_by_test_id("model-select").input_value() == "arith"
    _greedy(page)
    page.get_by_test_id("prompt").fill("What is 6 + 5?")
    page.get_by_test_id("send").click()
    answer = _wait_answer(page, 1).get_by_test_id("assistant-text").inner_text()
    assert answer == _reference(studio, "arith", [{"role": "user", "content": "What is 6 + 5?"}])

    # The adapter is in the registry table, with its provenance.
    page.get_by_test_id("nav-adapters").click()
    row = page.locator("[data-testid=adapter-row][data-name=arith]")
    row.wait_for(timeout=MS)
    cells = row.locator("td, th").all_inner_texts()
    assert cells[1] == "arith (loaded)" and cells[2] == MODEL_DIR.name and cells[3] == "sft"
    assert cells[4] == "arith.jsonl" and "4 steps" in cells[5]
    row.get_by_test_id("adapter-provenance").click()
    page.wait_for_function("document.getElementById('prov-body').textContent.includes('final_loss')", timeout=MS)
    assert '"base_model"' in page.locator("#prov-body").inner_text()
    # Before and after: `nomoat eval` on the chats of --data-dir (perplexity), base and adapter side by side.
    page.get_by_test_id("eval-adapter").select_option("arith")
    page.get_by_test_id("eval-data").select_option(label=str(studio["root"] / "data" / "allowed.jsonl"))
    page.get_by_test_id("eval-start").click()
    page.get_by_test_id("eval-result").locator("tbody tr").first.wait_for(timeout=TRAIN_MS)
    headers = page.get_by_test_id("eval-result").locator("th").all_text_contents()
    assert headers == ["data", "metric", "n", "base", "arith", "change"]
    first = page.get_by_test_id("eval-result").locator("tbody tr").first.locator("td").all_inner_texts()
    assert first[:2] == ["allowed.jsonl", "perplexity"] and float(first[3]) > 1 and float(first[4]) > 1
    _shot(page, studio, "adapters", view="adapters")
    _done(page)


def test_docs_and_phone_width(browser, studio):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    outside = []
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(studio["url"])
               else (outside.append(r.request.url), r.abort()))  # fmt: skip
    page.goto(f"{studio['url']}/docs")
    page.locator(".swagger-ui .title").first.wait_for(timeout=MS)
    assert "nomoat" in page.locator(".swagger-ui .title").first.inner_text()
    _shot(page, studio, "docs")
    assert not outside, outside
    page.close()
    page = _page(browser, studio, width=390, height=800)
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select, textarea')]"
                               ".filter(e => !e.labels?.length && !e.getAttribute('aria-label')).map(e => e.id)")
    assert unlabelled == [], unlabelled
    for view in ("chat", "train", "adapters"):
        page.get_by_test_id(f"nav-{view}").click()
        page.wait_for_function(f"!document.getElementById('view-{view}').hidden", timeout=MS)
        wide = page.evaluate(WIDER_THAN_SCREEN, f"view-{view}")
        assert wide == [], (view, wide)
        _shot(page, studio, f"phone-{view}")
    _done(page)


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                                  "count": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["answer", "count"], "additionalProperties": False}  # fmt: skip
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                               "required": ["city"], "additionalProperties": False}}}  # fmt: skip


def test_json_schema_and_tool_switches(browser, studio):
    jsonschema = pytest.importorskip("jsonschema")
    page = _page(browser, studio)
    page.get_by_test_id("clear").click()
    _greedy(page, max_tokens=64)
    question = [{"role": "user", "content": "Is it raining?"}]
    # A JSON schema: a malformed one is refused in the page, a valid one constrains the answer.
    page.get_by_label("Response format").select_option("json_schema")
    page.get_by_label("JSON schema").fill('{"type": "object",')
    page.get_by_test_id("prompt").fill("Is it raining?")
    page.get_by_test_id("send").click()
    page.get_by_test_id("structured-error").wait_for(timeout=MS)
    assert "not valid JSON" in page.get_by_test_id("structured-error").inner_text()
    page.get_by_test_id("clear").click()
    page.get_by_label("JSON schema").fill(json.dumps(ANSWER_SCHEMA))
    page.get_by_test_id("prompt").fill("Is it raining?")
    page.get_by_test_id("send").click()
    text = _wait_answer(page, 1).get_by_test_id("assistant-text").inner_text()
    assert page.get_by_test_id("structured-error").is_hidden()
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
    base = page.get_by_test_id("model-select").input_value()
    assert json.loads(text) == json.loads(_reference(studio, base, question, 64, response_format=fmt))
    # A tool that must be called: the answer is a call, rendered with its name and arguments.
    page.get_by_test_id("clear").click()
    page.get_by_label("Response format").select_option("text")
    page.get_by_label("Tools (a JSON array of function definitions)").fill(json.dumps([WEATHER_TOOL]))
    page.get_by_label("Tool choice").select_option("required")
    page.get_by_label("Several calls in one answer").uncheck()
    page.get_by_test_id("prompt").fill("What is the weather in Oslo?")
    page.get_by_test_id("send").click()
    answer = _wait_answer(page, 1)
    assert "tool_calls" in answer.get_by_test_id("answer-stats").inner_text()
    call = answer.get_by_test_id("tool-call")
    assert call.count() >= 1
    assert call.first.get_by_test_id("tool-call-name").inner_text() == "call get_weather"
    arguments = json.loads(call.first.get_by_test_id("tool-call-arguments").inner_text())
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    _shot(page, studio, "chat-tools")
    _done(page)
