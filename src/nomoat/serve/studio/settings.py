"""`StudioSettings`: where the web studio keeps its files, which folders it may read, and its limits."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _nomoat_home() -> Path:
    return Path(os.environ.get("NOMOAT_HOME") or "~/.nomoat").expanduser()


@dataclass
class StudioSettings:
    """The studio's knobs.

    Attributes:
        home: The studio's own folder: uploads, job logs, training runs, exports (default `$NOMOAT_HOME/studio`).
        data_dirs: Folders whose dataset files the studio may read (`--data-dir`); nothing else is readable.
        models: Base models offered on the train page, name -> folder (the served model first).
        max_upload_bytes: Largest dataset upload.
        python: The interpreter that runs jobs (`python -m nomoat ...`).
    """

    home: Path | None = None
    data_dirs: list[Path] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    max_upload_bytes: int = 2 * 2**20
    python: str = sys.executable

    @property
    def root(self) -> Path:
        """The studio folder (created on first use)."""
        return Path(self.home).expanduser() if self.home else _nomoat_home() / "studio"

    @property
    def uploads(self) -> Path:
        """Where uploaded datasets go."""
        return self.root / "uploads"

    @property
    def runs(self) -> Path:
        """The `--output-dir` of training jobs."""
        return self.root / "runs"

    @property
    def jobs(self) -> Path:
        """Job records and logs."""
        return self.root / "jobs"

    @property
    def exports(self) -> Path:
        """Where exported models and GGUF files go."""
        return self.root / "exports"
