"""Hugging Face ViT (``google/vit-base-patch16-224-in21k``, SCTA's image tower), built offline.

* `build_vit(overrides, attention)`: transformers' ``ViTModel`` (pooler included, as ``from_pretrained``
  builds it) from the architecture written down in `itmzoo.encoders.backbones` (no network), random
  weights. ``attention`` picks transformers' ``"sdpa"`` or ``"eager"`` attention.
* `vit_state_for(model, state)`: renames a ViT state dict to the key layout of the installed
  transformers. transformers 5 renamed the ViT keys; checkpoints written under 4.x use the old ones:

  | transformers 4.x | transformers 5.x |
  |---|---|
  | ``encoder.layer.{i}.attention.attention.{query,key,value}`` | ``layers.{i}.attention.{q,k,v}_proj`` |
  | ``encoder.layer.{i}.attention.output.dense`` | ``layers.{i}.attention.o_proj`` |
  | ``encoder.layer.{i}.intermediate.dense`` | ``layers.{i}.mlp.fc1`` |
  | ``encoder.layer.{i}.output.dense`` | ``layers.{i}.mlp.fc2`` |

  Embeddings, ``layernorm_before/after``, the final ``layernorm`` and ``pooler`` keep their names.
  Both layouts are accepted on load, whichever transformers is installed; loading is strict (a
  checkpoint loaded with ``strict=False`` under the wrong layout would silently keep random layers).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping

import torch

__all__ = ["VIT_ARCH", "build_vit", "vit_key_layout", "vit_state_for"]

VIT_ARCH = "vit-base-patch16-224"

# (4.x suffix, 5.x suffix) inside one layer, longest first so "attention.output.dense" wins over "output.dense"
_LAYER_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_V4_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")
_V5_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def build_vit(overrides: Mapping[str, Any] | None = None, attention: Literal["sdpa", "eager"] = "sdpa",
              add_pooling_layer: bool = True) -> torch.nn.Module:
    """A randomly initialised ``ViTModel`` of the in21k ViT-B/16 architecture (`overrides`: tiny tests)."""
    from transformers import ViTModel

    from .backbones import hf_config

    cfg = hf_config(VIT_ARCH, overrides)
    cfg._attn_implementation = attention
    return ViTModel(cfg, add_pooling_layer=add_pooling_layer)


def vit_key_layout(keys: Any) -> str | None:
    """``"v4"``, ``"v5"`` or ``None`` (no layer keys) for a collection of ViT state-dict keys."""
    keys = list(keys)
    if any(_V5_LAYER.match(k) for k in keys):
        return "v5"
    if any(_V4_LAYER.match(k) for k in keys):
        return "v4"
    return None


def _rename_layer_key(key: str, to: str) -> str:
    src, dst = (_V4_LAYER, "layers.{}.") if to == "v5" else (_V5_LAYER, "encoder.layer.{}.")
    m = src.match(key)
    if m is None:
        return key
    rest = m.group(2)
    for old, new in _LAYER_RENAMES:
        a, b = (old, new) if to == "v5" else (new, old)
        if rest.startswith(a):
            rest = b + rest[len(a):]
            break
    return dst.format(m.group(1)) + rest


def vit_state_for(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (either transformers layout, optionally under a ``vit.`` prefix) renamed to `model`'s layout."""
    state = {(k.removeprefix("vit.")): v for k, v in state.items()}
    want = vit_key_layout(model.state_dict().keys())
    have = vit_key_layout(state.keys())
    if want is None or have is None or want == have:
        return dict(state)
    return {_rename_layer_key(k, want): v for k, v in state.items()}
