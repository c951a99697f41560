"""The web playground (`nomoat serve`'s page at /) in a real headless Chromium, driven by playwright.

The server is a real `nomoat serve` process with a tiny random chat model, one adapter and an API key; every answer
the page streams must equal what the official openai client gets for the same request (greedy).
"""

from __future__ import annotations

import re

import httpx
import pytest
from test_chat_remote import KEY, MAX_TOKENS, reference, start_server

from processes import chromium

SYSTEM = "w9 w10"
TIMEOUT_MS = 20_000
STATS = re.compile(r"^\d+ tokens? · \d+\.\d tok/s · first token \d+ ms · (stop|length)$")


@pytest.fixture(scope="module")
def browser():
    with chromium(launch_timeout_ms=30_000) as b:
        yield b


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):  # after `browser`: no server is started when the browser is skipped
    srv = start_server(tmp_path_factory.mktemp("playground"))
    url = srv.url
    cards = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    base = next(c["id"] for c in cards if not c.get("parent"))
    yield url, base
    srv.stop()


def _answers(page, pane: str):
    """The finished answers of a pane, in order."""
    return page.locator(f"[data-testid=pane-{pane}] [data-testid=assistant-message][data-state=done]")


def _wait_answers(page, pane: str, n: int) -> list[str]:
    page.wait_for_function(
        "([pane, n]) => document.querySelectorAll("
        "`[data-testid=pane-${pane}] [data-testid=assistant-message]:not([data-state=streaming])`).length >= n",
        arg=[pane, n],
        timeout=TIMEOUT_MS,
    )
    errors = page.locator(f"[data-testid=pane-{pane}] [data-testid=assistant-message][data-state=error]")
    assert errors.count() == 0, errors.all_inner_texts()
    return _answers(page, pane).locator("[data-testid=assistant-text]").all_text_contents()


def test_playground_streams_the_same_answers_as_the_openai_client(browser, server, tmp_path):
    url, base = server
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(f"{url}/")
    assert page.title() == "nomoat playground"

    # The server wants a key: the page asks for it, keeps it in localStorage and sends it as a bearer token.
    page.get_by_test_id("api-key").wait_for(state="visible", timeout=TIMEOUT_MS)
    page.get_by_label("Key", exact=True).fill(KEY)
    page.get_by_test_id("api-key-save").click()
    page.wait_for_function("!document.querySelector('[data-testid=send]').disabled", timeout=TIMEOUT_MS)
    assert page.evaluate("localStorage.getItem('nomoat.apiKey')") == KEY
    options = page.get_by_test_id("model-select").locator("option").all_text_contents()
    assert base in options and "ad1" in options

    # One turn with the base model, greedy, with a system prompt: the streamed text equals the openai client's.
    page.get_by_test_id("model-select").select_option(base)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    page.get_by_label("System prompt").fill(SYSTEM)
    page.get_by_test_id("prompt").fill("w5 w77")
    page.get_by_test_id("prompt").press("Enter")
    (first,) = _wait_answers(page, "a", 1)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w5 w77"}]
    ref_first, n_first = reference(url, base, messages)
    assert first == ref_first and first
    stats = page.get_by_test_id("pane-a").get_by_test_id("answer-stats").last.text_content()
    assert STATS.match(stats) and stats.startswith(f"{n_first} token"), stats

    # A second turn sends the history; markup typed by the user is shown as text, never parsed.
    page.get_by_test_id("prompt").fill("<b>w6</b> w7")
    page.get_by_test_id("send").click()
    _, second = _wait_answers(page, "a", 2)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "<b>w6</b> w7"}]
    assert second == reference(url, base, messages)[0]
    assert page.get_by_test_id("user-text").last.text_content() == "<b>w6</b> w7"
    assert page.locator("[data-testid=pane-a] .messages b").count() == 0

    # Compare mode: base (A) and the adapter (B) answer the same prompt at once, each as the openai client says.
    page.get_by_test_id("clear").click()
    page.get_by_test_id("compare-toggle").check()
    page.get_by_test_id("model-select-b").select_option("ad1")
    assert page.get_by_test_id("pane-b").is_visible()
    page.get_by_test_id("prompt").fill("w5 w77")
    page.get_by_test_id("send").click()
    (a,) = _wait_answers(page, "a", 1)
    (b,) = _wait_answers(page, "b", 1)
    assert a == ref_first
    assert b == reference(url, "ad1", messages[:2])[0]
    assert a and b and a != b
    assert page.get_by_test_id("pane-b-model").text_content() == "ad1"
    assert STATS.match(page.get_by_test_id("pane-b").get_by_test_id("answer-stats").last.text_content())

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert not page_errors, page_errors
    page.close()
