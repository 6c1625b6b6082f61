"""Top-level functions: build, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoints.safe import CheckpointError, load_state_strict, read_pickled_checkpoint
from .config import apply_overrides
from .registry import get_entry, instantiate, resolve_config

LOCAL_DIR = "local-dir:"


def build(name: str, checkpoint: str | Path | None = None, device: str | torch.device | None = None,
          **overrides: Any) -> torch.nn.Module:
    """Build a registered model.

    * ``build("esa_bigru", embed_size=512)``: random weights (pretrained backbones only when the config
      names them), overrides validated against the typed config;
    * ``build("lhsc", checkpoint="model_best.pth.tar")``: an authors' released file, converted by the
      method's converter and loaded strictly;
    * ``build("local-dir:runs/x/best")`` or ``checkpoint=<native dir>``: a native checkpoint.
    """
    if isinstance(name, str) and name.startswith(LOCAL_DIR):
        from .checkpoints.native import load_pretrained

        if checkpoint is not None:
            raise ValueError("give either 'local-dir:PATH' or checkpoint=, not both")
        return load_pretrained(name[len(LOCAL_DIR):], device=device, **overrides)
    entry, cfg = resolve_config(name, overrides)
    if checkpoint is not None and Path(checkpoint).is_dir():
        from .checkpoints.native import load_pretrained, read_native_config

        meta = read_native_config(checkpoint)
        if get_entry(meta["model"]).name != entry.name:
            raise CheckpointError(f"{checkpoint} holds a '{meta['model']}' model, not '{entry.name}'")
        return load_pretrained(checkpoint, device=device, **overrides)
    if checkpoint is not None:
        if entry.converter is None:
            raise CheckpointError(f"model '{entry.name}' has no converter for official checkpoints")
        obj = read_pickled_checkpoint(checkpoint)
        inferred, state, ignorable = entry.converter(obj)
        for key, value in inferred.items():
            if key in overrides and overrides[key] is not None and overrides[key] != value:
                raise CheckpointError(
                    f"{checkpoint}: the file implies {key}={value!r} but you asked for {overrides[key]!r}"
                )
        cfg = apply_overrides(cfg, inferred)
        model = instantiate(entry.name, cfg)
        load_state_strict(model, state, ignorable=ignorable, source=str(checkpoint))
        model.eval()
    else:
        model = instantiate(entry.name, cfg)
        model.init_pretrained()
    if device is not None:
        model.to(device)
    return model


def load(directory: str | Path, device: str | torch.device | None = None, **overrides: Any) -> torch.nn.Module:
    """Load a native checkpoint directory written by ``model.save_pretrained``."""
    from .checkpoints.native import load_pretrained

    return load_pretrained(directory, device=device, **overrides)
