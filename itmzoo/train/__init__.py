"""Training: the engine (`fit`, `Trainer`) and run files (`run_training`), imported on first use.

The distributed helpers that models use (`gather_features`) live in `itmzoo.distributed`, below the
models, so a model never imports this package.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EvalConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "fit",
    "run_training",
]

_LAZY = {
    "EvalConfig": "config", "TrainConfig": "config",
    "NonFiniteLossError": "engine", "TrainResult": "engine", "Trainer": "engine", "fit": "engine",
    "run_training": "run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'itmzoo.train' has no attribute {name!r}")
