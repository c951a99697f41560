"""Training: one loop (`loop.py`) and its recipes (`sft.py`, `pretrain.py`, `preference.py`: DPO and its family).

The loop owns precision, accumulation, the schedule, checkpoints and exact resume, metrics and signals; a recipe
supplies its model, data and loss. The package itself is callable, so that `nomoat.train(...)` (the Python form of
`nomoat train`) and `import nomoat.train` name the same thing: `nomoat.train(model, data=..., max_steps=...)` runs
`nomoat.train.sft.train`. The recipes are imported on first use, so `nomoat.train.loss` and friends stay light.
"""

import importlib
import sys
import types
from typing import Any

_LAZY = {"SFTRecipe": "nomoat.train.sft", "TrainResult": "nomoat.train.sft", "train": "nomoat.train.sft",
         "TrainingDivergedError": "nomoat.train.loop", "PreferenceRecipe": "nomoat.train.preference"}  # fmt: skip


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run `nomoat.train.sft.train` (see its docstring)."""
        return importlib.import_module("nomoat.train.sft").train(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nomoat.train' has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableModule

__all__ = sorted(_LAZY)
