"""Teachers for `nomoat synth`: a local model through the engine, or any OpenAI-compatible chat endpoint.

A teacher answers `Ask`s (a chat, temperature, token budget, seed) and yields each outcome as it completes: the text,
or a `Failure` that says what went wrong after every retry. `LocalTeacher` submits every ask to nomoat's `Engine`
at once (continuous batching does the rest); `RemoteTeacher` posts non-streamed `/v1/chat/completions` requests from
`concurrency` threads, retrying connection errors, timeouts, 408/409/429/5xx answers and bodies that are not a chat
completion with exponential backoff (a server's `Retry-After` is honoured). Errors that would fail every request the
same way (a refused key, an unknown model or URL) stop the run with a `TeacherError` instead of being retried.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

from nomoat.generate.remote import error_message, normalize_base_url, resolve_model
from nomoat.util.errors import NomoatError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})


class TeacherError(NomoatError, RuntimeError):
    """The teacher cannot answer any request (unreachable at the start, a refused key, an unknown model)."""


@dataclass(frozen=True)
class Ask:
    """One chat completion to ask the teacher for.

    Attributes:
        messages: The chat, ending with the user's turn.
        temperature: Sampling temperature (0: greedy).
        max_tokens: Longest answer in tokens.
        seed: The sampling seed (a remote server may ignore it).
    """

    messages: list[dict[str, str]]
    temperature: float
    max_tokens: int
    seed: int | None = None


@dataclass(frozen=True)
class Failure:
    """An ask that got no answer: the last error and how many attempts were made."""

    error: str
    attempts: int


Outcome = str | Failure


def record_id(value: Any) -> str:
    """A short stable id of a JSON-able value (its canonical JSON's SHA-256, 16 hex digits)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def ask_seed(*parts: Any) -> int:
    """A sampling seed derived from the run's seed and an item's identity (the same on every rerun)."""
    return int(record_id([str(p) for p in parts]), 16) % (2**31)


class Teacher(Protocol):
    """What the pipelines need of a teacher."""

    def connect(self) -> Any:
        """Check the teacher answers (and settle which model it is) before any work starts."""
        ...

    def describe(self) -> dict[str, Any]:
        """The teacher for the provenance record (no secrets)."""
        ...

    def run(self, asks: Sequence[Ask]) -> Iterator[tuple[int, Outcome]]:
        """Each ask's index and outcome, in the order they complete."""
        ...


class LocalTeacher:
    """A model loaded here, answering through nomoat's engine (the adapter selection applied to every ask).

    Args:
        engine: The engine over the model, with the selected adapters in its bank.
        name: The model as the user named it (for provenance).
        adapter: The adapter selection every ask runs with (None: the base model).
        adapter_names: The adapters as the user named them (for provenance).
    """

    def __init__(self, engine: Any, name: str, adapter: Any = None, adapter_names: Sequence[str] = ()) -> None:
        self.engine, self.name, self.adapter, self.adapter_names = engine, name, adapter, list(adapter_names)

    def connect(self) -> str:
        """Nothing to check: the model is loaded."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """`{"kind": "local", "model": ..., "adapters": [...]}`."""
        return {"kind": "local", "model": self.name, "adapters": self.adapter_names}

    def run(self, asks: Sequence[Ask]) -> Iterator[tuple[int, Outcome]]:
        """Submit every ask to the engine, then yield the answers in order (an ask the engine refuses fails)."""
        from nomoat.generate.sampling import SamplingParams

        tok = self.engine.tokenizer
        handles: list[Any] = []
        for ask in asks:
            try:
                ids = tok.apply_chat_template(ask.messages, add_generation_prompt=True, tokenize=True)
                params = SamplingParams(temperature=ask.temperature, max_new_tokens=ask.max_tokens, seed=ask.seed)
                handles.append(self.engine.submit(ids, params, adapter=self.adapter))
            except ValueError as e:  # a prompt too long for the model, a template that refuses the chat
                handles.append(Failure(f"{type(e).__name__}: {e}", 1))
        for i, handle in enumerate(handles):
            if isinstance(handle, Failure):
                yield i, handle
                continue
            try:
                yield i, handle.result().text
            except (RuntimeError, ValueError) as e:
                yield i, Failure(f"{type(e).__name__}: {e}", 1)


class _Retry(Exception):
    """A failed attempt worth retrying, with the server's `Retry-After` seconds if it sent one."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class RemoteTeacher:
    """An OpenAI-compatible chat endpoint (`nomoat serve`, vLLM, llama.cpp's server, OpenAI itself...).

    Args:
        url: The server root or its `/v1` URL.
        api_key: Sent as `Authorization: Bearer KEY` (None: no header).
        model: The model to ask; None: the first base model the server lists.
        concurrency: Requests in flight at once.
        retries: Further attempts after a failed one (retryable errors only).
        backoff: Seconds before the first retry; doubled for each next one (with up to 25% jitter).
        timeout: Seconds to wait for one answer.
        sleep: How to wait between attempts (tests pass a recorder).
    """

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, concurrency: int = 4,
                 retries: int = 4, backoff: float = 1.0, timeout: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        import httpx

        self.url = normalize_base_url(url)
        self.model = model
        self.concurrency, self.retries, self.backoff, self.sleep = max(1, concurrency), max(0, retries), backoff, sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, headers=headers, limits=limits,
                                    timeout=httpx.Timeout(timeout, connect=10.0))  # fmt: skip
        self._fatal: TeacherError | None = None
        self._rng = random.Random(0)
        self._rng_lock = threading.Lock()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def describe(self) -> dict[str, Any]:
        """`{"kind": "remote", "url": ..., "model": ...}` (never the key)."""
        return {"kind": "remote", "url": self.url, "model": self.model}

    def connect(self) -> str:
        """Check the server answers and pick the model (`GET /v1/models`) when none was named.

        Raises:
            TeacherError: The server cannot be reached, refuses the key, or lists no model.
        """
        if self.model is not None:
            return self.model
        try:
            resp = self._client.get("/v1/models")
        except self._httpx.HTTPError as e:
            raise TeacherError(f"cannot reach {self.url}: {e}", hint="check --teacher-url") from e
        if resp.status_code != 200:
            raise TeacherError(f"{self.url}/v1/models: {error_message(resp.status_code, resp.text)}",
                               hint="name the model with --teacher-model, or check --api-key-env")  # fmt: skip
        try:
            cards = [c for c in resp.json()["data"] if isinstance(c, dict) and isinstance(c.get("id"), str)]
            self.model = resolve_model(cards, None)
        except (ValueError, KeyError, TypeError, NomoatError) as e:
            raise TeacherError(f"{self.url}/v1/models did not list a model: {resp.text[:200]!r}",
                               hint="name the model with --teacher-model") from e  # fmt: skip
        return self.model

    def run(self, asks: Sequence[Ask]) -> Iterator[tuple[int, Outcome]]:
        """Post the asks from `concurrency` threads; yield each outcome as it completes.

        Raises:
            TeacherError: The server refused a request in a way every request would be (401, 403, 404); the asks
                still queued are not sent.
        """
        self.connect()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._ask, ask): i for i, ask in enumerate(asks)}
            try:
                for future in as_completed(futures):
                    if self._fatal is not None:
                        raise self._fatal
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()
        if self._fatal is not None:
            raise self._fatal

    def _ask(self, ask: Ask) -> Outcome:
        """One ask with its retries: the answer's text, or a `Failure` with the last error."""
        error = ""
        for attempt in range(self.retries + 1):
            if self._fatal is not None:
                return Failure(str(self._fatal), attempt)
            try:
                return self._post(ask)
            except _Retry as e:
                error = str(e)
                if attempt == self.retries:
                    break
                with self._rng_lock:
                    jitter = 1 + 0.25 * self._rng.random()
                delay = self.backoff * 2**attempt * jitter
                self.sleep(min(max(delay, e.after or 0.0), 60.0))
            except _Refused as e:
                return Failure(str(e), attempt + 1)
            except TeacherError as e:
                self._fatal = e
                return Failure(str(e), attempt + 1)
        return Failure(error, self.retries + 1)

    def _post(self, ask: Ask) -> str:
        """One attempt. Raises `_Retry`, `_Refused` (this request only) or `TeacherError` (every request)."""
        body: dict[str, Any] = {"model": self.model, "messages": ask.messages, "temperature": ask.temperature,
                                "max_tokens": ask.max_tokens}  # fmt: skip
        if ask.seed is not None:
            body["seed"] = ask.seed
        try:
            resp = self._client.post("/v1/chat/completions", json=body)
        except self._httpx.HTTPError as e:  # connection refused or reset, timeouts
            raise _Retry(f"{type(e).__name__}: {e or 'no detail'}") from e
        if resp.status_code != 200:
            message = error_message(resp.status_code, resp.text)
            if resp.status_code in FATAL_STATUS:
                hint = "check --teacher-url, --teacher-model and the key in --api-key-env"
                raise TeacherError(f"{self.url} refused the request: {message}", hint=hint)
            if resp.status_code in RETRY_STATUS:
                raise _Retry(message, _retry_after(resp.headers.get("retry-after")))
            raise _Refused(message)
        return _answer_text(resp.text)


class _Refused(Exception):
    """The server refused this one request (a 4xx other than auth and not-found): retrying would not help."""


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _answer_text(text: str) -> str:
    """The message text of a chat completion body; `_Retry` when the body is not one."""
    try:
        body = json.loads(text)
        content = body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retry(f"the answer is not a chat completion: {text.strip()[:120]!r}") from None
    if not isinstance(content, str):
        raise _Retry(f"the answer's message has no text content: {text.strip()[:120]!r}")
    return content


__all__ = ["Ask", "Failure", "LocalTeacher", "Outcome", "RemoteTeacher", "Teacher", "TeacherError", "ask_seed",
           "record_id"]
