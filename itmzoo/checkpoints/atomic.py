"""Atomic writes: a reader sees the old content or the new one, never a half-written file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool, umask: int | None = None) -> None:
    # mkstemp/mkdtemp create 0600/0700; a finished file gets what open()/mkdir() would have given it
    os.chmod(path, (0o777 if directory else 0o666) & ~(current_umask() if umask is None else umask))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _usual_mode(tmp_path, directory=False)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it takes the place of `directory`.

    An existing `directory` is moved aside first and removed only after the new one is in place, so
    an interruption leaves either the old or the new complete directory (plus, at worst, a
    ``.old`` copy that the next save cleans up).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old = directory.with_name(f".{directory.name}.old")
    try:
        yield tmp
        # the directory from mkdtemp, and files that writers create privately (safetensors writes 0600)
        umask = current_umask()  # once, not per file
        for sub in [tmp, *tmp.rglob("*")]:
            _usual_mode(sub, directory=sub.is_dir(), umask=umask)
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
