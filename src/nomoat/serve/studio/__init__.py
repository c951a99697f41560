"""nomoat studio's server side: the `/v1/studio` API (datasets, preview, training jobs, adapters) and offline docs.

`mount_studio(app, state)` adds it to the server that `nomoat.serve.app.create_app` builds; the pages themselves are
static files in `serve/web/`. `StudioSettings` (in `ServeSettings.studio`) says which folders it may read.
"""

from __future__ import annotations

import atexit
import dataclasses
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from nomoat.lora.registry import Registry
from nomoat.serve.studio.docs import offline_docs
from nomoat.serve.studio.jobs import JobQueue
from nomoat.serve.studio.routes import build_router
from nomoat.serve.studio.settings import StudioSettings

__all__ = ["StudioSettings", "mount_studio"]


def mount_studio(app: FastAPI, state: Any) -> JobQueue:
    """Add the studio routes and the offline `/docs` to `app`; returns the job queue (stopped at exit).

    Args:
        app: The FastAPI app (before the static page mount, which would shadow routes added after it).
        state: The server's `ServerState` (settings, adapter manager).
    """
    settings = getattr(state.settings, "studio", None) or StudioSettings()
    home = getattr(state.settings, "registry_home", None)
    if settings.home is None and home is not None:  # a server with its own registry keeps the studio's files there
        settings = dataclasses.replace(settings, home=Path(home) / "studio")
    registry = Registry(home)
    queue = JobQueue(settings.jobs, settings.python, registry)
    app.include_router(build_router(state, settings, queue, registry))
    offline_docs(app)
    atexit.register(queue.close)
    state.studio = queue
    return queue
