"""The studio's adapter routes: the registry as a table, one adapter's provenance, load, delete, merge and export.

Loading goes through the server's adapter manager (the same one `POST /v1/adapters` uses), so a loaded adapter is
at once a `model` the chat can name. Merge and export are jobs in the studio's queue (`nomoat merge`,
`nomoat export` in a child process); their results land in the registry and in the studio's `exports` folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from nomoat.lora.registry import AdapterNotFoundError, Registry, validate_name
from nomoat.serve.errors import APIError
from nomoat.serve.studio import files
from nomoat.serve.studio.jobs import ACTIVE, Job, JobQueue, new_id
from nomoat.serve.studio.settings import StudioSettings


class MergeRequest(BaseModel):
    """Combine adapters into a new registry adapter (`nomoat merge`)."""

    adapters: list[str] = Field(min_length=2)
    weights: list[float] | None = None
    method: Literal["cat", "svd", "linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"] = "cat"
    density: float | None = Field(None, gt=0, le=1)
    name: str


class ExportRequest(BaseModel):
    """Write an adapter out (`nomoat export`): merged into its base as a HF folder or GGUF, or as a GGUF LoRA."""

    format: Literal["hf", "gguf", "gguf-lora"] = "hf"
    model: str


class EvalRequest(BaseModel):
    """Score the base and the adapter side by side (`nomoat eval`) on a dataset file the studio may read."""

    root: str
    path: str
    model: str
    limit: int = Field(50, ge=1, le=10_000)
    max_tokens: int = Field(32, ge=1, le=2048)


def registry_error(e: Exception) -> APIError:
    """A registry failure as an API error (404 for an unknown name, else 400)."""
    if isinstance(e, AdapterNotFoundError):
        return APIError(404, str(e.args[0] if e.args else e), "name", "model_not_found")
    return APIError(400, str(e), "name", "invalid_value")


def _row(registry: Registry, name: str, loaded: set[str]) -> dict[str, Any]:
    """One registry table row: name, base, method, data, metrics, size, created, loaded."""
    info = registry.info(name)
    row = {"name": name, "base": info.base_model, "r": info.r, "alpha": info.alpha, "size": info.size_bytes,
           "created": info.created, "loaded": name in loaded, "error": info.error, "method": None, "data": [],
           "metrics": {}}  # fmt: skip
    if info.error:
        return row
    try:
        prov = registry.show(name)["provenance"]
    except Exception:  # noqa: BLE001 - an unreadable record still lists, without provenance
        return row
    training = prov.get("training") if isinstance(prov.get("training"), dict) else {}
    row["method"] = training.get("method") or ("merge: " + str(prov["method"]) if prov.get("parents") else None)
    row["data"] = [Path(str(d.get("path"))).name for d in prov.get("data") or [] if isinstance(d, dict)]
    row["metrics"] = prov.get("metrics") if isinstance(prov.get("metrics"), dict) else {}
    return row


def _checked(name: str) -> str:
    try:
        return validate_name(name)
    except ValueError as e:
        raise APIError(400, str(e), "name", "invalid_value") from None


def add_adapter_routes(router: APIRouter, state: Any, settings: StudioSettings, queue: JobQueue, registry: Registry,
                       change: list[Any]) -> None:  # fmt: skip
    """Add the `/adapters` routes to the studio router."""
    def loaded() -> set[str]:
        manager = getattr(state, "manager", None)
        return set(manager.loaded) if manager is not None else set()

    @router.get("/adapters")
    async def adapters() -> dict[str, Any]:
        """The registry as a table."""
        names = await asyncio.to_thread(registry.names)
        live = loaded()
        return {"data": [await asyncio.to_thread(_row, registry, n, live) for n in names]}

    @router.get("/adapters/{name}")
    async def adapter(name: str) -> dict[str, Any]:
        """One adapter: its `adapter_config.json`, provenance (`nomoat.json`), files and size."""
        try:
            return await asyncio.to_thread(registry.show, _checked(name))
        except Exception as e:  # noqa: BLE001
            raise registry_error(e) from None

    @router.post("/adapters/{name}/load", dependencies=change)
    async def load(name: str) -> dict[str, Any]:
        """Load a registry adapter into the server now, so chats can use it as `model`."""
        _, manager = state.ready()
        try:
            await asyncio.to_thread(manager.load, _checked(name))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - unknown, busy, or not a usable adapter
            status = 404 if "does not exist" in str(e) else 400
            raise APIError(status, str(e), "name", "adapter_load_failed") from None
        return {"id": name, "loaded": True}

    @router.delete("/adapters/{name}", dependencies=change)
    async def delete(name: str) -> dict[str, Any]:
        """Delete an adapter from the registry (unloading it from the server first)."""
        name = _checked(name)
        manager = getattr(state, "manager", None)
        if manager is not None and name in manager.loaded:
            try:
                await asyncio.to_thread(manager.unload, name)
            except Exception as e:  # noqa: BLE001 - in use by a running request
                raise APIError(409, str(e), "name", "adapter_in_use") from None
        try:
            await asyncio.to_thread(registry.remove, name)
        except Exception as e:  # noqa: BLE001
            raise registry_error(e) from None
        return {"id": name, "deleted": True}

    @router.post("/adapters/merge", dependencies=change)
    async def merge(body: MergeRequest) -> dict[str, Any]:
        """Queue `nomoat merge`: the new adapter goes into the registry as `name`."""
        name = _checked(body.name)
        if name in registry or any(j.output == name and j.status in ACTIVE for j in queue.list()):
            raise APIError(409, f"An adapter named {name!r} exists; choose another name.", "name", "name_taken")
        if body.weights is not None and len(body.weights) != len(body.adapters):
            raise APIError(400, "Give one weight per adapter.", "weights", "invalid_value")
        for n in body.adapters:
            if _checked(n) not in registry:
                raise APIError(404, f"No adapter named {n!r} in the registry.", "adapters", "model_not_found")
        specs = [f"{n}:{w}" for n, w in zip(body.adapters, body.weights)] if body.weights else list(body.adapters)
        argv = ["merge", *specs, "--method", body.method, "--name", name]
        if body.density is not None:
            argv += ["--density", str(body.density)]
        job = Job(id=new_id(), kind="merge", title=f"merge {' + '.join(body.adapters)} into {name}", argv=argv,
                  output=name, options=body.model_dump(exclude_none=True))  # fmt: skip
        return queue.submit(job).to_dict()

    @router.post("/adapters/{name}/eval", dependencies=change)
    async def evaluate(name: str, body: EvalRequest) -> dict[str, Any]:
        """Queue `nomoat eval`: the base and the adapter side by side on a dataset (its JSON at /jobs/ID/result)."""
        name = _checked(name)
        if name not in registry:
            raise APIError(404, f"No adapter named {name!r} in the registry.", "name", "model_not_found")
        data = files.resolve(settings, body.root, body.path)
        job_id = new_id()
        out = settings.jobs / f"{job_id}.eval.json"
        argv = ["eval", settings.models.get(body.model, body.model), "--adapter", name, "--data", str(data),
                "--json", str(out), "--limit", str(body.limit), "--max-tokens", str(body.max_tokens),
                "--no-progress"]  # fmt: skip
        job = Job(id=job_id, kind="eval", title=f"evaluate {name} on {body.path}", argv=argv, output=str(out),
                  options=body.model_dump())  # fmt: skip
        return queue.submit(job).to_dict()

    @router.post("/adapters/{name}/export", dependencies=change)
    async def export(name: str, body: ExportRequest) -> dict[str, Any]:
        """Queue `nomoat export`: the base with the adapter merged (HF folder or GGUF), or the adapter as GGUF."""
        name = _checked(name)
        if name not in registry:
            raise APIError(404, f"No adapter named {name!r} in the registry.", "name", "model_not_found")
        job_id = new_id()
        out = settings.exports / (f"{name}-{job_id}" + ("" if body.format == "hf" else ".gguf"))
        argv = ["export", body.model, "--adapter", name, "--format", body.format, "--out", str(out)]
        job = Job(id=job_id, kind="export", title=f"export {name} as {body.format}", argv=argv, output=str(out),
                  options=body.model_dump())  # fmt: skip
        return queue.submit(job).to_dict()
