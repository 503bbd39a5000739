"""Stage two: models and training loops over the cached LLM layers (never the LLM itself)."""

from train.config import TrainConfig
from train.data import Batch, Examples, Split, leave_one_out
from train.loop import RunResult, RunStateError, fit, resolve
from train.methods import METHODS, ItemInputs, get_method

__all__ = ["METHODS", "Batch", "Examples", "ItemInputs", "RunResult", "RunStateError", "Split", "TrainConfig", "fit",
           "get_method", "leave_one_out", "resolve"]
