"""Control files: names at the mount's root that belong to baifs, not to the session.

The control tree (names in `baifs.controlfiles`)::

    .baifs-status      read-only JSON: pending changes, flush progress, cache,
                       requests per endpoint, retries, recent errors
    .run               write a command (or clean/build/exec TOML) to start a run;
                       read: the latest run's status and why the last write was refused
    .runs/             one directory per run kept, and ``latest`` (a symlink)
    .runs/N/           command, status, output, stdout, stderr, exit_code

`ControlTree` serves the part of the file system interface these need, so
the FUSE adapter routes a request here once (`owns`, `owns_name`,
`owns_handle`) and knows nothing of the protocol: lookups by a table of
names (a lookup renders no document but the one looked up), attributes,
directories, open descriptors, and the ``.run`` protocol: a request is
written (spliced by offset, refused at ``write`` when it can never become
valid, so a shell's ``echo … > .run`` sees the error) and submitted at
``close`` or ``fsync`` (`runs.RunManager`).

Control entries live in a reserved inode range far above anything `model`
allocates, are never listed from or sent to the session (listings hide
these names), and are owned by the mounting user. Their attributes are never
cached by the kernel (they change as runs go), and their files are read with
direct I/O, so ``tail -f .runs/N/output`` follows a run as it goes.
``.baifs-status``, ``.run`` and a run's ``status`` are read as they were when
opened, so several reads never mix two versions.

Commands other than runs go through extended attributes (S3QL's pattern):
``user.baifs.flush`` on the root flushes everything and returns when it is
on the session; ``user.baifs.keep-pending`` on the root makes the unmount
leave pending changes in the journal; ``user.baifs.interrupt`` on ``.run``
(value: a run number) interrupts that run in the session.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, controlfiles
from ..timestamps import stamp
from .content import ContentStore
from .errors import FSError
from .model import ROOT_INODE
from .overlay import Overlay
from .remote import Remote
from .runs import RECORD_FILES, RunManager, RunRecord, RunRejected, RunUnrecordable
from .scratch import RESERVED_AT_ROOT
from .sync import SyncEngine

log = logging.getLogger(__name__)

CONTROL_BASE = 1 << 48
STATUS_INODE = CONTROL_BASE + 1
RUN_INODE = CONTROL_BASE + 2
RUNS_INODE = CONTROL_BASE + 3
LATEST_INODE = CONTROL_BASE + 4
CONTROL_HANDLE_BASE = 1 << 40
STATUS_NAME = controlfiles.STATUS.encode()
RUN_NAME = controlfiles.RUN.encode()
RUNS_NAME = controlfiles.RUNS.encode()
LATEST_NAME = controlfiles.LATEST.encode()
FLUSH_XATTR = controlfiles.FLUSH_XATTR.encode()
KEEP_PENDING_XATTR = controlfiles.KEEP_PENDING_XATTR.encode()
INTERRUPT_XATTR = controlfiles.INTERRUPT_XATTR.encode()
#: The control files at the root, by name.
AT_ROOT = {STATUS_NAME: STATUS_INODE, RUN_NAME: RUN_INODE, RUNS_NAME: RUNS_INODE}
#: Pending paths the status names; the rest are counted.
STATUS_PATHS = 20
_RUN_SHIFT = 4
#: Run files that grow while their run goes, read live.
GROWING = ("output", "stdout", "stderr")
_RECORD_INDEX = {name.encode(): index for index, name in enumerate(RECORD_FILES)}


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


@dataclass
class ControlHandle:
    inode: int
    writable: bool
    #: the document as it was at open (``.baifs-status``, ``.run``); None for run files.
    snapshot: bytes | None
    #: the request being written, which starts at offset ``base`` of the descriptor (after an
    #: fsync submitted what came before, later writes start the next request).
    request: bytearray = field(default_factory=bytearray)
    base: int = 0
    record: RunRecord | None = None
    #: where the process that opened ``.run`` works, relative to /home/work, if inside the mount.
    writer_cwd: str | None = None


class ControlTree:
    def __init__(
        self,
        runs: RunManager,
        overlay: Overlay,
        sync: SyncEngine,
        remote: Remote,
        store: ContentStore,
        flush_everything: Callable[[], Awaitable[None]],
        identity: dict[str, Any],
    ) -> None:
        self.runs = runs
        self.overlay = overlay
        self.sync = sync
        self.remote = remote
        self.store = store
        self.flush_everything = flush_everything
        self.identity = identity
        self.started_ns = time.time_ns()
        self._handles: dict[int, ControlHandle] = {}
        self._next_handle = CONTROL_HANDLE_BASE

    # -- routing ----------------------------------------------------------------

    @staticmethod
    def owns(inode: int) -> bool:
        return inode >= CONTROL_BASE

    def owns_name(self, parent: int, name: bytes) -> bool:
        """Reserved names at the root (control files and scratch) and everything under them."""
        return (parent == ROOT_INODE and name in RESERVED_AT_ROOT) or self.owns(parent)

    @staticmethod
    def owns_handle(fh: int) -> bool:
        return fh >= CONTROL_HANDLE_BASE

    # -- the tree ---------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> ControlEntry:
        """The entry of a name: found by a table, rendering no document but its own."""
        if parent == ROOT_INODE:
            inode = AT_ROOT.get(name)
        elif parent == RUNS_INODE:
            inode = LATEST_INODE if name == LATEST_NAME else None
            if name.isdigit() and name == str(int(name)).encode() and int(name) in self.runs.records:
                inode = run_directory_inode(int(name))
        elif self.owns(parent) and self.entry(parent).is_dir:
            index = _RECORD_INDEX.get(name)
            inode = None if index is None else parent + 1 + index
        else:
            raise FSError(errno.ENOTDIR)
        if inode is None:
            raise FSError(errno.ENOENT)
        return self.entry(inode)

    def entry(self, inode: int) -> ControlEntry:
        if inode == STATUS_INODE:
            return self._file(inode, STATUS_NAME, 0o444, self._document(inode))
        if inode == RUN_INODE:
            return self._file(inode, RUN_NAME, 0o600, self._document(inode))
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

    @staticmethod
    def parent_of(inode: int) -> int:
        """The directory holding a control directory (for its ``..``)."""
        return ROOT_INODE if inode == RUNS_INODE else RUNS_INODE

    def children(self, inode: int) -> list[ControlEntry]:
        if inode == RUNS_INODE:
            entries = [self.entry(run_directory_inode(number)) for number in sorted(self.runs.records)]
            return entries + ([self.entry(LATEST_INODE)] if self.runs.records else [])
        if self.owns(inode) and self.entry(inode).is_dir:
            record = self._record(inode)
            return [
                self.entry(inode + 1 + index)
                for index, name in enumerate(RECORD_FILES)
                if (record.directory / name).exists()
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

    def setattr(self, inode: int, *, only_size: bool) -> ControlEntry:
        """Truncating ``.run`` (shell redirection opens it with O_TRUNC) is all one may do."""
        if inode != RUN_INODE or not only_size:
            raise FSError(errno.EPERM)
        return self.entry(inode)

    # -- descriptors --------------------------------------------------------------

    def open(self, inode: int, flags: int, pid: int) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and inode != RUN_INODE:
            raise FSError(errno.EACCES)
        snapshot = self._document(inode)
        if snapshot is None:
            self.entry(inode)  # a run file: ENOENT if its run was pruned
        number = self._next_handle
        self._next_handle += 1
        writer_cwd = self._cwd_in_mount(pid) if writable else None
        self._handles[number] = ControlHandle(inode, writable, snapshot, writer_cwd=writer_cwd)
        return number

    def _cwd_in_mount(self, pid: int) -> str | None:
        """The working directory of process ``pid`` relative to the mount's root, if it is inside."""
        mountpoint = self.identity.get("mountpoint")
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        # After a run the mount drops the kernel's entries, and the kernel then calls a working
        # directory in the mount "deleted"; the name is still the directory's.
        cwd = cwd.removesuffix(" (deleted)")
        relative = os.path.relpath(cwd, mountpoint) if mountpoint else ".."
        if relative == ".." or relative.startswith("../"):
            return None
        return "" if relative == "." else relative

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles[fh]
        if handle.record is not None:  # a .run descriptor that submitted a run reads its status, now
            return _json(handle.record.status())[offset : offset + size]
        if handle.snapshot is not None:
            return handle.snapshot[offset : offset + size]
        return self._read_run_file(handle.inode, offset, size)

    def _read_run_file(self, inode: int, offset: int, size: int) -> bytes:
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

    def write(self, fh: int, offset: int, data: bytes) -> int:
        """Part of a run request; refused now if it can never become one (EINVAL), or if the state
        disk cannot record it (ENOSPC)."""
        handle = self._handles[fh]
        if not handle.writable:
            raise FSError(errno.EBADF)
        if offset < handle.base or not handle.request:
            handle.base = offset  # rewriting from the start, or the first write of the next request
        request = handle.request
        at = offset - handle.base
        if at > len(request):
            request.extend(b"\0" * (at - len(request)))
        request[at : at + len(data)] = data
        try:
            self.runs.refuse_early(bytes(request))
        except RunRejected as error:
            handle.request = bytearray()
            log.warning("refused a run request: %s", error)
            raise FSError(errno.EINVAL) from None
        except RunUnrecordable as error:
            handle.request = bytearray()
            log.warning("refused a run request: %s", error)
            raise FSError(errno.ENOSPC) from None
        return len(data)

    def flush(self, fh: int) -> None:
        """close() or fsync(): the request written so far is submitted, so a bad one fails them."""
        handle = self._handles[fh]
        if not handle.request:
            return
        request, handle.request = bytes(handle.request), bytearray()
        try:
            handle.record = self.runs.submit(request, writer_cwd=handle.writer_cwd)
        except RunRejected as error:
            log.warning("refused a run request: %s", error)
            raise FSError(errno.EINVAL) from None

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- extended attributes ------------------------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes) -> None:
        if inode == ROOT_INODE and name == FLUSH_XATTR:
            await self.flush_everything()
        elif inode == ROOT_INODE and name == KEEP_PENDING_XATTR:
            self.sync.keep_pending = True
            log.warning("asked to keep pending changes at unmount: the final flush is left out")
        elif inode == RUN_INODE and name == INTERRUPT_XATTR:
            try:
                number = int(value.decode().strip())
            except ValueError:
                raise FSError(errno.EINVAL) from None
            await self.runs.interrupt(number)
        else:
            raise FSError(errno.ENOTSUP)

    # -- documents ----------------------------------------------------------------

    def _document(self, inode: int) -> bytes | None:
        """What a descriptor of this control file reads: a snapshot, or None for output that grows."""
        if inode == STATUS_INODE:
            return _json(self.status())
        if inode == RUN_INODE:
            latest = self.runs.latest
            queued = [r.number for r in self.runs.records.values() if r.state == "queued"]
            return _json(
                {
                    "latest": latest.status() if latest is not None else None,
                    "queued": sorted(queued),
                    "last_rejected": self.runs.last_rejection,
                }
            )
        number, index = divmod(inode - CONTROL_BASE, 1 << _RUN_SHIFT)
        record = self.runs.records.get(number)
        if record is None or not 1 <= index <= len(RECORD_FILES) or RECORD_FILES[index - 1] in GROWING:
            return None
        try:
            return (record.directory / RECORD_FILES[index - 1]).read_bytes()
        except FileNotFoundError:
            raise FSError(errno.ENOENT) from None

    def status(self) -> dict[str, Any]:
        """The mount's state for ``baifs status`` and ``.baifs-status``, from each part's own."""
        remote = self.remote.status()
        sync = self.sync.status()
        return {
            **self.identity,
            "version": __version__,
            "pid": os.getpid(),
            "time": stamp(time.time()),
            "pending": self.overlay.status(STATUS_PATHS),
            "flush": sync["flush"],
            "remote": {**remote["remote"], "unresolved_flush": sync["unresolved_flush"]},
            "slot": remote["slot"],
            "cache": self.store.status(),
            "session_api": remote["session_api"],
            "flushes": sync["flushes"],
            "recovered_changes": sync["recovered_changes"],
            "conflict_copies": list(self.overlay.conflict_copies),
            "phase_behaviour": remote["phase_behaviour"],
            "profile": {
                **sync["profile"],
                "phase_behaviour": remote["phase_behaviour"],
                "upload_names": remote["upload_names"],
            },
        }


def _json(document: Any) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)
