"""Graceful shutdown: on SIGTERM or Ctrl-C, finish the requests already running (streams included) before exiting.

`DrainingServer` is uvicorn's server with a drain in front of its own shutdown: the first signal makes the app refuse
new requests with 503 (`/health` too, so a load balancer moves on) while the listening socket stays open, and the
server exits once no request is in flight or the grace period has passed, whichever comes first. A second signal
exits at once, as uvicorn does.
"""

from __future__ import annotations

import time
from types import FrameType
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains the app's requests before it shuts down.

    Args:
        config: uvicorn's configuration (its `timeout_graceful_shutdown` applies after the drain).
        state: The app's `ServerState` (`begin_drain`, `in_flight`).
        grace_s: Longest drain in seconds; 0 shuts down at once.
    """

    def __init__(self, config: uvicorn.Config, state: Any, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s
        self.deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first signal starts the drain; another (or a zero grace period) exits now."""
        if self.deadline is None and self.grace_s > 0 and not self.should_exit:
            self.deadline = time.monotonic() + self.grace_s
            self.state.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: end the drain once nothing is in flight or the grace period is over."""
        if self.deadline is not None and not self.should_exit:
            if self.state.in_flight == 0 or time.monotonic() >= self.deadline:
                self.should_exit = True
        return await super().on_tick(counter)
