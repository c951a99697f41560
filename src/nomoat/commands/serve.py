"""`nomoat serve`: the OpenAI-compatible server."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the `nomoat` app."""
