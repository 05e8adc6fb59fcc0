"""The journal of pending changes: what a crashed daemon left for the next mount.

``journal.jsonl`` in the mount's state directory holds, one JSON object per
line:

1. a ``state`` record (the checkpoint): the whole overlay as it was after the
   last flush: every pending node (its path, the remote object it stands for,
   its mode, staged content, set mtime or symlink target) and every doomed
   remote path;
2. the operations made since, in order: ``create``, ``stage`` (a file got
   local content), ``remove``, ``rename``, ``meta``, and ``script`` (the
   objects a flush's script is about to move aside, so a crash in the middle
   of it cannot hide them).

Each record is written before the operation returns. After each flush,
`checkpoint` replaces the file with a fresh ``state`` record, atomically.
The ``fsync`` calls run in a worker thread, never on the thread that
answers the kernel.
File content lives in staging files beside the journal; a ``stage`` record
only names one.

Records name paths (relative, surrogate-escaped text), never inode numbers,
so `recovery` can rebuild the overlay on a fresh tree made from the
session's listings.

A record reaches the kernel's page cache before the operation returns, so a
``kill -9`` of the daemon loses nothing; surviving a power cut needs the
``fsync`` that checkpoints do and that an application's ``fsync`` asks for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .model import Namespace, depth

JOURNAL_FILE = "journal.jsonl"


def encode_path(path: bytes) -> str:
    return os.fsdecode(path)


def decode_path(text: str) -> bytes:
    return os.fsencode(text)


def overlay_state(namespace: Namespace) -> dict[str, Any]:
    """The checkpoint of an overlay: everything pending, by path."""
    nodes = []
    for node in sorted((n for n in namespace.pending if n.attached), key=lambda n: depth(n.path)):
        nodes.append(
            {
                "path": encode_path(node.path),
                "origin": None if node.origin is None else encode_path(node.origin),
                "mode": node.mode,
                "stage": node.stage if node.dirty else None,
                "mtime_ns": node.mtime_ns if node.mtime_dirty else None,
                "target": None if node.target is None else encode_path(node.target),
            }
        )
    doomed = [[encode_path(path), mode] for path, mode in sorted(namespace.doomed.items())]
    return {"op": "state", "nodes": nodes, "doomed": doomed}


@dataclass
class JournalContents:
    state: dict[str, Any] | None = None
    operations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.operations and not (self.state and (self.state["nodes"] or self.state["doomed"]))


class Journal:
    """The journal file. Records are written at once; ``fsync`` runs in a worker
    thread, so a handler never waits for the disk, and records made while it
    runs are carried into the new file of a checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_FILE
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._handle = open(self.path, "a", encoding="utf-8")
        #: the file is being synced or replaced; records made meanwhile, for a checkpoint.
        self._swapping = trio.Lock()
        self._meanwhile: list[str] | None = None

    def close(self) -> None:
        self._handle.close()

    def record(self, op: str, **fields: Any) -> None:
        line = json.dumps({"op": op, **fields}) + "\n"
        self._handle.write(line)
        self._handle.flush()
        if self._meanwhile is not None:
            self._meanwhile.append(line)

    async def sync(self) -> None:
        async with self._swapping:
            await trio.to_thread.run_sync(os.fsync, self._handle.fileno())

    async def checkpoint(self, state: dict[str, Any]) -> None:
        """Replace the journal with one ``state`` record, on disk before the swap.

        Records made while the new file is synced follow the state in it.
        """
        async with self._swapping:
            temporary = self.path.with_suffix(".tmp")
            self._meanwhile = []
            try:
                with open(temporary, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(state) + "\n")
                    handle.flush()
                    await trio.to_thread.run_sync(os.fsync, handle.fileno())
                    handle.writelines(self._meanwhile)
                self._handle.close()
                temporary.replace(self.path)
                self._handle = open(self.path, "a", encoding="utf-8")
            finally:
                self._meanwhile = None

    def read(self) -> JournalContents:
        contents = JournalContents()
        for record in _read(self.path):
            if record.get("op") == "state":
                contents = JournalContents(state=record)
            else:
                contents.operations.append(record)
        return contents


def _read(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return  # a torn last line from a crash mid-write
