"""`RemoteChatSession`: a chat session over a running `nomoat serve` (or any OpenAI-compatible server), streamed.

`nomoat chat --server URL` drives the same terminal loop as local chat (`chat.run_terminal_chat`): the history stays
here, each turn posts the whole conversation to `/v1/chat/completions` with `stream: true`, and the server-sent
events come back as the engine's `Delta` and `Completion` records. The key comes from `NOMOAT_API_KEY` unless given.
Only HTTP crosses the boundary: this module never imports the server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any

from nomoat.generate.chat import ChatHistory, ChatTurnError
from nomoat.generate.engine import Completion, Delta
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.selection import parse_selection

API_KEY_ENV = "NOMOAT_API_KEY"


class RemoteError(ChatTurnError):
    """The server could not be reached, refused a request, or sent something that is not an OpenAI answer."""


def normalize_base_url(url: str) -> str:
    """`localhost:8000`, `http://host:8000/` or `http://host:8000/v1` -> `http://host:8000` (the server root).

    Args:
        url: What the user typed.

    Returns:
        The root URL without a trailing slash; the `/v1/...` paths are added to it.
    """
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data:` payload of each server-sent event, from the lines of an event stream.

    Args:
        lines: The stream's lines, without their line ends.

    Yields:
        One string per event (several `data:` lines of one event are joined with newlines); comments and other
        fields (`event:`, `id:`, `retry:`) are skipped.
    """
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def request_body(model: str | None, messages: list[dict[str, str]], params: SamplingParams) -> dict[str, Any]:
    """The JSON of a streamed `/v1/chat/completions` request with these sampling parameters.

    OpenAI's knobs always go; the ones OpenAI lacks (top_k, min_p, repetition_penalty, as vLLM and llama.cpp name
    them) only when they are on, so a strict OpenAI-compatible server still accepts the request.

    Args:
        model: The server's model name (base, adapter or stack), or None for the server's default.
        messages: The conversation, system prompt first.
        params: The sampling parameters of the local chat.

    Returns:
        The request body.
    """
    body: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if model:
        body["model"] = model
    optional = {
        "seed": (params.seed, params.seed is not None),
        "stop": (list(params.stop), bool(params.stop)),
        "top_k": (params.top_k, params.top_k > 0),
        "min_p": (params.min_p, params.min_p > 0),
        "repetition_penalty": (params.repetition_penalty, params.repetition_penalty != 1.0),
        "frequency_penalty": (params.frequency_penalty, params.frequency_penalty != 0.0),
        "presence_penalty": (params.presence_penalty, params.presence_penalty != 0.0),
    }
    body.update({key: value for key, (value, on) in optional.items() if on})
    return body


def error_message(status: int, text: str) -> str:
    """The server's own words from an error body: OpenAI's `{"error": {"message"}}` or FastAPI's `{"detail"}`."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text.strip()[:300] or 'no body'}"
    detail = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        detail = err.get("message") if isinstance(err, dict) else err
        detail = detail or parsed.get("detail") or parsed.get("message")
    if detail is None:
        detail = text.strip()[:300]
    elif not isinstance(detail, str):
        detail = json.dumps(detail)
    hint = f" (give the key with --api-key or ${API_KEY_ENV})" if status == 401 else ""
    return f"HTTP {status}: {detail}{hint}"


def resolve_model(cards: list[dict[str, Any]], wanted: str | None, adapters: list[str] | None = None) -> str:
    """The model name to send, from the server's model list and what the user asked for.

    Args:
        cards: `GET /v1/models`'s `data`: dicts with an `id`, adapters with a `parent`.
        wanted: A name on the server, a folder path whose last part the server serves, a stack, or None (the base).
        adapters: Adapter names in the selection grammar (`NAME`, `NAME:0.5`, `a+b:0.5`) to stack on the model
            (`base+a:1.0+b:0.5`).

    Returns:
        The name; one the server does not list (a stack, say) goes as it is, for the server to accept or refuse.

    Raises:
        RemoteError: The server serves no model and none was asked for.
        SelectionError: An adapter spec is not in the grammar (a UsageError, with a hint).
    """
    ids = [c["id"] for c in cards]
    if wanted is None:
        bases = [c["id"] for c in cards if not c.get("parent")]
        if not ids:
            raise RemoteError("the server lists no model; name one with --model")
        name = (bases or ids)[0]
    elif wanted in ids:
        name = wanted
    else:
        tail = wanted.rstrip("/").rsplit("/", 1)[-1]
        name = tail if tail in ids else wanted
    for spec in adapters or []:  # the one selection grammar, names only (a server never reads a client's path)
        for adapter, weight in parse_selection(spec, paths=False):
            name += f"+{adapter}:{weight!r}"
    return name


class RemoteChatSession(ChatHistory):
    """A conversation with a model on a server: the history is kept here and sent whole with every turn.

    Args:
        base_url: The server, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted).
        params: Sampling parameters for every answer.
        model: The model to ask: the base's name, an adapter's, or a stack `base+a:1.0+b:0.5`; None lets the
            server pick (its base model).
        system: Optional system prompt.
        api_key: Sent as `Authorization: Bearer KEY`; default: the `NOMOAT_API_KEY` environment variable.
        timeout: Seconds to wait between two pieces of a streamed answer (connecting gets 10 s).
    """

    def __init__(
        self,
        base_url: str,
        params: SamplingParams,
        model: str | None = None,
        system: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        try:
            import httpx
        except ImportError as e:  # pragma: no cover - httpx comes with the serve dependencies
            raise RemoteError("talking to a server needs httpx: pip install httpx") from e
        self.base_url = normalize_base_url(base_url)
        self.params = params
        self.model = model
        self.system = system
        self.messages: list[dict[str, str]] = []
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._httpx = httpx
        self._client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> RemoteChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_models(self) -> list[dict[str, Any]]:
        """The models the server offers (`GET /v1/models`): its base model and its adapters (with a `parent`).

        Raises:
            RemoteError: The server is unreachable or refused the request (a missing API key, say).
        """
        try:
            resp = self._client.get("/v1/models")
        except self._httpx.HTTPError as e:
            raise RemoteError(f"cannot reach {self.base_url}: {e}") from e
        if resp.status_code != 200:
            raise RemoteError(error_message(resp.status_code, resp.text))
        try:
            cards = resp.json()["data"]
            if not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
                raise TypeError("a model without an id")
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteError(f"{self.base_url}/v1/models did not answer a model list: {resp.text[:200]}") from e
        return cards

    def connect(self, wanted: str | None = None, adapters: list[str] | None = None) -> str:
        """Check that the server answers and choose the model to talk to (`self.model`).

        Args:
            wanted: A model name on the server (base, adapter or stack); a local folder path whose name the server
                serves also works. None: the server's base model.
            adapters: Adapter names on the server, each with an optional `:WEIGHT`, stacked on the model in order.

        Returns:
            The chosen model name.

        Raises:
            RemoteError: The server is unreachable, refused the request, or serves no model.
        """
        self.model = resolve_model(self.list_models(), wanted, adapters)
        return self.model

    def send(self, text: str) -> Iterator[Delta | Completion]:
        """Add a user message and stream the answer; the answer joins the history when it completes.

        A turn that fails (or that the caller stops early) leaves the history as it was before it.

        Args:
            text: The user's message.

        Yields:
            A `Delta` per streamed piece of text, then one `Completion` (token ids are not sent by the server, so
            `token_ids` stays empty; the token counts come from the server's usage record when it sends one).

        Raises:
            RemoteError: The server is unreachable, refused the request, or broke off the answer.
        """
        self.messages.append({"role": "user", "content": text})
        done = False
        try:
            if self.model is None:
                self.connect()
            completion = yield from self._stream(request_body(self.model, self.conversation(), self.params))
            self.messages.append({"role": "assistant", "content": completion.text})
            done = True
            yield completion
        finally:
            if not done:
                self.messages.pop()

    def _stream(self, body: dict[str, Any]) -> Generator[Delta, None, Completion]:
        """Post one streamed request and yield its text as `Delta`s; returns the `Completion`."""
        started = time.perf_counter()
        first_at: float | None = None
        pieces: list[str] = []
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        request_id = ""
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise RemoteError(error_message(resp.status_code, resp.text))
                for data in sse_data(resp.iter_lines()):
                    if data.strip() == "[DONE]":
                        finish_reason = finish_reason or "stop"
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError as e:
                        raise RemoteError(f"the server sent an event that is not JSON: {data[:200]!r}") from e
                    if chunk.get("error"):
                        raise RemoteError(error_message(200, json.dumps(chunk)))
                    request_id = chunk.get("id") or request_id
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first_at = first_at or time.perf_counter()
                            pieces.append(piece)
                            yield Delta(text=piece, token_ids=[])
                        finish_reason = choice.get("finish_reason") or finish_reason
        except self._httpx.ConnectError as e:
            raise RemoteError(f"cannot reach {self.base_url}: {e}") from e
        except self._httpx.HTTPError as e:
            raise RemoteError(f"the connection to {self.base_url} failed: {type(e).__name__}: {e}") from e
        if finish_reason is None:  # neither a finish reason nor [DONE]: the stream was cut
            raise RemoteError(f"{self.base_url} ended the answer early, without a finish reason")
        ended = time.perf_counter()
        # Without a usage record, count the streamed pieces: the server sends one per decoded token or more.
        n_tokens = int(usage.get("completion_tokens") or len(pieces))
        decode_time = ended - first_at if first_at else None
        completion = Completion(
            request_id=request_id,
            text="".join(pieces),
            token_ids=[],
            finish_reason=finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=n_tokens,
            time_to_first_token_s=first_at - started if first_at else None,
            decode_tokens_per_s=(n_tokens - 1) / decode_time if decode_time and n_tokens > 1 else None,
        )
        return completion
