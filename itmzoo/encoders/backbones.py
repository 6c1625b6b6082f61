"""Architectures of the pretrained backbones the methods use, described offline.

`build(name)` must never need the network, so the architecture of each backbone is written down here
(the values of the hub configs), and pretrained weights are loaded only when a config names a local
folder (or a hub id already in the local cache). Tests build the same classes from tiny overrides.
Loading is strict: every missing or unexpected key is named (`load_pretrained_weights`), and weight
files are read as data only (`read_state_file`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["ARCHITECTURES", "TASK_HEADS", "BackboneError", "LoadReport", "hf_config", "load_pretrained_weights",
           "read_state_file"]

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
        "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    },
    "roberta-base": {
        "model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
        "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "bos_token_id": 0, "eos_token_id": 2,
    },
    "vit-base-patch16-224": {
        "model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "image_size": 224, "patch_size": 16,
        "num_channels": 3, "layer_norm_eps": 1e-12, "qkv_bias": True,
    },
    "clip-vit-base-patch16": {
        "model_type": "clip", "projection_dim": 512, "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                        "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    },
}


class BackboneError(RuntimeError):
    """A backbone cannot be built or its pretrained weights cannot be reached."""


def hf_config(name: str, overrides: Mapping[str, Any] | None = None):
    """A transformers config for backbone `name` (a key of ARCHITECTURES), with `overrides` applied."""
    from transformers import BertConfig, CLIPConfig, RobertaConfig, ViTConfig

    if name not in ARCHITECTURES:
        raise BackboneError(f"unknown backbone architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    spec = dict(ARCHITECTURES[name])
    for k, v in (overrides or {}).items():
        if isinstance(v, Mapping) and isinstance(spec.get(k), Mapping):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    kind = spec.pop("model_type")
    cls = {"bert": BertConfig, "roberta": RobertaConfig, "vit": ViTConfig, "clip": CLIPConfig}[kind]
    return cls(**spec)


#: pretraining heads of the BERT / RoBERTa hub checkpoints, which AutoModel drops by design
TASK_HEADS = ("cls.*", "lm_head.*")


@dataclasses.dataclass
class LoadReport:
    """What a strict pretrained load left out, by name: dropped heads and keys the file did not have."""

    source: str
    unexpected_dropped: list[str]
    missing_initialised: list[str]


def _match_any(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_pretrained_weights(model, source: str, *, allow_missing: Sequence[str] = (),
                            allow_unexpected: Sequence[str] = TASK_HEADS) -> LoadReport:
    """Fill an HF `model` in place from a local folder (or a hub id already in the local cache), strictly.

    transformers reads the folder (safetensors preferred, its own key renames applied, e.g. the
    transformers-4 ViT names), then every parameter of `model` must come from the file with the same
    shape. Keys of the file that the model lacks are an error unless they match `allow_unexpected`
    (default: the pretraining heads ``cls.*`` / ``lm_head.*``); keys the file lacks are an error unless
    they match `allow_missing` (e.g. ``pooler.*`` for roberta-base, whose hub file has no pooler: those
    keep transformers' initialisation, normal std 0.02, as upstream). Returns what was left out.
    """
    from transformers import AutoModel

    from ..checkpoints.safe import CheckpointError, load_state_strict

    local = Path(source).expanduser()
    if not local.exists() and (local.is_absolute() or source.startswith((".", "~")) or "\\" in source
                                or source.count("/") > 1):
        raise BackboneError(f"pretrained weights not found: {source} (no such folder)")
    kwargs = {"local_files_only": True} if local.exists() else {}
    try:
        pretrained, info = AutoModel.from_pretrained(str(local) if local.exists() else source,
                                                     output_loading_info=True, **kwargs)
    except OSError as e:
        raise BackboneError(
            f"cannot load pretrained weights from {source!r}: not a local folder and the hub is unreachable "
            f"or the id is unknown ({e.__class__.__name__}). Download the model once and pass its folder."
        ) from e
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    unexpected = sorted(info.get("unexpected_keys", ()))
    bad_missing = [k for k in missing if not _match_any(k, allow_missing)]
    bad_unexpected = [k for k in unexpected if not _match_any(k, allow_unexpected)]
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if bad_missing or bad_unexpected or mismatched or info.get("error_msgs"):
        raise BackboneError(f"{source!r} does not fit {type(pretrained).__name__}: missing {bad_missing}, "
                            f"unexpected {bad_unexpected}, shape mismatches {mismatched} "
                            f"{info.get('error_msgs') or ''}".rstrip())
    try:
        load_state_strict(model, pretrained.state_dict(), ignorable=("*position_ids",), source=repr(source),
                          hint="the folder holds a different architecture than the configured one")
    except CheckpointError as e:
        raise BackboneError(str(e)) from None
    return LoadReport(str(source), unexpected, missing)


def read_state_file(source: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file or folder, read as data only (nothing in the file is executed).

    * a folder: ``model.safetensors`` (or its sharded index), ``open_clip_model.safetensors``, then
      ``pytorch_model.bin`` / ``open_clip_pytorch_model.bin``;
    * ``*.safetensors``: safetensors;
    * a TorchScript archive (OpenAI's ``ViT-B-16.pt``): `itmzoo.checkpoints.torchscript`;
    * any other file: ``torch.load(weights_only=True)``; a ``state_dict`` / ``model`` entry is unwrapped.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..checkpoints.safe import CheckpointError, read_pickled_checkpoint
    from ..checkpoints.torchscript import is_torchscript_archive, read_torchscript_state

    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "open_clip_model.safetensors",
                     "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise BackboneError(f"{source}: no weights file in the folder (looked for model.safetensors, "
                                "open_clip_model.safetensors, pytorch_model.bin, open_clip_pytorch_model.bin)")
    if not path.is_file():
        raise BackboneError(f"pretrained weights not found: {source}")
    try:
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(path.parent / shard)).items()}
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if is_torchscript_archive(path):
            return read_torchscript_state(path)
        obj = read_pickled_checkpoint(path, allowed_globals=())
    except CheckpointError as e:
        raise BackboneError(str(e)) from None
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # a corrupt or foreign file
        raise BackboneError(f"{source}: cannot read weights ({e.__class__.__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{source}: not a state dict of tensors")
    return dict(obj)
