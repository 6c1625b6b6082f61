"""Native checkpoint directories: ``config.json`` + ``model.safetensors`` (no pickle anywhere).

A directory also carries what its tokenizer needs (``vocab.json``, a ``tokenizer/`` folder), written by
the model's ``save_assets``; ``config.json`` lists them under ``assets`` (config field -> file name
inside the directory) and loading points those fields at the directory's own copies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..registry import instantiate
from .atomic import atomic_dir
from .safe import CheckpointError, load_state_strict

FORMAT = "itmzoo-native/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _contiguous_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        # safetensors refuses shared storage (tied weights): store a copy of each alias
        key = v.untyped_storage().data_ptr() if v.numel() else -1
        state[k] = v.detach().clone().contiguous() if key in seen else v.detach().contiguous()
        if key != -1:
            seen[key] = k
    return state


def save_pretrained(model: Any, directory: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a native checkpoint directory of an itmzoo model atomically and return its path."""
    if model.registry_name is None:
        raise CheckpointError(
            "save_pretrained needs a model made by itmzoo.build() (it records the registry name); "
            f"got a {type(model).__name__} without one"
        )
    meta = {
        "format": FORMAT,
        "model": model.registry_name,
        "itmzoo_version": __version__,
        "config": model.config.to_dict(),
    }
    if extra:
        from ..jsonfmt import round_floats

        meta["extra"] = round_floats(dict(extra))  # metrics; the config keeps its exact values
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        assets = model.save_assets(tmp)  # vocabulary / tokenizer files: the directory stands alone
        if assets:
            meta["config"] = {**meta["config"], **assets}
            meta["assets"] = dict(assets)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        save_file(_contiguous_state(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def read_native_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file, not a native checkpoint directory; an authors' checkpoint file "
                              "is read with itmzoo.build(NAME, checkpoint=FILE) (CLI: --model NAME --checkpoint FILE, "
                              "or itmzoo convert NAME FILE DIR once)")
    if not directory.is_dir():
        raise CheckpointError(f"native checkpoint directory not found: {directory}")
    if not cfg_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not an itmzoo checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} inside"
        )
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT or "model" not in meta or "config" not in meta:
        raise CheckpointError(f"{cfg_path}: not an {FORMAT} config (keys: {sorted(meta)})")
    return meta


def load_pretrained(directory: str | Path, device: str | torch.device | None = None,
                    **overrides: Any) -> torch.nn.Module:
    """Build the model a native directory describes and load its weights strictly."""
    meta = read_native_config(directory)
    # asset fields hold names inside the directory; resolved here so the directory can live anywhere
    assets = {k: str(Path(directory).resolve() / rel) for k, rel in meta.get("assets", {}).items()}
    cfg = {**meta["config"], **assets, **{k: v for k, v in overrides.items() if v is not None}}
    model = instantiate(meta["model"], cfg)
    weights = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except Exception as e:  # SafetensorError and OSError carry no path; say which file and what was expected
        raise CheckpointError(f"{weights}: not a readable safetensors file ({' '.join(str(e).split())[:200]}); "
                              "the file is truncated or was not written by save_pretrained") from None
    load_state_strict(model, state, source=str(directory))
    if device is not None:
        model.to(device)
    return model.eval()
