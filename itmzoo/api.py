"""Top-level functions `build` and `load` (they live in `itmzoo.checkpoints.build`, below the models)."""

from .checkpoints.build import LOCAL_DIR, build, load

__all__ = ["LOCAL_DIR", "build", "load"]
