"""The SFT recipe's names where callers have long imported them; the recipe itself lives in `nomoat.train.sft`."""

from nomoat.config.train import TrainConfig
from nomoat.train.loop import TrainingDivergedError
from nomoat.train.sft import SFTRecipe, TrainResult, model_content_hash, train

__all__ = ["SFTRecipe", "TrainConfig", "TrainResult", "TrainingDivergedError", "model_content_hash", "train"]
