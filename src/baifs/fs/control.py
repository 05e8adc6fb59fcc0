"""Control files: names at the mount's root that belong to baifs, not to the session.

The control tree::

    .baifs-status      read-only JSON: pending changes, flush progress, cache,
                       requests per endpoint, retries, recent errors
    .run               write a command (or clean/build/exec TOML) to start a run;
                       read: the latest run's status and why the last write was refused
    .runs/             one directory per run kept, and ``latest`` (a symlink)
    .runs/N/           command, status, output, stdout, stderr, exit_code

Control entries live in a reserved inode range far above anything `model`
allocates, are never listed from or sent to the session (`filesystem`
hides these names in listings), and are owned by the mounting user. Their
attributes are never cached by the kernel (they change as runs go), and
their files are read with direct I/O, so ``tail -f .runs/N/output`` follows
a run as it goes.

Commands other than runs go through extended attributes (S3QL's pattern):
``user.baifs.flush`` on the root flushes everything and returns when it is
on the session; ``user.baifs.interrupt`` on ``.run`` (value: a run number)
interrupts that run in the session.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..timestamps import stamp
from .filesystem import Filesystem, FSError
from .model import ROOT_INODE
from .runs import RECORD_FILES, RunManager, RunRecord

CONTROL_BASE = 1 << 48
STATUS_INODE = CONTROL_BASE + 1
RUN_INODE = CONTROL_BASE + 2
RUNS_INODE = CONTROL_BASE + 3
LATEST_INODE = CONTROL_BASE + 4
STATUS_NAME = b".baifs-status"
#: Pending paths the status names; the rest are counted.
STATUS_PATHS = 20
RUN_NAME = b".run"
RUNS_NAME = b".runs"
LATEST_NAME = b"latest"
FLUSH_XATTR = b"user.baifs.flush"
#: Set on the root before an unmount: the daemon ends without its final flush, changes kept.
KEEP_PENDING_XATTR = b"user.baifs.keep-pending"
INTERRUPT_XATTR = b"user.baifs.interrupt"
_RUN_SHIFT = 4
#: Run files that grow while their run goes, read live.
GROWING = ("output", "stdout", "stderr")


def run_directory_inode(number: int) -> int:
    return CONTROL_BASE + (number << _RUN_SHIFT)


@dataclass(frozen=True)
class ControlEntry:
    inode: int
    name: bytes
    mode: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class ControlTree:
    def __init__(self, fs: Filesystem, runs: RunManager, identity: dict[str, Any]) -> None:
        self.fs = fs
        self.runs = runs
        self.identity = identity
        self.started_ns = time.time_ns()

    @staticmethod
    def owns(inode: int) -> bool:
        return inode >= CONTROL_BASE

    # -- the tree -----------------------------------------------------------

    def root_entries(self) -> list[ControlEntry]:
        return [self.entry(STATUS_INODE), self.entry(RUN_INODE), self.entry(RUNS_INODE)]

    def entry(self, inode: int) -> ControlEntry:
        if inode == STATUS_INODE:
            return self._file(inode, STATUS_NAME, 0o444, self.document(inode))
        if inode == RUN_INODE:
            return self._file(inode, RUN_NAME, 0o600, self.document(inode))
        if inode == RUNS_INODE:
            return ControlEntry(inode, RUNS_NAME, stat.S_IFDIR | 0o555, 0, self._runs_mtime())
        if inode == LATEST_INODE:
            latest = self.runs.latest
            if latest is None:
                raise FSError(errno.ENOENT)
            target = str(latest.number).encode()
            return ControlEntry(inode, LATEST_NAME, stat.S_IFLNK | 0o777, len(target), self._runs_mtime())
        number, index = divmod(inode - CONTROL_BASE, 1 << _RUN_SHIFT)
        record = self.runs.records.get(number)
        if record is None or index > len(RECORD_FILES):
            raise FSError(errno.ENOENT)
        if index == 0:
            return ControlEntry(inode, str(number).encode(), stat.S_IFDIR | 0o555, 0, _ns(record.queued_at))
        path = record.directory / RECORD_FILES[index - 1]
        try:
            info = path.stat()
        except FileNotFoundError:
            raise FSError(errno.ENOENT) from None
        return ControlEntry(inode, path.name.encode(), stat.S_IFREG | 0o444, info.st_size, info.st_mtime_ns)

    def _file(self, inode: int, name: bytes, permissions: int, content: bytes | None) -> ControlEntry:
        return ControlEntry(inode, name, stat.S_IFREG | permissions, len(content or b""), time.time_ns())

    def _runs_mtime(self) -> int:
        latest = self.runs.latest
        return _ns(latest.queued_at) if latest is not None else self.started_ns

    def lookup(self, parent: int, name: bytes) -> ControlEntry:
        for entry in self.root_entries() if parent == ROOT_INODE else self.children(parent):
            if entry.name == name:
                return entry
        raise FSError(errno.ENOENT)

    def children(self, inode: int) -> list[ControlEntry]:
        if inode == RUNS_INODE:
            entries = [self.entry(run_directory_inode(number)) for number in sorted(self.runs.records)]
            return entries + ([self.entry(LATEST_INODE)] if self.runs.records else [])
        if self.owns(inode) and self.entry(inode).is_dir:
            base = inode
            return [
                self.entry(base + 1 + index)
                for index, name in enumerate(RECORD_FILES)
                if (self._record(inode).directory / name).exists()
            ]
        raise FSError(errno.ENOTDIR)

    def _record(self, directory_inode: int) -> RunRecord:
        record = self.runs.records.get((directory_inode - CONTROL_BASE) >> _RUN_SHIFT)
        if record is None:
            raise FSError(errno.ENOENT)
        return record

    def readlink(self, inode: int) -> bytes:
        latest = self.runs.latest
        if inode != LATEST_INODE or latest is None:
            raise FSError(errno.EINVAL)
        return str(latest.number).encode()

    def read(self, inode: int, offset: int, size: int) -> bytes:
        """A run file's content at this moment (the output files grow while their run goes)."""
        number, index = divmod(inode - CONTROL_BASE, 1 << _RUN_SHIFT)
        record = self.runs.records.get(number)
        if record is None or not 1 <= index <= len(RECORD_FILES):
            raise FSError(errno.ENOENT)
        try:
            with open(record.directory / RECORD_FILES[index - 1], "rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        except FileNotFoundError:
            raise FSError(errno.ENOENT) from None

    # -- documents ----------------------------------------------------------

    def document(self, inode: int) -> bytes | None:
        """What a descriptor of this control file reads: a snapshot, or None for output that grows.

        ``.baifs-status``, ``.run`` and a run's ``status`` (replaced as the
        run goes) are read as they were when opened, so several reads never
        mix two versions; a run's output files are read as they grow.
        """
        if inode == STATUS_INODE:
            return _json(status(self.fs, self.identity))
        if inode != RUN_INODE:
            number, index = divmod(inode - CONTROL_BASE, 1 << _RUN_SHIFT)
            record = self.runs.records.get(number)
            if record is None or not 1 <= index <= len(RECORD_FILES) or RECORD_FILES[index - 1] in GROWING:
                return None
            try:
                return (record.directory / RECORD_FILES[index - 1]).read_bytes()
            except FileNotFoundError:
                raise FSError(errno.ENOENT) from None
        latest = self.runs.latest
        queued = [r.number for r in self.runs.records.values() if r.state == "queued"]
        return _json(
            {
                "latest": latest.status() if latest is not None else None,
                "queued": sorted(queued),
                "last_rejected": self.runs.last_rejection,
            }
        )

    @staticmethod
    def run_status(record: RunRecord) -> bytes:
        """What a ``.run`` descriptor that submitted a run reads: that run's status, now."""
        return _json(record.status())


def status(fs: Filesystem, identity: dict[str, Any]) -> dict[str, Any]:
    """The mount's state for ``baifs status`` and ``.baifs-status``."""
    namespace = fs.namespace
    pending = [n for n in namespace.pending if n.attached]
    uploads = [n for n in pending if n.dirty and n.is_regular]
    namespace_changes = len(namespace.doomed) + sum(1 for n in pending if not (n.dirty and n.is_regular))
    stats = fs.sync.stats
    unresolved = fs.sync.unresolved
    return {
        **identity,
        "version": __version__,
        "pid": os.getpid(),
        "time": stamp(time.time()),
        "pending": {
            "uploads": len(uploads),
            "upload_bytes": sum(n.size for n in uploads),
            "namespace_changes": namespace_changes,
            "paths": sorted(os.fsdecode(n.path) for n in pending)[:STATUS_PATHS],
            "more_paths": max(0, len(pending) - STATUS_PATHS),
        },
        "flush": dict(fs.sync.progress),
        "remote": {
            "terminated": fs.session.terminated,
            **fs.session.connection.health.as_dict(),
            "rate": fs.session.connection.rate.as_dict(),
            "unconcluded_run": fs.executor.unconcluded_run,
            "unresolved_flush": None if unresolved is None else unresolved.run_id,
        },
        "slot": {**fs.executor.slot_state(), "inbox": fs.supervisor.inbox is not None},
        "cache": {
            "bytes": fs.store.cached_bytes,
            "limit": fs.store.cache_limit,
            "staged_bytes": fs.store.staged_bytes,
        },
        "session_api": fs.session.connection.stats.as_dict(),
        "flushes": {
            "completed": stats.flushes,
            "uploaded_files": stats.uploaded_files,
            "uploaded_bytes": stats.uploaded_bytes,
            "scripts": stats.scripts,
            "failures": stats.flush_failures,
            "last_error": stats.last_flush_error,
            "refused": [refusal.as_dict(change) for change, refusal in fs.sync.refusals.items()],
            "holding": fs.sync.holding,
            "kept_in_session": stats.kept_in_session,
        },
        "recovered_changes": stats.recovered_changes,
        "conflict_copies": stats.conflict_copies,
        "phase_behaviour": fs.executor.phase_behaviour,
        "profile": {
            **fs.sync.profile.as_dict(),
            "phase_behaviour": fs.executor.phase_behaviour,
            "upload_names": "absolute" if fs.session.absolute_upload_names else "relative",
        },
    }


def _json(document: Any) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)
