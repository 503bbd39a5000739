"""Stage two: models and training loops over the cached LLM layers (never the LLM itself).

Names are imported lazily so that reading ``train.config`` (e.g. for CLI defaults) does not import torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrainConfig": "train.config",
    "Batch": "train.data", "Examples": "train.data", "Split": "train.data", "leave_one_out": "train.data",
    "RunResult": "train.loop", "RunStateError": "train.loop", "fit": "train.loop", "resolve": "train.loop",
    "METHODS": "train.methods", "ItemInputs": "train.methods", "get_method": "train.methods",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
