"""What the server's routes share: `ServerState` (the engine once loaded, the adapter manager, metrics, the drain).

Also the engine interface the server needs (`ServingEngine`) and the server's knobs (`ServeSettings`).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nomoat.generate.engine import RequestHandle
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.registry import Registry
from nomoat.serve import convert
from nomoat.serve.adapters import AdapterManager
from nomoat.serve.errors import APIError
from nomoat.serve.metrics import Metrics
from nomoat.serve.middleware import DrainMiddleware
from nomoat.serve.studio.settings import StudioSettings
from nomoat.tokenizer import Tokenizer


class ServingEngine(Protocol):
    """The part of `nomoat.generate.engine.Engine` the server uses."""

    tokenizer: Tokenizer
    max_seq_len: int
    max_running: int
    max_queue: int
    num_running: int
    num_waiting: int

    def submit(self, prompt: list[int], params: SamplingParams, adapter: Any = (), request_id: str | None = None,
               events: queue.Queue | None = None, logits_hook: Any = None) -> RequestHandle:  # fmt: skip
        """Queue a request."""

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Load an adapter."""

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter."""

    def start(self) -> None:
        """Run the scheduling loop in a background thread."""


@dataclass
class ServeSettings:
    """The server's knobs.

    Attributes:
        model_name: The base model's name in `model` fields and `/v1/models`.
        api_key: Required as `Authorization: Bearer KEY` on /v1 and /metrics when set.
        adapters: Adapters to register and load at start, name -> folder (more load lazily from the registry).
        max_loaded_adapters: Most adapters in memory at once (least recently used idle ones are evicted).
        max_prompt_tokens: Longest prompt (default: the engine's row length minus one).
        max_completion_tokens: Largest `max_tokens`, and the default for requests without one.
        max_body_bytes: Largest request body.
        retry_after_s: `Retry-After` of a 429 or 503.
        registry_home: The adapter registry's root (default `$NOMOAT_HOME`).
        adapter_dirs: Folders `POST /v1/adapters` may load a `path` from; none (the default) turns loading by path
            off, so clients load from the registry by name only.
        cors_origins: Origins a browser page may call the API from (CORS); none (the default) allows none.
        studio: The web studio's folders and limits.
    """

    model_name: str
    api_key: str | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    max_loaded_adapters: int = 8
    max_prompt_tokens: int | None = None
    max_completion_tokens: int = 2048
    max_body_bytes: int = 2 * 2**20
    retry_after_s: int = 1
    registry_home: str | None = None
    adapter_dirs: list[Path] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    studio: StudioSettings = field(default_factory=StudioSettings)


class ServerState:
    """What the routes share: the engine once loaded, the adapter manager, metrics, the shutdown drain."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.engine: ServingEngine | None = None
        self.manager: AdapterManager | None = None
        self.limits: convert.Limits | None = None
        self.token_text: convert.TokenText | None = None
        self.error: str | None = None
        self.created = int(time.time())
        self.metrics = Metrics(self._gauges)
        self.drain: DrainMiddleware | None = None  # set by create_app

    def begin_drain(self) -> None:
        """Refuse new requests with 503 from now on (requests already running go on)."""
        if self.drain is not None:
            self.drain.draining = True

    @property
    def in_flight(self) -> int:
        """HTTP requests being served (streams included)."""
        return self.drain.in_flight if self.drain is not None else 0

    def attach(self, engine: ServingEngine) -> None:
        """Make the server ready on `engine`: load the start-up adapters, start the engine loop."""
        s = self.settings

        def on_event(kind: str) -> None:
            self.metrics.inc("nomoat_adapter_loads_total" if kind == "load" else "nomoat_adapter_evictions_total")

        manager = AdapterManager(engine, s.max_loaded_adapters, Registry(s.registry_home), on_event)
        for name, folder in s.adapters.items():
            manager.register(name, folder)
        for name in list(s.adapters)[: s.max_loaded_adapters]:
            manager.load(name)
        model = getattr(engine, "model", None)
        vocab = model.config.vocab_size if model is not None else engine.tokenizer.vocab_size
        max_prompt = min(s.max_prompt_tokens or engine.max_seq_len - 1, engine.max_seq_len - 1)
        self.limits = convert.Limits(max_prompt, s.max_completion_tokens, engine.max_seq_len, vocab)
        self.token_text = convert.TokenText(engine.tokenizer)
        self.manager = manager
        engine.start()
        self.engine = engine

    def ready(self) -> tuple[ServingEngine, AdapterManager]:
        """The engine and manager, or a 503 while loading (500 if loading failed)."""
        if self.engine is None or self.manager is None:
            if self.error:
                raise APIError(500, f"The model failed to load: {self.error}", code="model_load_failed")
            raise APIError(503, "The model is loading; retry shortly.", code="model_loading",
                           headers={"Retry-After": str(self.settings.retry_after_s)})  # fmt: skip
        return self.engine, self.manager

    def _gauges(self) -> dict[str, tuple[str, float]]:
        e = self.engine
        return {
            "nomoat_model_loaded": ("1 when the model is loaded and serving.", float(e is not None)),
            "nomoat_queue_depth": ("Requests waiting for a batch slot.", e.num_waiting if e else 0),
            "nomoat_running_requests": ("Requests being generated (batch rows in use).", e.num_running if e else 0),
            "nomoat_max_running": ("Batch rows.", e.max_running if e else 0),
            "nomoat_max_queue": ("Queue bound; beyond it requests get 429.", e.max_queue if e else 0),
            "nomoat_adapters_loaded": ("Adapters in memory.", self.manager.num_loaded if self.manager else 0),
        }
