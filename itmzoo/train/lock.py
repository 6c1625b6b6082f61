"""One training process per run directory: an advisory lock on ``DIR/.lock``.

The lock is an ``flock`` held by the running process, so the operating system drops it when the
process ends in any way (Ctrl-C, a kill, a crash): a lock left behind by a killed run never blocks
``--resume``. The file itself stays (it records the pid of the last holder) and means nothing alone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["RunDirLocked", "RunLock"]

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another process is training into the same run directory."""


class RunLock:
    """``with RunLock(out_dir): ...`` refuses to enter while another process holds `out_dir`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not protected against each other there
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirLocked(f"{self.directory} is in use by a training run ({holder}); wait for it to finish, "
                               "or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
