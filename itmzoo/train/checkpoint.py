"""Training checkpoints: model (safetensors) + optimiser, scaler, schedule, RNG and loop position.

``DIR/last/`` holds ``config.json`` + ``model.safetensors`` (so ``itmzoo.load(DIR/last)`` works) and
``trainer_state.pt``, a tensors-and-primitives dict read back with ``torch.load(weights_only=True)``.
The directory is replaced atomically (`itmzoo.checkpoints.atomic.atomic_dir`): a run killed at any
moment leaves the previous complete checkpoint, either as ``last/`` or, if it died between the two
renames, as ``.last.old/``, which `find_checkpoint` also accepts.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoints.atomic import atomic_dir
from ..checkpoints.native import WEIGHTS_FILE, save_pretrained
from ..checkpoints.safe import CheckpointError, load_state_strict

__all__ = ["STATE_FILE", "capture_rng", "find_checkpoint", "load_checkpoint", "restore_rng", "save_checkpoint"]

STATE_FILE = "trainer_state.pt"


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and (this device's) CUDA generator states, in a weights_only-safe form."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(directory: str | Path, model: torch.nn.Module, state: dict[str, Any]) -> Path:
    """Write model weights + config and the trainer state into `directory`, atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        # save_pretrained is itself atomic; write it into a scratch subfolder and lift its files up
        save_pretrained(model, tmp / "_model")
        for f in list((tmp / "_model").iterdir()):  # config, weights and the tokenizer's files
            os.replace(f, tmp / f.name)
        shutil.rmtree(tmp / "_model")
        torch.save(state, tmp / STATE_FILE)
    return directory


def find_checkpoint(out_dir: str | Path, name: str = "last") -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    out_dir = Path(out_dir)
    for cand in (out_dir / name, out_dir / f".{name}.old"):
        if (cand / STATE_FILE).is_file() and (cand / WEIGHTS_FILE).is_file():
            return cand
    return None


def load_checkpoint(directory: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the weights into `model` strictly and return the trainer state (tensors on CPU)."""
    directory = Path(directory)
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise CheckpointError(f"cannot read {directory / STATE_FILE}: {e}") from e
    load_state_strict(model, load_file(str(directory / WEIGHTS_FILE)), source=str(directory))
    return state
