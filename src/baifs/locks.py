"""One process per directory: an exclusive, advisory lock held for a process's life.

A mount holds its session's state directory (so two mounts of one session
from this machine cannot both replay and flush its journal), and `baifs
serve` its data directory (so a second server cannot take over the first
one's sessions and ``serve.json``). The lock is ``flock`` on ``<dir>/lock``,
which the kernel releases when the process ends, however it ends; the file
says who holds it, for the message of the one refused.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import BaifsError


class DirectoryLocked(BaifsError):
    """Another process holds the directory."""


class DirectoryLock:
    def __init__(self, directory: Path, what: str) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.what = what
        self.path = directory / "lock"
        self._handle = open(self.path, "a+")

    def acquire(self, holder: str) -> None:
        """Take the lock, saying who holds it; `DirectoryLocked` names the other holder."""
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            owner = self._handle.read().strip() or "another process"
            raise DirectoryLocked(f"{self.what} is already in use on this machine ({owner})") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} {holder}")
        self._handle.flush()

    def release(self) -> None:
        self._handle.close()
