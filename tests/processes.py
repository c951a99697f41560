"""Real processes the tests start: a `nomoat` server command on a free loopback port, and a headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("NOMOAT_CHROMIUM", "/usr/bin/chromium")  # Debian's package; no playwright download
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NomoatServer:
    """`python -m nomoat.cli COMMAND ... --host 127.0.0.1 --port PORT` (serve or studio), healthy once constructed.

    Args:
        args: The command and its arguments, without host and port.
        log: The file that receives the process's output.
        env: Extra environment variables (NOMOAT_HOME above all), over this process's own.
        timeout: Seconds to wait for `/health` to answer 200; the test fails with the log's tail past it.
    """

    def __init__(self, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
                 timeout: float = 120) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "nomoat.cli", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"nomoat {args[0]} did not become healthy (exit {self.proc.returncode}):\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's output."""
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL past `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def chromium(launch_timeout_ms: int = 60_000) -> Iterator[Any]:
    """A headless Chromium driven by playwright; skips the test (with the reason) where one cannot start here."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"playwright is not installed ({e}): pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=launch_timeout_ms)
    except Exception as e:  # a browser that cannot start here (missing libraries, no /dev/shm, ...)
        pw.stop()
        pytest.skip(f"Chromium could not start: {str(e).splitlines()[0]}")
    try:
        yield browser
    finally:
        browser.close()
        pw.stop()
