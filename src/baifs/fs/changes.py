"""The journal's records as types: one class per kind of change, and the one reader of the format.

A record is one JSON object; paths in it are text with surrogate escapes
(`os.fsdecode`), never inode numbers, so a journal can be replayed onto a
fresh tree built from the session's listings. The kinds:

=========  ==============================================================
``state``  `Checkpoint`: the whole overlay after a flush, pending nodes by
           path (their remote object, mode, staged content and the session's
           version it started from, set times, symlink target) and doomed
           remote paths with their modes
``create`` `Create`: an object made here (file, directory, FIFO, symlink)
``stage``  `Stage`: a file got local content (a staging file) starting from
           the session's version ``base`` (size, mtime), when known
``remove`` `Remove`: an object (and what is below it) left the view
``rename`` `Rename`: an object moved, or two swapped places (``exchange``)
``meta``   `Meta`: a mode or times set here
``script`` `ScriptMoves`: the objects a flush's script is about to move
           aside into the scratch area, so a crash mid-script cannot hide them
=========  ==============================================================

`from_record` is the only place that reads these objects back; the overlay
(`overlay`) writes them, `recovery` replays them onto a mount and `salvage`
onto a tree of paths. Journals written by earlier versions read the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar


def encode_path(path: bytes) -> str:
    return os.fsdecode(path)


def decode_path(text: str) -> bytes:
    return os.fsencode(text)


def _optional_path(text: str | None) -> bytes | None:
    return None if text is None else decode_path(text)


def _optional_text(path: bytes | None) -> str | None:
    return None if path is None else encode_path(path)


def _base(saved: Any) -> tuple[int, int] | None:
    return None if not saved else (int(saved[0]), int(saved[1]))


@dataclass(frozen=True)
class Create:
    op: ClassVar[str] = "create"
    path: bytes
    mode: int
    #: the staging file of a new regular file.
    stage: str | None = None
    #: a symlink's target.
    target: bytes | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"op": self.op, "path": encode_path(self.path), "mode": self.mode}
        if self.stage is not None:
            record["stage"] = self.stage
        if self.target is not None:
            record["target"] = encode_path(self.target)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Create:
        return cls(
            decode_path(record["path"]),
            int(record["mode"]),
            record.get("stage"),
            _optional_path(record.get("target")),
        )


@dataclass(frozen=True)
class Stage:
    op: ClassVar[str] = "stage"
    path: bytes
    stage: str
    #: the session's version (size, mtime_ns) the content started from, when known.
    base: tuple[int, int] | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"op": self.op, "path": encode_path(self.path), "stage": self.stage}
        if self.base is not None:
            record["base"] = list(self.base)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Stage:
        return cls(decode_path(record["path"]), record["stage"], _base(record.get("base")))


@dataclass(frozen=True)
class Remove:
    op: ClassVar[str] = "remove"
    path: bytes

    def to_record(self) -> dict[str, Any]:
        return {"op": self.op, "path": encode_path(self.path)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Remove:
        return cls(decode_path(record["path"]))


@dataclass(frozen=True)
class Rename:
    op: ClassVar[str] = "rename"
    old: bytes
    new: bytes
    #: RENAME_EXCHANGE: the objects at ``old`` and ``new`` swapped places.
    exchange: bool = False

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"op": self.op, "old": encode_path(self.old), "new": encode_path(self.new)}
        if self.exchange:
            record["exchange"] = 1
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Rename:
        return cls(decode_path(record["old"]), decode_path(record["new"]), bool(record.get("exchange")))


@dataclass(frozen=True)
class Meta:
    op: ClassVar[str] = "meta"
    path: bytes
    mode: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"op": self.op, "path": encode_path(self.path)}
        for key in ("mode", "mtime_ns", "atime_ns"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Meta:
        values = {
            key: None if record.get(key) is None else int(record[key])
            for key in ("mode", "mtime_ns", "atime_ns")
        }
        return cls(decode_path(record["path"]), **values)


@dataclass(frozen=True)
class ScriptMoves:
    op: ClassVar[str] = "script"
    #: (origin, where the script parks it) for each object it moves aside.
    moves: tuple[tuple[bytes, bytes], ...]

    def to_record(self) -> dict[str, Any]:
        return {"op": self.op, "moves": [[encode_path(origin), encode_path(at)] for origin, at in self.moves]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ScriptMoves:
        return cls(tuple((decode_path(origin), decode_path(at)) for origin, at in record.get("moves", [])))


@dataclass(frozen=True)
class PendingNode:
    """One pending node of a checkpoint."""

    path: bytes
    #: the remote object it stands for; None for something made here.
    origin: bytes | None
    mode: int
    #: staged content not on the session yet, and the session's version it started from.
    stage: str | None = None
    base: tuple[int, int] | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    target: bytes | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "path": encode_path(self.path),
            "origin": _optional_text(self.origin),
            "mode": self.mode,
            "stage": self.stage,
            "base": None if self.base is None else list(self.base),
            "mtime_ns": self.mtime_ns,
            "atime_ns": self.atime_ns,
            "target": _optional_text(self.target),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PendingNode:
        return cls(
            decode_path(record["path"]),
            _optional_path(record["origin"]),
            int(record["mode"]),
            record.get("stage"),
            _base(record.get("base")),
            None if record.get("mtime_ns") is None else int(record["mtime_ns"]),
            None if record.get("atime_ns") is None else int(record["atime_ns"]),
            _optional_path(record.get("target")),
        )


@dataclass(frozen=True)
class Checkpoint:
    op: ClassVar[str] = "state"
    #: pending nodes, shallowest first.
    nodes: tuple[PendingNode, ...] = ()
    #: remote paths to remove, with the mode the mount knew them by.
    doomed: tuple[tuple[bytes, int], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.nodes and not self.doomed

    def to_record(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "nodes": [node.to_record() for node in self.nodes],
            "doomed": [[encode_path(path), mode] for path, mode in self.doomed],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Checkpoint:
        return cls(
            tuple(PendingNode.from_record(node) for node in record.get("nodes", [])),
            tuple((decode_path(path), int(mode)) for path, mode in record.get("doomed", [])),
        )


Change = Create | Stage | Remove | Rename | Meta | ScriptMoves
Record = Change | Checkpoint
_KINDS: dict[str, type[Record]] = {
    kind.op: kind for kind in (Create, Stage, Remove, Rename, Meta, ScriptMoves, Checkpoint)
}


def from_record(record: dict[str, Any]) -> Record | None:
    """The typed record of a journal line; None for a kind this version does not know."""
    kind = _KINDS.get(str(record.get("op")))
    return None if kind is None else kind.from_record(record)


@dataclass
class JournalContents:
    """A journal read back: the last checkpoint, and the changes after it, in order."""

    checkpoint: Checkpoint | None = None
    changes: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes and (self.checkpoint is None or self.checkpoint.empty)

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]]) -> JournalContents:
        contents = cls()
        for raw in records:
            record = from_record(raw)
            if isinstance(record, Checkpoint):
                contents = cls(record)
            elif record is not None:
                contents.changes.append(record)
        return contents
