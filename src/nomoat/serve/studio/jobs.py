"""The studio's job queue: training, merge and export runs, one at a time, each a `python -m nomoat ...` process.

A job is a command line of nomoat's own CLI run in a child process (so a crash, an out-of-memory kill or a hung
job never takes the server down), its output going to a log file. `JobQueue` runs queued jobs in order in one
worker thread, keeps each job's record as JSON under the studio folder (so the list survives a restart), stops a
job with SIGINT (the training loop then writes a checkpoint and exits, so `resume` continues it with `--resume`),
and after a training job succeeds imports its adapter into the registry under the job's adapter name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nomoat.lora.registry import Registry
from nomoat.util.files import atomic_write_json, read_json

ACTIVE = ("queued", "running", "stopping")
STOP_GRACE_S = 60.0  # after SIGINT, how long a job may take to checkpoint before it is killed


@dataclass
class Job:
    """One job and its state.

    Attributes:
        id: Short unique id.
        kind: train, merge or export.
        title: What the job does, for people.
        argv: The arguments after `python -m nomoat`.
        status: queued, running, stopping, done, failed, stopped or cancelled.
        created: Unix time it was queued.
        started: When its (latest) process started.
        ended: When its (latest) process ended.
        returncode: The process's exit status.
        run_dir: A training job's run folder (metrics.jsonl, checkpoints, the adapter).
        adapter: The registry name a training job's adapter is imported as.
        max_steps: A training job's step count, when fixed (for the ETA).
        epochs: A training job's epochs when the steps are not fixed.
        output: What the job produced (a registry name or a file), once done.
        error: Why it failed.
        options: The options it was started with (shown on the page).
    """

    id: str
    kind: str
    title: str
    argv: list[str]
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    run_dir: str | None = None
    adapter: str | None = None
    max_steps: int | None = None
    epochs: float | None = None
    output: str | None = None
    error: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


def new_id() -> str:
    """A short random job id."""
    return uuid.uuid4().hex[:10]


class JobQueue:
    """Runs jobs one at a time in child processes.

    Args:
        folder: Where job records and logs live.
        python: The interpreter (`python -m nomoat ...`).
        registry: Where finished training jobs' adapters are imported.
    """

    def __init__(self, folder: Path, python: str, registry: Registry) -> None:
        self.folder = folder
        self.python = python
        self.registry = registry
        self.lock = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.proc: subprocess.Popen | None = None
        self.current: Job | None = None
        self._worker: threading.Thread | None = None
        self._closing = False
        self._load()

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.json")):
            with contextlib.suppress(Exception):  # a damaged record is skipped, never fatal
                job = Job(**read_json(path))
                if job.status in ACTIVE:  # the server stopped while it was queued or running
                    job.status, job.error = "stopped", job.error or "the server stopped before the job ended"
                self.jobs[job.id] = job

    def log_path(self, job: Job) -> Path:
        """The job's log file."""
        return self.folder / f"{job.id}.log"

    def _save(self, job: Job) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / f"{job.id}.json", job.to_dict())

    def list(self) -> list[Job]:
        """Every job, newest first."""
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    def get(self, job_id: str) -> Job | None:
        """A job by id."""
        with self.lock:
            return self.jobs.get(job_id)

    def submit(self, job: Job) -> Job:
        """Queue a job; the worker starts it when the jobs before it have ended."""
        with self.lock:
            job.status = "queued"
            self.jobs[job.id] = job
            self._save(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="nomoat-studio-jobs", daemon=True)
                self._worker.start()
            self.lock.notify_all()
        return job

    def stop(self, job_id: str) -> Job | None:
        """Stop a job: a queued one is cancelled, a running one gets SIGINT (it checkpoints and exits)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                job.status, job.ended = "cancelled", time.time()
                self._save(job)
            elif job.status == "running" and self.current is job and self.proc is not None:
                job.status = "stopping"
                self._save(job)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGINT)
            return job

    def resume(self, job_id: str) -> Job | None:
        """Queue a stopped or failed training job again, continuing from its last checkpoint."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.kind != "train" or job.status not in ("stopped", "failed", "cancelled"):
                return job
            checkpoints = Path(job.run_dir or "").glob("checkpoint*")
            if job.run_dir and any(checkpoints) and "--resume" not in job.argv:
                job.argv = [*job.argv, "--resume"]
            job.error = None
        return self.submit(job)

    def close(self) -> None:
        """Stop the running job (the server is shutting down)."""
        with self.lock:
            proc, self._closing = self.proc, True
            self.lock.notify_all()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ---- the worker ---------------------------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self.lock:
            while True:
                if self._closing:
                    return None
                queued = [j for j in self.jobs.values() if j.status == "queued"]
                if queued:
                    job = min(queued, key=lambda j: j.created)
                    job.status, job.started, job.ended, job.returncode = "running", time.time(), None, None
                    self.current = job
                    self._save(job)
                    return job
                self.lock.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - a job's failure is recorded, never raised into the server
                self._finish(job, -1, f"{type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        log = self.log_path(job)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb",
               "NOMOAT_HOME": str(self.registry.home)}  # fmt: skip
        with open(log, "ab") as out:
            out.write(f"$ nomoat {' '.join(job.argv)}\n".encode())
            out.flush()
            # A session of its own: Ctrl-C in the server's terminal does not reach the job; `stop` signals it.
            proc = subprocess.Popen([self.python, "-m", "nomoat", *job.argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
            with self.lock:
                self.proc = proc
            rc = self._wait(job, proc)
        self._finish(job, rc, None)

    def _wait(self, job: Job, proc: subprocess.Popen) -> int:
        stopping_since = None
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if job.status == "stopping":
                stopping_since = stopping_since or time.monotonic()
                if time.monotonic() - stopping_since > STOP_GRACE_S:
                    proc.kill()

    def _finish(self, job: Job, rc: int, error: str | None) -> None:
        if rc == 0 and job.kind == "train" and job.adapter and job.run_dir:
            try:
                dest = self.registry.import_adapter(Path(job.run_dir) / "adapter", name=job.adapter)
                job.output = dest.name
            except Exception as e:  # noqa: BLE001 - e.g. the name was taken meanwhile
                rc, error = rc or 1, f"training finished but the adapter could not be registered: {e}"
        with self.lock:
            job.returncode, job.ended = rc, time.time()
            if rc == 0:
                job.status = "done"
            elif job.status == "stopping":
                job.status = "stopped"
            else:
                job.status, job.error = "failed", error or self._last_error(job)
            self.proc, self.current = None, None
            self._save(job)
            self.lock.notify_all()

    def _last_error(self, job: Job) -> str:
        """The last `error:` line of the job's log (what nomoat's CLI prints), or the last line."""
        try:
            lines = [ln.strip() for ln in self.log_path(job).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"exit status {job.returncode}"
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or [f"exit status {job.returncode}"])[-1][:500]


def tail_json_lines(path: Path, seen: int) -> tuple[list[dict[str, Any]], int, bool]:
    """The records of a JSONL file after the first `seen`, the new count, and whether the file was rewritten shorter.

    A resumed run rewrites `metrics.jsonl` without the steps after its checkpoint: then everything is returned again
    and `reset` is True.
    """
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return [], seen, False
    reset = len(lines) < seen
    start = 0 if reset else seen
    out = []
    for line in lines[start:]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written: read it next time
            break
    return out, start + len(out), reset
