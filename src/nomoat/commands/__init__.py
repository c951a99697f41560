"""Subcommands of `nomoat` that live in their own modules; `nomoat.cli` registers them."""
