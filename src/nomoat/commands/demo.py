"""`nomoat demo`: the whole path on the embedded tiny model."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the `nomoat` app."""
