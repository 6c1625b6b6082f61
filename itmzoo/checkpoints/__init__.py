"""Native checkpoints (safetensors + JSON) and safe reading of the authors' pickled files."""

from .native import load_pretrained, save_pretrained
from .safe import CheckpointError, load_state_strict, read_pickled_checkpoint, strip_prefixes

__all__ = [
    "CheckpointError",
    "load_pretrained",
    "load_state_strict",
    "read_pickled_checkpoint",
    "save_pretrained",
    "strip_prefixes",
]
