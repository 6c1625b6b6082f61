"""Model families, one module each; imported lazily through the registry.

This package also owns the generated index of its declarations (``index.json``), which lets the
registry list the built-in methods without importing them.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

__all__ = ["builtin_index", "write_index"]


def builtin_index() -> dict[str, dict[str, Any]]:
    """The index records of every method declared in this package (imports every family module)."""
    from ..registry import builtin_records

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return builtin_records()


def write_index(path: str | Path | None = None) -> Path:
    """Regenerate ``index.json`` from the modules' declarations (``python -m itmzoo.models --write-index``)."""
    from ..registry import INDEX_PATH

    path = Path(path) if path is not None else INDEX_PATH
    path.write_text(json.dumps(builtin_index(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
