"""Architectures of the pretrained backbones the methods use, described offline.

`build(name)` must never need the network, so the architecture of each backbone is written down here
(the values of the hub configs), and pretrained weights are loaded only when a config names a hub id
or a local folder. Tests build the same classes from tiny overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["ARCHITECTURES", "BackboneError", "hf_config", "load_pretrained_weights"]

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


def load_pretrained_weights(model, source: str) -> None:
    """Fill an HF `model` in place from a hub id or local folder; a clear error when unreachable."""
    from transformers import AutoModel

    local = Path(source).expanduser()
    kwargs = {"local_files_only": True} if local.exists() else {}
    try:
        pretrained = AutoModel.from_pretrained(str(local) if local.exists() else source, **kwargs)
    except OSError as e:
        raise BackboneError(
            f"cannot load pretrained weights from {source!r}: not a local folder and the hub is unreachable "
            f"or the id is unknown ({e.__class__.__name__}). Download the model once and pass its folder."
        ) from e
    missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("position_ids")]
    if real_missing:
        raise BackboneError(f"{source!r} does not fit the configured architecture; missing {real_missing[:8]}")
