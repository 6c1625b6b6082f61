"""Run logs: a JSONL file of step/epoch records and optional TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..jsonfmt import round_floats

__all__ = ["JsonlLog", "TensorBoardLog"]


def _clean(x: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so the file stays valid JSON
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Mapping):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class JsonlLog:
    """Append-only JSON lines; `size` is recorded in checkpoints so a resume can cut what came after."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(_clean(round_floats(dict(record)))) + "\n")
            self._f.flush()

    def size(self) -> int:
        """Bytes written so far, on disk (fsynced: a checkpoint must not point past the file's end)."""
        if self._f is None:
            return 0
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def truncate(self, size: int) -> None:
        """Drop records written after a checkpoint (a killed run's steps that the resume repeats)."""
        if self._f is None:
            return
        self._f.flush()
        if self._f.tell() > size:
            self._f.truncate(size)
            self._f.seek(size)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class TensorBoardLog:
    """Scalars to TensorBoard (needs the ``tensorboard`` package: ``pip install itmzoo[tensorboard]``)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()
