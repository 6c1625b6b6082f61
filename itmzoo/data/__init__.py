"""Data: the split contract, readers of every on-disk format, vocabularies, collate, synthetic data.

Heavy or optional dependencies (torchvision, transformers, pyarrow, pycocotools) are imported only
by the functions that need them.
"""

from __future__ import annotations

from typing import Any

from .split import RetrievalSplit, load_pil

__all__ = [
    "CLIPTokenizer",
    "DataError",
    "HFTokenizer",
    "RegionTransform",
    "RetrievalSplit",
    "SYNTHETIC_VOCAB",
    "SyntheticShapes",
    "Vocab",
    "image_transform",
    "load_pil",
    "load_split",
    "read_albef_json",
    "read_arrow",
    "read_coco_captions",
    "read_ids_caps",
    "read_karpathy",
    "read_precomp",
]

_LAZY = {
    "SyntheticShapes": ".synthetic",
    "SYNTHETIC_VOCAB": ".synthetic",
    "Vocab": ".vocab",
    "image_transform": ".transforms",
    "RegionTransform": ".transforms",
    "HFTokenizer": ".tokenizers",
    "CLIPTokenizer": ".tokenizers",
    "DataError": ".readers",
    "load_split": ".readers",
    "read_albef_json": ".readers",
    "read_arrow": ".readers",
    "read_coco_captions": ".readers",
    "read_ids_caps": ".readers",
    "read_karpathy": ".readers",
    "read_precomp": ".readers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'itmzoo.data' has no attribute {name!r}")
