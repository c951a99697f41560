"""The generation engine: a static KV cache, continuous batching, prefix caching, streaming.

Shape (gpt-fast's, widened to many requests; the steps are in `steps.py`): `prefill` runs prompts into cache rows,
`decode_one_token` runs one token for every running row at once, `sample` picks the next tokens. Between two decode
steps the scheduler admits queued requests (prefilling them) and retires finished or cancelled ones, so requests join
and leave the running batch at any step. Running requests always occupy cache rows `0..n-1`: a leaving request's
row is refilled by moving the last row into it, so the decode step attends over a view of the cache, never a copy.

It decodes with the `DecodeModel` that `nomoat.inference.prepare` makes from the given model (which is not changed;
adapter banks wrap the decode model's layers). Each row's logits pass through its request's `logits_hook`.

Threading: every public method is safe to call from any thread. Either call `step()` yourself (what `generate` and
`stream` do when no loop runs), or `start()` a background loop (what the server does) and consume handles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nomoat.generate.constraints import take_tokens
from nomoat.generate.prefix_cache import PrefixCache, find_twin, fork_row
from nomoat.generate.sampling import SamplingBatch, SamplingParams, SamplingState, make_generator, sample
from nomoat.generate.steps import LogitsHook, apply_logits_hooks, decode_one_token, feed_rows, prefill, prefill_rows
from nomoat.generate.stopping import StopStringMatcher
from nomoat.inference import DecodeConfig, DecodeModel, prepare
from nomoat.lora.bank import AdapterBank, group_rows
from nomoat.models.kv_cache import KVCache, rows_for_memory
from nomoat.models.transformer import Transformer
from nomoat.tokenizer import Tokenizer
from nomoat.util.errors import BusyError

# An adapter selection: () for the base model, or (name, weight) pairs applied together (a stack).
AdapterSelection = tuple[tuple[str, float], ...]


logger = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 256  # padded tokens per prefill forward: each chunk's first tokens go out when it is done,
# so smaller chunks give a crowd's median request its first token sooner (a forward's weights stream once per chunk)
ADMIT_TOKENS_PER_STEP = 2048  # prompt tokens admitted per step: a burst gets its first tokens within one step, and
# running rows wait at most that many prompt tokens' prefill between two of their tokens


class QueueFullError(BusyError, RuntimeError):
    """The engine's waiting queue is at its bound: retry later."""


@dataclass
class TokenLogprob:
    """The log-probability of one generated token and, when asked, the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of a streamed request, with the tokens that produced it."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    """The final record of a request."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "cancelled", or "error" (the engine failed; see its log)
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    decode_tokens_per_s: float | None
    cached_prompt_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class RequestHandle:
    """What `Engine.submit` returns: iterate it for `Delta`s then one `Completion`; `cancel()` to stop early."""

    def __init__(self, engine: Engine, request_id: str, events: queue.Queue | None = None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.events: queue.Queue[Delta | Completion] = queue.Queue() if events is None else events
        self.completion: Completion | None = None

    def cancel(self) -> None:
        """Stop generating now; the request finishes with `finish_reason="cancelled"` and frees its row."""
        self.engine.cancel(self.request_id)

    def __iter__(self) -> Iterator[Delta | Completion]:
        if self.completion is not None:  # already consumed: only the record is left
            yield self.completion
            return
        while True:
            if self.engine.running_loop:
                event = self.events.get()
            else:
                while self.events.empty():
                    if not self.engine.step() and self.events.empty():
                        raise RuntimeError(f"request {self.request_id} is not in this engine")
                event = self.events.get_nowait()
            if isinstance(event, Completion):
                self.completion = event
                yield event
                return
            yield event

    def result(self) -> Completion:
        """Wait for the request to finish and return its `Completion`."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


@dataclass(eq=False)  # a request is itself (rows are found by identity, not by comparing every field)
class _Request:
    """A request's state inside the engine."""

    id: str
    prompt: list[int]
    params: SamplingParams
    adapter: AdapterSelection
    handle: RequestHandle
    stop_ids: frozenset[int]
    detok: Any
    stops: StopStringMatcher
    generator: torch.Generator | None
    submitted: float
    output: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    first_token_at: float | None = None
    cached: int = 0
    next_token: int | None = None  # sampled, not yet fed back through the model
    unfed: int = 0  # tokens before `next_token` not in the cache yet (forced by a grammar)
    cancelled: bool = False
    logits_hook: LogitsHook | None = None

    @property
    def length(self) -> int:
        """Tokens in the cache row once `next_token` is fed: prompt plus output minus the pending one."""
        return len(self.prompt) + len(self.output) - 1


class Engine:
    """Continuous-batching generation over one model.

    Args:
        model: A nomoat `Transformer` (eval mode).
        tokenizer: Its tokenizer (eos ids, detokenizing).
        max_running: Rows of the KV cache: requests decoded together. None: as many as a quarter of the free memory
            holds (`kv_cache.rows_for_memory`, at most 64).
        max_queue: Requests allowed to wait for a row; beyond it `submit` raises `QueueFullError`.
        max_seq_len: Tokens per row (prompt plus completion). Default: the model's context, at most 4096.
        prefix_cache_bytes: Memory budget for cached prompt prefixes' keys and values (0 disables prefix caching).
        prefix_block: Granularity of prefix matching, in tokens.
        compile: Run the decode step's layer loop through `torch.compile` (dynamic shapes) where the one-call
            decode stack does not apply (its compile time rarely pays on a CPU); steps with adapter rows run eagerly.
        adapters: LoRA adapters to load, name -> PEFT-format folder (more with `add_adapter`). Each request picks
            its own selection; rows of one batch may use different adapters.
        decode_config: How the decode model is prepared (`nomoat.inference.DecodeConfig`; default: its defaults).
        adapter_dtype: The adapters' factor dtype: "auto", "float32" or "bfloat16" (`bank.resolve_adapter_dtype`).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_running: int | None = 8,
        max_queue: int = 256,
        max_seq_len: int | None = None,
        prefix_cache_bytes: int = 256 * 2**20,
        prefix_block: int = 16,
        compile: bool = False,
        adapters: dict[str, str | Path] | None = None,
        decode_config: DecodeConfig | None = None,
        adapter_dtype: str = "auto",
    ) -> None:
        self.model = model.eval()
        self.decode: DecodeModel = prepare(model, decode_config)
        self.bank: AdapterBank | None = None
        self.adapter_dtype, self.tokenizer, self.max_queue = adapter_dtype, tokenizer, max_queue
        self.max_seq_len = max_seq_len or min(model.config.max_position_embeddings, 4096)
        self.max_running = max_running or rows_for_memory(model.config, self.max_seq_len, model.dtype, model.device)
        self.cache = KVCache(model.config, self.max_running, self.max_seq_len, model.dtype, model.device)
        self._prefix_args = (prefix_cache_bytes, prefix_block)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block) if prefix_cache_bytes else None
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # request i owns cache row i
        self.sampling = SamplingState(self.max_running, model.config.vocab_size, model.device)
        self.fast_forward = True  # grammar-forced tokens taken without a step each (fed together with the next step)
        self.prefill_tokens = 0  # prompt tokens run through the model (not restored or forked)
        self._last_batch: SamplingBatch | None = None
        self.lock = threading.RLock()  # the rows, the cache and the bank: held for a whole step
        # The waiting queue has a lock of its own, so that submitting (from a server's event loop) never waits for
        # a step to end. Order: `lock` before `_queue_lock`, never the other way.
        self._queue_lock = threading.Lock()
        self.running_loop = False
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._forward: Callable[..., torch.Tensor] = self.decode
        if compile and self.decode.plan is None:
            self._forward = torch.compile(self.decode.net.forward, dynamic=True)
        for name, folder in (adapters or {}).items():
            self.add_adapter(name, folder)

    # ---- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Load a LoRA adapter (PEFT format) that requests can then select by `name`.

        Raises:
            AdapterError: The folder is not a usable adapter for this model (see `AdapterBank.add`).
        """
        with self.lock:
            if self.bank is None:
                self.bank = AdapterBank(self.decode.net, self.adapter_dtype)  # the decode model's layers
            self.bank.add(name, folder)
            self.decode.rebuild_plan()

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; requests can no longer select it.

        Raises:
            ValueError: A waiting or running request uses it.
        """
        with self.lock, self._queue_lock:
            users = [r.id for r in (*self.waiting, *self.running) if any(a == name for a, _ in r.adapter)]
            if users:
                raise ValueError(f"adapter {name!r} is in use by {len(users)} request(s)")
            if self.bank is not None:
                self.bank.remove(name)
                self.decode.rebuild_plan()

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return self.bank.names if self.bank is not None else []

    def _plan(self, reqs: Sequence[_Request]) -> contextlib.AbstractContextManager:
        if self.bank is None or not any(r.adapter for r in reqs):
            return contextlib.nullcontext()
        return self.bank.plan(group_rows([r.adapter for r in reqs], self.model.device))

    # ---- submitting -------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        adapter: AdapterSelection = (),
        request_id: str | None = None,
        events: queue.Queue | None = None,
        logits_hook: LogitsHook | None = None,
    ) -> RequestHandle:
        """Queue a request; returns its handle at once.

        Args:
            prompt: Text (encoded with the tokenizer's special tokens) or token ids.
            params: Sampling parameters (default: `SamplingParams()`).
            adapter: The adapter selection for this request (empty: the base model).
            request_id: A name for the request (default: a counter).
            events: The queue the request's `Delta`s and `Completion` are put into (default: a new `queue.Queue`);
                a server passes one whose `put` wakes its event loop.
            logits_hook: Called with this request's next-token logits (V,) fp32 before each sampling; returns new
                logits or None after changing them in place. If it has an `accept(token)` method (a grammar's state),
                that is called with each token sampled for the request.

        Raises:
            QueueFullError: `max_queue` requests are already waiting.
            ValueError: the prompt is empty or does not fit in a cache row.
        """
        params = dataclasses.replace(params) if params else SamplingParams()  # read at submission, kept
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine holds at most {self.max_seq_len - 1}")
        rid = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(self, rid, events)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        gen = None if params.is_greedy else make_generator(params, self.model.device)
        req = _Request(
            id=rid, prompt=ids, params=params, adapter=(), handle=handle, stop_ids=frozenset(stop_ids),
            detok=self.tokenizer.stream_decoder(skip_special_tokens=True), stops=StopStringMatcher(params.stop),
            generator=gen, submitted=time.perf_counter(), logits_hook=logits_hook,
        )  # fmt: skip
        with self._queue_lock:  # checked under the queue lock: an adapter is removed only while it is held
            if adapter:
                if self.bank is None:
                    raise ValueError("no adapter is loaded in this engine (add one with add_adapter)")
                req.adapter = tuple(self.bank.check(adapter))
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(req)
        self._wake.set()
        return handle

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kw: Any) -> Completion:
        """Run one request to the end and return its `Completion`."""
        return self.submit(prompt, params, **kw).result()

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kw: Any) -> Iterator[
        Delta | Completion
    ]:
        """Yield `Delta`s of text as they become final, then the `Completion`."""
        return iter(self.submit(prompt, params, **kw))

    def cancel(self, request_id: str) -> None:
        """Cancel a waiting or running request without waiting for a step to end.

        A waiting request, or a running one while no step runs, finishes and frees its row before this returns; a
        running one while a step runs is marked, and the engine frees its row before the next step.
        """
        with self._queue_lock:
            for req in list(self.waiting):
                if req.id == request_id:
                    self.waiting.remove(req)
                    req.cancelled = True
                    self._finish(req, "cancelled")
                    return
        req = next((r for r in list(self.running) if r.id == request_id), None)
        if req is None:
            return
        req.cancelled = True
        if self.lock.acquire(blocking=False):
            try:
                self._retire_cancelled()
            finally:
                self.lock.release()
        else:
            self._wake.set()

    def _retire_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._retire(req, "cancelled")

    @property
    def num_running(self) -> int:
        """Requests holding a cache row."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a row."""
        return len(self.waiting)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduling loop in a background thread (for servers)."""
        if self._thread is not None:
            return
        self.running_loop = True
        self._thread = threading.Thread(target=self._loop, name="nomoat-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background loop (requests in flight stay where they are)."""
        self.running_loop = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while self.running_loop:
            try:
                worked = self.step()
            except Exception:  # a failed step must not leave clients waiting forever on a dead thread
                logger.exception("a generation step failed; the requests in flight end with finish_reason 'error'")
                self._fail_all()
                worked = True
            if not worked:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _fail_all(self) -> None:
        """End every running and waiting request with `finish_reason="error"` and free all rows."""
        with self.lock, self._queue_lock:
            failed = self.running + list(self.waiting)
            self.running, self.waiting = [], deque()
            for req in failed:
                self._finish(req, "error")

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling iteration: admit waiting requests (prefill), then one decode step for all running ones.

        Returns:
            Whether there was any work.
        """
        with self.lock:
            self._retire_cancelled()
            admitted = []
            budget = ADMIT_TOKENS_PER_STEP
            room = self.max_running - len(self.running)
            with self._queue_lock:
                while self.waiting and len(admitted) < room and (budget > 0 or not admitted):
                    budget -= len(self.waiting[0].prompt)
                    admitted.append(self.waiting.popleft())
            if admitted:
                self.refresh()
            self._admit_all(admitted)
            worked = bool(admitted)
            if self.running:
                self._decode()
                worked = True
            return worked

    def refresh(self) -> bool:
        """Remake what changed in the model since the decode model was made; True if anything did.

        `step` calls it when it admits requests (never per token), so weights merged into the model, or layers
        replaced in it, are used from the next request on; call it before using `decode` directly.
        """
        with self.lock:
            changed = self.decode.refresh()
            if changed and self.prefix_cache is not None:
                self.prefix_cache = PrefixCache(*self._prefix_args)  # cached keys and values belong to old weights
            return changed

    # ---- prefill, decode, sample --------------------------------------------------------------------------------

    def _admit_all(self, reqs: list[_Request]) -> None:
        """Prefill newly admitted requests, several in one forward, and emit each one's first token.

        A request with a cached prompt prefix runs only the rest; one with another row's prompt and adapters (the `n`
        samples of a request) is forked from it. The others are prefilled in right-padded forwards of at most
        `PREFILL_CHUNK_TOKENS` tokens (rows may differ in adapters and start positions), each chunk's first tokens
        emitted when it is done. Padding writes keys and values past a shorter prompt's end that no query sees.
        """
        fresh: list[_Request] = []
        twins: list[_Request] = []
        for req in reqs:
            row = len(self.running)
            self.running.append(req)
            self.sampling.reset_row(row, req.prompt, req.params)
            if find_twin(req, self.running[:-1]) is not None:
                twins.append(req)
                continue
            # Keys and values depend on the adapter: cached prefixes are kept apart per selection.
            req.cached = self.prefix_cache.restore(req.prompt, self.cache, row, req.adapter) if self.prefix_cache else 0
            fresh.append(req)
        chunk: list[_Request] = []
        for req in fresh:
            longest = max(len(r.prompt) - r.cached for r in [*chunk, req])
            if chunk and (len(chunk) + 1) * longest > PREFILL_CHUNK_TOKENS:
                self._prefill(chunk)
                chunk = []
            chunk.append(req)
        if chunk:
            self._prefill(chunk)
        for k, req in enumerate(twins):
            req.cached = fork_row(self.cache, self.running, req, twins[k:])
            self._prefill([req])

    def _prefill(self, reqs: list[_Request]) -> None:
        """Prefill requests already in their rows (each from its cached prefix, if any), store prefixes, emit."""
        rows = [self.running.index(r) for r in reqs]
        self.prefill_tokens += sum(len(r.prompt) - r.cached for r in reqs)
        with self._plan(reqs):
            if len(reqs) == 1:
                logits = prefill(self.decode, self.cache, rows[0], reqs[0].prompt, reqs[0].cached)[None]
            else:
                index = torch.tensor(rows, device=self.model.device)
                contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
                starts = [r.cached for r in reqs]
                args = ([r.prompt for r in reqs], starts) if any(starts) else ([r.prompt for r in reqs],)
                logits = prefill_rows(self.decode, self.cache, slice(rows[0], rows[-1] + 1) if contiguous else index,
                                      *args)  # fmt: skip
        if self.prefix_cache is not None:
            for req, row in zip(reqs, rows):
                self.prefix_cache.store(req.prompt, self.cache, row, namespace=req.adapter)
        self._sample_and_emit(reqs, logits)

    def _decode(self) -> None:
        reqs = self.running
        late = [(i, r) for i, r in enumerate(reqs) if r.unfed]  # forced tokens: into the cache in one forward
        with self._plan([r for _, r in late]):
            feed_rows(self.decode, self.cache, [(i, r.prompt + r.output[:-1], r.length - r.unfed) for i, r in late])
        tokens = torch.tensor([[r.next_token] for r in reqs], device=self.model.device)
        positions = torch.tensor([[r.length] for r in reqs], device=self.model.device)
        plan = self._plan(reqs)
        forward = self._forward if isinstance(plan, contextlib.nullcontext) else self.decode
        with plan:
            logits = decode_one_token(forward, self.cache, tokens, positions)
        self._sample_and_emit(list(reqs), logits)

    def _sample_and_emit(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        """Sample the next token of each request (its logits row i), emit its text, retire finished ones."""
        rows = [self.running.index(r) for r in reqs]
        batch = self._sampling_batch([r.params for r in reqs])
        logits = apply_logits_hooks(logits.float(), [r.logits_hook for r in reqs])
        result = sample(logits, self.sampling, rows, batch, [r.generator for r in reqs])
        if batch.penalties is not None:  # only rows with a penalty read their history
            self.sampling.record(rows, result.tokens)
        params = batch.params
        logprobs = result.logprob_lists(params)
        tokens = result.tokens.tolist()
        now = time.perf_counter()
        finished: list[tuple[_Request, str]] = []
        for i, req in enumerate(reqs):
            for forced, token in enumerate(take_tokens(req.logits_hook, tokens[i], req.params, self.fast_forward)):
                req.first_token_at = req.first_token_at or now
                req.output.append(token)
                req.next_token, req.unfed = token, forced
                if token in req.stop_ids:
                    self._emit(req, req.detok.flush(), [], None, final=True)
                    finished.append((req, "stop"))
                    break
                lp = TokenLogprob(token, *logprobs[i]) if logprobs[i] is not None else None
                if lp is not None:
                    req.logprobs.append(lp)
                if self._emit(req, req.detok.add(token), [token], lp):
                    finished.append((req, "stop"))
                    break
                if len(req.output) >= req.params.max_new_tokens or req.length + 1 >= self.max_seq_len:
                    self._emit(req, req.detok.flush(), [], None, final=True)
                    finished.append((req, "length"))
                    break
        for req, reason in finished:  # after the loop: retiring moves rows
            self._retire(req, reason)

    def _sampling_batch(self, params: list[SamplingParams]) -> SamplingBatch:
        """The batch's parameter tensors, rebuilt only when its requests change (about 0.1 ms a step)."""
        last = self._last_batch
        if last is None or len(last.params) != len(params) or any(a is not b for a, b in zip(last.params, params)):
            last = self._last_batch = SamplingBatch.build(params, self.model.device)
        return last

    def _emit(self, req: _Request, text: str, tokens: list[int], lp: TokenLogprob | None, final: bool = False) -> bool:
        """Pass text through the stop strings and send what is final; True when a stop string was hit."""
        safe, hit = req.stops.push(text)
        if final and not hit:
            safe += req.stops.flush()
        if safe or tokens:
            req.text.append(safe)
            req.handle.events.put(Delta(safe, tokens, [lp] if lp is not None else []))
        return hit

    def _retire(self, req: _Request, reason: str) -> None:
        """Free the request's row at once: the last running row moves into it."""
        row = self.running.index(req)
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            n = moved.length + 1
            for layer in range(len(self.cache.k)):
                self.cache.k[layer][row, :, :n] = self.cache.k[layer][last, :, :n]
                self.cache.v[layer][row, :, :n] = self.cache.v[layer][last, :, :n]
            self.sampling.move_row(last, row)
            self.running[row] = moved
        self.running.pop()
        self._finish(req, reason)

    def _finish(self, req: _Request, reason: str) -> None:
        now = time.perf_counter()
        output = req.output
        if reason == "stop" and output and output[-1] in req.stop_ids:
            output = output[:-1]  # a stop token ends the text; it is not part of it
        decode_time = now - req.first_token_at if req.first_token_at else None
        n_decoded = max(len(req.output) - 1, 0)
        req.handle.events.put(
            Completion(
                request_id=req.id,
                text="".join(req.text),
                token_ids=list(output),
                finish_reason=reason,
                prompt_tokens=len(req.prompt),
                completion_tokens=len(output),  # the tokens of the text, as OpenAI counts: not the stop token
                time_to_first_token_s=req.first_token_at - req.submitted if req.first_token_at else None,
                decode_tokens_per_s=n_decoded / decode_time if decode_time and n_decoded else None,
                cached_prompt_tokens=req.cached,
                logprobs=req.logprobs,
            )
        )
