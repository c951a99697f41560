"""Typed, serializable configuration dataclasses for every stage of nomoat."""

from nomoat.config.lora import LoRAConfig
from nomoat.config.model import ModelConfig

__all__ = ["LoRAConfig", "ModelConfig"]
