"""itmzoo: a model zoo for image-text matching.

>>> import itmzoo
>>> model = itmzoo.build("toy_vse")
>>> itmzoo.list_models(scoring="cross")
['lhsc']
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .registry import add_model_config, list_models, model_info, register_model  # noqa: E402  (light)

__all__ = [
    "Retriever",
    "__version__",
    "add_model_config",
    "build",
    "encode_captions",
    "encode_images",
    "evaluate",
    "list_models",
    "load",
    "model_info",
    "register_model",
]


def __getattr__(name: str) -> Any:
    # torch-dependent entry points are imported on first use so `import itmzoo` stays light
    if name in ("build", "load"):
        from . import api

        return getattr(api, name)
    if name in ("Retriever", "encode_captions", "encode_images"):
        from . import retrieval

        return getattr(retrieval, name)
    if name == "evaluate":
        from .eval import evaluate

        return evaluate
    raise AttributeError(f"module 'itmzoo' has no attribute {name!r}")
