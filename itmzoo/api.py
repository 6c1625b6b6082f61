"""Top-level functions: build, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoints.safe import (
    DEFAULT_ALLOWED_GLOBALS,
    CheckpointError,
    load_state_strict,
    read_pickled_checkpoint,
)
from .config import apply_overrides
from .registry import get_entry, resolve_config

LOCAL_DIR = "local-dir:"


def _instantiate(name: str, config: Any) -> torch.nn.Module:
    """Build registered model `name` from a config object or dict, with random weights, offline."""
    entry = get_entry(name)
    if isinstance(config, Mapping):
        config = apply_overrides(entry.config_cls(), config)
    model = entry.fn(config)
    model.registry_name = entry.name
    return model


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
        # a converter may name extra pickled classes it reads as plain attribute holders (ESL-CLIP's config)
        allowed = (*DEFAULT_ALLOWED_GLOBALS, *getattr(entry.converter, "allowed_globals", ()))
        obj = read_pickled_checkpoint(checkpoint, allowed)
        inferred, state, ignorable = entry.converter(obj)
        for key, value in inferred.items():
            if key in overrides and overrides[key] is not None and overrides[key] != value:
                raise CheckpointError(
                    f"{checkpoint}: the file implies {key}={value!r} but you asked for {overrides[key]!r}"
                )
        cfg = apply_overrides(cfg, inferred)
        model = entry.fn(cfg)
        model.registry_name = entry.name
        load_state_strict(model, state, ignorable=ignorable, source=str(checkpoint))
        model.eval()
    else:
        model = entry.fn(cfg)
        model.registry_name = entry.name
        model.init_pretrained()
    if device is not None:
        model.to(device)
    return model


def load(directory: str | Path, device: str | torch.device | None = None, **overrides: Any) -> torch.nn.Module:
    """Load a native checkpoint directory written by ``model.save_pretrained``."""
    from .checkpoints.native import load_pretrained

    return load_pretrained(directory, device=device, **overrides)
