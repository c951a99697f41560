"""Which adapters the server knows and keeps in memory (`AdapterManager`), and the model-name syntax (`parse_model`).

A request's `model` is the base model's name, an adapter's name, or a stack `base+a:1.0+b:0.5` (weights default to
1.0; the base's name may be left out: `a+b:0.5`). Adapters come from `--adapter` at start, `POST /v1/adapters`, or
the registry (`$NOMOAT_HOME/adapters`) on first use. At most `max_loaded` stay in memory: the least recently used
one that no request is using is evicted, one in use never is. Each load gets a fresh engine-side name (`name@N`)
because the engine's prefix cache keys prompts by adapter name: a reload from another folder must not see old keys.
A folder that fails to load leaves nothing behind: no registration, nothing in the engine.

Loading by folder path over the API is off unless the operator allows folders (`allowed_folder`): a path outside
them, missing, or not a folder all get one answer, so a client learns nothing about the server's files.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from safetensors import SafetensorError

from nomoat.lora.peft_format import AdapterError
from nomoat.lora.registry import AdapterNotFoundError, Registry, validate_name
from nomoat.lora.selection import AdapterNameError, AdapterSelection, SelectionError, parse_selection
from nomoat.util.errors import BusyError, NomoatError, NotFoundError, UsageError


class AdapterHost(Protocol):
    """What the manager needs from the engine."""

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Load a PEFT adapter folder under `name`."""

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter."""


class UnknownModelError(NotFoundError, LookupError):
    """The model name names no base and no adapter (404)."""


class BadModelError(UsageError, ValueError):
    """The model name is malformed, e.g. a bad weight (400)."""


class AdapterBusyError(BusyError, RuntimeError):
    """Every adapter slot is used by running requests (429: retry later)."""


class AdapterConflictError(NomoatError, RuntimeError):
    """The name is taken by another folder, or the adapter to unload is in use (409)."""


class AdapterPathError(NomoatError, PermissionError):
    """Loading by path is off, or the path is not a folder inside the allowed ones (403; one answer for all)."""


# What reading a damaged adapter raises (a ValueError covers bad JSON and bad UTF-8; an OSError, unreadable files).
_UNREADABLE = (SafetensorError, OSError, ValueError, KeyError, EOFError, json.JSONDecodeError)


def allowed_folder(path: str, allowed: list[Path] | tuple[Path, ...]) -> Path:
    """The real folder `path` names, if it lies inside one of the `allowed` folders.

    Args:
        path: An absolute path from a client.
        allowed: The folders the operator allowed (`--allow-adapter-dir`); none turns loading by path off.

    Returns:
        The path with links resolved.

    Raises:
        AdapterPathError: Loading by path is off, or the path is relative, outside every allowed folder, missing, or
            not a folder: the same message for each, naming no path.
    """
    if not allowed:
        raise AdapterPathError("Loading adapters by path is off on this server; load one from its registry by name, "
                               "or start the server with --allow-adapter-dir DIR.")  # fmt: skip
    refused = AdapterPathError(
        "'path' must be an absolute path to a folder inside the folders this server allows "
        "adapters from (--allow-adapter-dir); or load the adapter from the registry by name."
    )
    if not os.path.isabs(path):
        raise refused
    real = Path(os.path.realpath(path))  # links resolved: a link inside pointing outside is outside
    roots = [Path(os.path.realpath(d)) for d in allowed]
    if not any(real == root or real.is_relative_to(root) for root in roots) or not real.is_dir():
        raise refused
    return real


def parse_model(model: str, base: str) -> AdapterSelection:
    """The adapter selection a request's `model` names (the grammar of `nomoat.lora.selection`, names only).

    Args:
        model: `base`, `adapter`, `adapter:0.5`, `a:1.0+b:0.5`, or `base+a:1.0+b:0.5` (`none` is the base too).
        base: The base model's name.

    Returns:
        The `(adapter name, weight)` stack in order; empty for the base alone.

    Raises:
        UnknownModelError: A part is not a valid adapter name (a folder path, say).
        BadModelError: A weight is not a finite number, a part is empty, or an adapter is named twice.
    """
    try:
        return parse_selection(model, base=base, paths=False)
    except AdapterNameError as e:
        raise UnknownModelError(f"The model `{model}` does not exist: {e} ({e.hint})") from None
    except SelectionError as e:
        raise BadModelError(f"model {model!r}: {e} ({e.hint})" if e.hint else f"model {model!r}: {e}") from None


class AdapterManager:
    """Known adapters, the loaded ones in LRU order, and how many requests use each.

    Args:
        host: The engine (`add_adapter` / `remove_adapter`).
        max_loaded: Most adapters in memory at once.
        registry: Where unknown names are looked up (default: `$NOMOAT_HOME`).
        on_event: Called with "load" or "evict" (metrics).
    """

    def __init__(
        self,
        host: AdapterHost,
        max_loaded: int = 8,
        registry: Registry | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.host = host
        self.max_loaded = max_loaded
        self.registry = registry or Registry()
        self.on_event = on_event or (lambda _: None)
        self.known: dict[str, Path] = {}  # registered (start-up or POST): name -> folder
        self.loaded: OrderedDict[str, str] = OrderedDict()  # name -> engine-side name, least recently used first
        self.users: dict[str, int] = {}
        self.lock = threading.Lock()
        self._loads = 0

    # ---- names --------------------------------------------------------------------------------------------------

    def register(self, name: str, folder: str | Path) -> None:
        """Make `name` resolve to `folder` (not loaded yet).

        Raises:
            ValueError: An invalid name.
            AdapterConflictError: The name is taken by another folder.
        """
        validate_name(name)
        folder = Path(folder).expanduser().resolve()
        with self.lock:
            if name in self.known and self.known[name] != folder:
                raise AdapterConflictError(f"an adapter named {name!r} is already registered ({self.known[name]})")
            self.known[name] = folder

    def folder(self, name: str) -> Path:
        """The folder of a registered or registry adapter.

        Raises:
            UnknownModelError: Neither registered nor in the registry.
        """
        if name in self.known:
            return self.known[name]
        try:
            return self.registry.path(name)
        except (AdapterNotFoundError, ValueError):
            raise UnknownModelError(f"The model `{name}` does not exist (no such adapter)") from None

    def names(self) -> list[tuple[str, bool]]:
        """Every adapter a request may name (registered, loaded, in the registry), with whether it is loaded."""
        with self.lock:
            names = set(self.known) | set(self.loaded)
            loaded = set(self.loaded)
        names |= set(self.registry.names())
        return [(n, n in loaded) for n in sorted(names)]

    # ---- loading --------------------------------------------------------------------------------------------------

    def acquire(self, names: list[str]) -> dict[str, str]:
        """Load what is missing (evicting idle adapters if needed) and mark the adapters in use.

        Args:
            names: The adapters of one request.

        Returns:
            Public name -> engine-side name. Pair with `release(names)`.

        Raises:
            UnknownModelError: An adapter is unknown.
            AdapterBusyError: Not enough idle slots to load the missing adapters.
            AdapterError: A folder is not a usable adapter.
        """
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.max_loaded:
            raise BadModelError(f"the stack has {len(wanted)} adapters; this server holds at most {self.max_loaded}")
        with self.lock:
            missing = [n for n in wanted if n not in self.loaded]
            folders = {n: self.folder(n) for n in missing}
            idle = [n for n in self.loaded if not self.users.get(n) and n not in wanted]
            excess = len(self.loaded) + len(missing) - self.max_loaded
            if excess > len(idle):
                raise AdapterBusyError(
                    f"all {self.max_loaded} adapter slots are in use by running requests; retry later"
                )
            for name in idle[: max(excess, 0)]:
                self._evict(name)
            for name in missing:
                self._loads += 1
                engine_name = f"{name}@{self._loads}"
                try:
                    self.host.add_adapter(engine_name, folders[name])
                except AdapterError:
                    raise
                except _UNREADABLE as e:
                    raise AdapterError(f"{folders[name]}: the adapter's files cannot be read, they may be truncated "
                                       f"or corrupt ({type(e).__name__}: {e})") from e  # fmt: skip
                self.loaded[name] = engine_name
                self.on_event("load")
            for name in wanted:
                self.loaded.move_to_end(name)
                self.users[name] = self.users.get(name, 0) + 1
            return {n: self.loaded[n] for n in wanted}

    def release(self, names: list[str]) -> None:
        """A request that `acquire`d these adapters has finished."""
        with self.lock:
            for name in dict.fromkeys(names):
                left = self.users.get(name, 0) - 1
                if left > 0:
                    self.users[name] = left
                else:
                    self.users.pop(name, None)

    def load(self, name: str, folder: str | Path | None = None) -> None:
        """Register (when `folder` is given) and load an adapter now, e.g. for `POST /v1/adapters`.

        Raises:
            ValueError: An invalid name.
            UnknownModelError: No folder given and the name is not known.
            AdapterConflictError: The name is taken by another folder.
            AdapterBusyError: No slot is idle.
            AdapterError: The folder is not a usable adapter.
        """
        validate_name(name)
        registered = False
        if folder is not None:
            path = Path(folder).expanduser()
            if not path.is_dir():
                raise AdapterError(f"{folder} is not a folder on the server")
            registered = name not in self.known
            self.register(name, path)
        try:
            self.acquire([name])
        except BaseException:
            if registered:  # a failed load leaves no name behind (it would be listed, and fail on every use)
                with self.lock:
                    self.known.pop(name, None)
            raise
        self.release([name])

    def unload(self, name: str) -> bool:
        """Evict an adapter from memory and forget its registration (registry files are never touched).

        Returns:
            Whether there was anything to unload or forget.

        Raises:
            AdapterConflictError: A request is using it.
        """
        with self.lock:
            if self.users.get(name):
                raise AdapterConflictError(f"adapter {name!r} is in use by {self.users[name]} request(s)")
            found = name in self.loaded or name in self.known
            if name in self.loaded:
                self._evict(name)
            self.known.pop(name, None)
            return found

    def _evict(self, name: str) -> None:
        engine_name = self.loaded.pop(name)
        self.host.remove_adapter(engine_name)
        self.on_event("evict")

    @property
    def num_loaded(self) -> int:
        """Adapters in memory."""
        return len(self.loaded)
