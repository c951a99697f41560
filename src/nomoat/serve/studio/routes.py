"""The studio's HTTP API under `/v1/studio`: datasets, the data preview, training jobs with live metrics, adapters.

Every route sits under `/v1`, so the server's API key guards it; every route that changes something also checks the
request's origin (`guard.check_origin`). Jobs are `nomoat` CLI runs in child processes (`jobs.JobQueue`); their
metrics and log stream to the page as server-sent events read from the run's `metrics.jsonl` and the job's log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from nomoat.config.lora import LoRAConfig
from nomoat.config.train import TrainConfig
from nomoat.lora.registry import Registry, validate_name
from nomoat.serve import openapi
from nomoat.serve.errors import APIError
from nomoat.serve.studio import files
from nomoat.serve.studio.adapter_routes import add_adapter_routes
from nomoat.serve.studio.guard import check_origin
from nomoat.serve.studio.jobs import ACTIVE, Job, JobQueue, new_id, tail_json_lines
from nomoat.serve.studio.settings import StudioSettings

POLL_S = 0.5
LOG_TAIL_BYTES = 64 * 1024
METHODS = ("sft", "dpo", "ipo", "simpo", "orpo")


class DataRef(BaseModel):
    """A dataset file: a root (`uploads`, or the index of a `--data-dir` folder) and a path inside it."""

    root: str
    path: str


class PreviewRequest(DataRef):
    """What to preview."""

    model: str
    format: str = "auto"
    seq_len: int = Field(1024, ge=2, le=1 << 20)
    train_on: Literal["assistant", "all", "last"] = "assistant"
    examples: int = Field(3, ge=1, le=20)


class TrainRequest(DataRef):
    """A training job: the model, the data, the adapter's name, and the main knobs (unset: the CLI's defaults)."""

    model: str
    name: str
    method: Literal["sft", "dpo", "ipo", "simpo", "orpo"] = "sft"
    format: str = "auto"
    rank: int | None = Field(None, ge=1, le=4096)
    alpha: float | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0, le=1)
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=2)
    batch_size: int | None = Field(None, ge=1)
    grad_accum: int | None = Field(None, ge=1)
    train_on: Literal["assistant", "all", "last"] | None = None
    beta: float | None = Field(None, gt=0)
    packing: bool | None = None


def _defaults() -> dict[str, Any]:
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    lora = {f.name: f.default for f in dataclasses.fields(LoRAConfig) if f.default is not dataclasses.MISSING}
    keys = ("seq_len", "packing", "batch_size", "grad_accum", "epochs", "lr", "train_on", "method", "format")
    return {**{k: train[k] for k in keys}, "rank": lora["r"], "alpha": lora["alpha"], "beta": 0.1}


def _train_argv(body: TrainRequest, data: Path, run_name: str, runs: Path) -> list[str]:
    argv = ["train", body.model, "--data", str(data), "--name", run_name, "--output-dir", str(runs), "--no-progress",
            "--method", body.method, "--format", body.format]  # fmt: skip
    flags = {"--rank": body.rank, "--alpha": body.alpha, "--lr": body.lr, "--epochs": body.epochs,
             "--max-steps": body.max_steps, "--seq-len": body.seq_len, "--batch-size": body.batch_size,
             "--grad-accum": body.grad_accum, "--train-on": body.train_on, "--beta": body.beta}  # fmt: skip
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, str(value)]
    if body.packing is not None:
        argv.append("--packing" if body.packing else "--no-packing")
    return argv


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except ValueError as e:
        raise APIError(400, str(e), "name", "invalid_value") from None


def _job(queue: JobQueue, job_id: str) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise APIError(404, f"No job {job_id!r}.", "id", "job_not_found")
    return job


async def _events(queue: JobQueue, job: Job, request: Request) -> AsyncIterator[str]:
    """Server-sent events of a job: `metrics` (new records; `reset` after a resume), `log` text, `job` state."""
    seen, log_at, last = 0, 0, None
    log = queue.log_path(job)
    while True:
        records, seen, reset = tail_json_lines(Path(job.run_dir) / "metrics.jsonl", seen) if job.run_dir else ([], 0, 0)
        if records or reset:
            yield f"event: metrics\ndata: {json.dumps({'records': records, 'reset': reset})}\n\n"
        if log.is_file() and log.stat().st_size > log_at:
            with open(log, "rb") as f:
                f.seek(max(log_at, log.stat().st_size - LOG_TAIL_BYTES))
                text = f.read().decode(errors="replace")
                log_at = f.tell()
            yield f"event: log\ndata: {json.dumps({'text': text})}\n\n"
        state = job.to_dict()
        if state != last:
            last = state
            yield f"event: job\ndata: {json.dumps(state)}\n\n"
        if job.status not in ACTIVE:
            yield "event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)


_SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event: `event` is metrics, log, state or end; `data` is JSON.",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
    "required": ["data"],
}  # fmt: skip


def build_router(state: Any, settings: StudioSettings, queue: JobQueue, registry: Registry) -> APIRouter:
    """The `/v1/studio` routes over the server's state (its adapter manager loads adapters)."""
    router = APIRouter(prefix="/v1/studio", tags=["studio"], responses=openapi.errors(400, 403, 404, 409, 413))
    change = [Depends(check_origin)]

    @router.get("/info")
    async def info() -> dict[str, Any]:
        """What the pages need: base models, allowed folders, upload limit, the CLI's training defaults."""
        return {"models": settings.models, "data_dirs": [str(d) for d in settings.data_dirs],
                "max_upload_bytes": settings.max_upload_bytes, "defaults": _defaults(), "methods": list(METHODS),
                "served_model": getattr(state.settings, "model_name", None)}  # fmt: skip

    @router.get("/data")
    async def data_files() -> dict[str, Any]:
        """The dataset files the studio may read (uploads and files under `--data-dir` folders)."""
        return {"data": await asyncio.to_thread(files.list_files, settings)}

    @router.put("/data/uploads/{name}", dependencies=change)
    async def upload(name: str, request: Request) -> dict[str, Any]:
        """Upload a dataset file (the request body is the file), bounded in size."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes:
            raise APIError(413, f"The upload is {length} bytes; this server accepts at most "
                           f"{settings.max_upload_bytes} bytes.", None, "upload_too_large")  # fmt: skip
        return files.save_upload(settings, name, await request.body())

    @router.post("/data/preview", dependencies=change)
    async def preview(body: PreviewRequest) -> dict[str, Any]:
        """Rendered first examples (trained tokens marked) and the data summary, as `nomoat train` will see them."""
        file = files.resolve(settings, body.root, body.path)
        model = settings.models.get(body.model, body.model)
        return await asyncio.to_thread(files.preview, settings, file, model, body.model_dump())

    @router.get("/jobs")
    async def jobs() -> dict[str, Any]:
        """Every job, newest first."""
        return {"data": [j.to_dict() for j in queue.list()]}

    @router.post("/jobs/train", dependencies=change)
    async def train(body: TrainRequest) -> dict[str, Any]:
        """Queue a training job; its adapter goes into the registry as `name` when it finishes."""
        name = _name(body.name)
        if name in registry or any(j.adapter == name and j.status in ACTIVE for j in queue.list()):
            raise APIError(409, f"An adapter named {name!r} exists or is being trained; choose another name.",
                           "name", "name_taken")  # fmt: skip
        data = files.resolve(settings, body.root, body.path)
        body.model = settings.models.get(body.model, body.model)  # a name the page offers, or a folder
        job_id = new_id()
        run_name = f"{name}-{job_id}"
        job = Job(id=job_id, kind="train", title=f"train {name} on {body.path}",
                  argv=_train_argv(body, data, run_name, settings.runs), run_dir=str(settings.runs / run_name),
                  adapter=name, max_steps=body.max_steps, epochs=body.epochs or _defaults()["epochs"],
                  options=body.model_dump(exclude_none=True))  # fmt: skip
        return queue.submit(job).to_dict()

    @router.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        """One job."""
        return _job(queue, job_id).to_dict()

    @router.post("/jobs/{job_id}/stop", dependencies=change)
    async def stop(job_id: str) -> dict[str, Any]:
        """Cancel a queued job, or stop a running one (training writes a checkpoint first)."""
        _job(queue, job_id)
        return queue.stop(job_id).to_dict()  # type: ignore[union-attr]

    @router.post("/jobs/{job_id}/resume", dependencies=change)
    async def resume(job_id: str) -> dict[str, Any]:
        """Queue a stopped training job again; it continues from its last checkpoint."""
        if _job(queue, job_id).kind != "train":
            raise APIError(400, "Only training jobs can be resumed.", "id", "invalid_value")
        return queue.resume(job_id).to_dict()  # type: ignore[union-attr]

    @router.get("/jobs/{job_id}/log", response_class=PlainTextResponse)
    async def job_log(job_id: str) -> PlainTextResponse:
        """The end of the job's log."""
        path = queue.log_path(_job(queue, job_id))
        text = path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace") if path.is_file() else ""
        return PlainTextResponse(text)

    @router.get("/jobs/{job_id}/result")
    async def job_result(job_id: str) -> dict[str, Any]:
        """What a finished evaluation job measured (`nomoat eval --json`)."""
        job = _job(queue, job_id)
        if job.kind != "eval" or job.status != "done" or not job.output or not Path(job.output).is_file():
            raise APIError(404, f"Job {job_id} has no evaluation result.", "id", "no_result")
        return json.loads(Path(job.output).read_text())

    @router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses={200: {
        "description": "Server-sent events: `metrics`, `log` and `state`, then `end`.",
        "content": {"text/event-stream": {"schema": _SSE_EVENT}}}})  # fmt: skip
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: the run's metrics as they are written, the log, the job's state, then `end`."""
        stream = _events(queue, _job(queue, job_id), request)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    add_adapter_routes(router, state, settings, queue, registry, change)
    return router

