"""Typed, serializable configuration dataclasses: plain data with validation, no class objects, no executed code.

`ModelConfig` (one decoder architecture), `LoRAConfig` (one adapter) and, in `nomoat.config.train`, `TrainConfig`
with its YAML reader `load_train_config`. With `util`, this is the bottom layer: it imports no other nomoat package.
"""

from nomoat.config.lora import LoRAConfig
from nomoat.config.model import ModelConfig

__all__ = ["LoRAConfig", "ModelConfig"]
