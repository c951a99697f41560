"""Training: the LoRA fine-tuning recipe, its loss, optimizer, schedule, checkpoints and metrics.

The package itself is callable, so that `nomoat.train(...)` (the Python form of `nomoat train`) and
`import nomoat.train` name the same thing: `nomoat.train(model, data=..., max_steps=...)` runs
`nomoat.train.recipe.train`. The recipe is imported on first use, so `nomoat.train.loss` and friends stay light.
"""

import importlib
import sys
import types
from typing import Any

_LAZY = {"SFTRecipe", "TrainResult", "TrainingDivergedError", "train"}


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run `nomoat.train.recipe.train` (see its docstring)."""
        return importlib.import_module("nomoat.train.recipe").train(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("nomoat.train.recipe"), name)
    raise AttributeError(f"module 'nomoat.train' has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableModule

__all__ = sorted(_LAZY)
