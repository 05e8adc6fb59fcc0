"""The journal of pending changes: what a crashed daemon left for the next mount.

``journal.jsonl`` in the mount's state directory holds, one JSON object per
line (the records of `changes`):

1. a checkpoint: the whole overlay as it was after the last flush;
2. the changes made since, in order.

Each record is written before the operation returns, whole or not at all: a
record the disk has no room for is cut off again and raises, so the
operation fails with ENOSPC and the journal never holds a change that did
not happen. Beside the journal lies a reserve file (`RESERVE_BYTES`): the
first time the disk is full, it is given up so that the records that free
space (removing the file that filled the disk) still fit; it is made again
at the next checkpoint that finds room. After each flush, `checkpoint` replaces the file with a fresh
``state`` record, atomically; a checkpoint that fails (a full disk) leaves
the old journal in place, which still describes the overlay.
The ``fsync`` calls run in a worker thread, never on the thread that
answers the kernel.
File content lives in staging files beside the journal; a ``stage`` record
only names one.

A record reaches the kernel's page cache before the operation returns, so a
``kill -9`` of the daemon loses nothing; surviving a power cut needs the
``fsync`` that checkpoints do and that an application's ``fsync`` asks for.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from .changes import Change, Checkpoint, JournalContents

JOURNAL_FILE = "journal.jsonl"
RESERVE_FILE = "journal.reserve"
RESERVE_BYTES = 256 * 1024


class Journal:
    """The journal file. Records are written at once; ``fsync`` runs in a worker
    thread, so a handler never waits for the disk, and records made while it
    runs are carried into the new file of a checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_FILE
        self._reserve = directory / RESERVE_FILE
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = self._open()
        self._make_reserve()
        #: the file is being synced or replaced; records made meanwhile, for a checkpoint.
        self._swapping = trio.Lock()
        self._meanwhile: list[bytes] | None = None

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def close(self) -> None:
        os.close(self._fd)

    def _make_reserve(self) -> None:
        if self._reserve.exists():
            return
        try:
            with open(self._reserve, "wb") as handle:
                handle.write(b"\0" * RESERVE_BYTES)
        except OSError:
            self._reserve.unlink(missing_ok=True)

    def record(self, change: Change) -> None:
        """Append one record; OSError (ENOSPC) leaves the journal as it was."""
        line = (json.dumps(change.to_record()) + "\n").encode()
        try:
            self._append(line)
        except OSError as error:
            if error.errno != errno.ENOSPC or not self._reserve.exists():
                raise
            self._reserve.unlink()  # the disk is full: the reserve makes room for this and what follows
            self._append(line)
        if self._meanwhile is not None:
            self._meanwhile.append(line)

    def _append(self, line: bytes) -> None:
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(self._fd, end)
            raise

    async def sync(self) -> None:
        async with self._swapping:
            await trio.to_thread.run_sync(os.fsync, self._fd)

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        """Replace the journal with one ``state`` record, on disk before the swap.

        Records made while the new file is synced follow the state in it. On
        failure (OSError) the old journal stays and the temporary file goes.
        """
        async with self._swapping:
            temporary = self.path.with_suffix(".tmp")
            self._meanwhile = []
            try:
                with open(temporary, "wb") as handle:
                    handle.write((json.dumps(checkpoint.to_record()) + "\n").encode())
                    handle.flush()
                    await trio.to_thread.run_sync(os.fsync, handle.fileno())
                    handle.writelines(self._meanwhile)
                temporary.replace(self.path)
                os.close(self._fd)
                self._fd = self._open()
                self._make_reserve()
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            finally:
                self._meanwhile = None

    def read(self) -> JournalContents:
        return read_journal(self.path.parent)


def read_journal(directory: Path) -> JournalContents:
    """What the journal in ``directory`` holds (without opening it for writing)."""
    return JournalContents.of(_read(directory / JOURNAL_FILE))


def _read(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return  # a torn last line from a crash mid-write
