"""`nomoat merge`: combine adapters into a new adapter (linear, svd, cat, ties, dare)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the `nomoat` app."""
