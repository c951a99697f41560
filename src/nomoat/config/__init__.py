"""Typed, serializable configuration dataclasses for every stage of nomoat."""

from nomoat.config.model import ModelConfig

__all__ = ["ModelConfig"]
