"""The dataset file `nomoat synth` writes, its provenance record, and resuming from both.

`SynthOutput` keeps the records of a run in memory and rewrites the JSONL file atomically (at most every
`flush_every` seconds, and at the end), so the file on disk is always whole and valid, whatever stops the run. Each
record carries an `id`; a rerun reads the file back and skips the work whose id is already there. The provenance
record beside it (`FILE.provenance.json`) says who made the data and how: the teacher, the input file and its hash,
the seed, the settings, and the counts of what was written, filtered and failed, with the failures' errors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.util.errors import DataError, UsageError
from nomoat.util.files import atomic_write_json, atomic_write_text, read_json

# Settings that change what a record is: a rerun with other values would mix two datasets in one file.
IDENTITY = ("mode", "teacher", "seed", "temperature", "max_tokens", "samples", "reward", "judge")


def provenance_path(out: str | Path) -> Path:
    """`pairs.jsonl` -> `pairs.jsonl.provenance.json`."""
    out = Path(out)
    return out.with_name(out.name + ".provenance.json")


@dataclass
class Tally:
    """What became of the work of a run: written, filtered (by reason) and failed (with the errors)."""

    written: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def filter(self, reason: str, n: int = 1) -> None:
        """Count `n` items dropped for `reason`."""
        self.filtered[reason] = self.filtered.get(reason, 0) + n

    def fail(self, what: str, error: str, attempts: int) -> None:
        """Record a request that got no answer."""
        self.failures.append({"item": what, "error": error, "attempts": attempts})

    def to_dict(self) -> dict[str, Any]:
        """The counts for the provenance record (at most 50 failures listed in full)."""
        return {"written": self.written, "filtered": dict(sorted(self.filtered.items())),
                "failed": len(self.failures), "failures": self.failures[:50]}  # fmt: skip


class SynthOutput:
    """The records of one output file: those from earlier runs, and the new ones, written atomically.

    Args:
        path: The JSONL file.
        settings: The run's settings for provenance; the `IDENTITY` ones must match an earlier run's.
        flush_every: Seconds between rewrites of the file while records arrive.

    Raises:
        UsageError: The file was written with other settings (a different mode, teacher, seed...).
        DataError: The file is not JSON lines of records with an `id`.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], flush_every: float = 2.0) -> None:
        self.path = Path(path)
        self.settings = settings
        self.flush_every = flush_every
        self.records: list[dict[str, Any]] = self._read() if self.path.exists() else []
        self.resumed = len(self.records)
        self.ids = {r["id"] for r in self.records}
        self._check_settings()
        self._flushed = time.monotonic()
        self._dirty = False

    def _read(self) -> list[dict[str, Any]]:
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{self.path}:{n}: not a JSON record ({e})",
                                hint="give a new --out, or delete the file to start over") from None  # fmt: skip
            if not isinstance(record, dict) or "id" not in record:
                raise DataError(f"{self.path}:{n}: a record without an id: this file was not written by nomoat synth",
                                hint="give a new --out, or delete the file to start over")  # fmt: skip
            out.append(record)
        return out

    def _check_settings(self) -> None:
        if not self.records:
            return
        before = read_json(provenance_path(self.path), missing_ok=True, error=DataError).get("settings", {})
        changed = [f"{k}: {before.get(k)!r} -> {self.settings.get(k)!r}" for k in IDENTITY
                   if k in before and before.get(k) != self.settings.get(k)]  # fmt: skip
        if changed:
            raise UsageError(f"{self.path} holds {len(self.records)} records made with other settings "
                             f"({'; '.join(changed)})", hint="rerun with the same settings to resume, or give a new "
                             "--out")  # fmt: skip

    def add(self, record: dict[str, Any]) -> None:
        """Keep a new record (with its `id`) and rewrite the file when `flush_every` seconds have passed."""
        self.records.append(record)
        self.ids.add(record["id"])
        self._dirty = True
        if time.monotonic() - self._flushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Rewrite the file atomically with every record (a no-op when nothing was added)."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        self._flushed, self._dirty = time.monotonic(), False

    def finish(self, tally: Tally, status: str, extra: dict[str, Any] | None = None) -> Path:
        """Flush the records and write the provenance record; returns its path.

        Args:
            tally: What this run did.
            status: `complete`, `incomplete` (failures or too few records) or `stopped` (interrupted, fatal error).
            extra: More fields (the input file and its hash, the teacher).
        """
        self.flush()
        record = {"file": str(self.path), "records": len(self.records), "status": status,
                  "settings": self.settings, **(extra or {}), "resumed_from": self.resumed,
                  "last_run": tally.to_dict(),
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        path = provenance_path(self.path)
        atomic_write_json(path, record)
        return path


__all__ = ["IDENTITY", "SynthOutput", "Tally", "provenance_path"]
