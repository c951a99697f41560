"""`nomoat eval`: perplexity, task accuracy and multiple choice, base and adapters side by side."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the `nomoat` app."""
