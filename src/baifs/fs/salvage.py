"""Changes a session never received: finding them, exporting them, replaying them elsewhere.

When a session ends (terminated, deleted, expired) while its mount held
changes it had not pushed, those changes stay in the session's state
directory on this machine: the journal and the staging files. A new session,
even under the same name, has another state directory, so nothing would ever
look at them again. This module owns getting them back:

- `list_pending` finds every state directory with pending changes and says
  whose they are (``session.json``, `state.StateIdentity`);
- `pending_elsewhere` tells a new mount that an earlier session of the same
  name left changes behind;
- `PendingTree.read` rebuilds, from the journal alone (no session needed),
  what the mount would have pushed: files with their content and modes,
  directories, symlinks, set mtimes, removals and moves of remote objects;
- `export` writes that tree into a local directory (same layout, modes and
  mtimes) with a report of what could not be exported (content that only
  the ended session had, removals, moves);
- `replay` pushes the changes to another session: the journal is recovered
  against that session and flushed, as a mount would.

Invariants: reading never changes a state directory; `export` refuses a
non-empty target; `replay` holds the state directory's lock, as a mount
does, so it never runs beside a mount of the same state.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..errors import BaifsError
from ..locks import DirectoryLock, DirectoryLocked
from .changes import Change, Create, Meta, Remove, Rename, Stage
from .core import MountCore, MountOptions
from .journal import read_journal
from .model import depth, is_ancestor_or_self
from .state import CURRENT_RUN_FILE, StateIdentity, normalised_endpoint, state_directories

if TYPE_CHECKING:
    from ..api.client import SessionClient

REPORT_NAME = ".baifs-salvage.json"


class SalvageError(BaifsError):
    """A salvage request cannot be carried out; the message says why."""


@dataclass
class PendingEntry:
    """One object of the pending tree: what the mount knew of it."""

    mode: int
    #: the remote object it stands for (None: made here), as of the journal.
    origin: bytes | None = None
    stage: str | None = None
    mtime_ns: int | None = None
    target: bytes | None = None


@dataclass
class PendingTree:
    """The pending changes of a state directory, by path relative to /home/work."""

    entries: dict[bytes, PendingEntry] = field(default_factory=dict)
    #: remote objects to remove.
    removed: set[bytes] = field(default_factory=set)

    @classmethod
    def read(cls, state: Path) -> PendingTree:
        contents = read_journal(state)
        tree = cls()
        if contents.checkpoint is not None:
            for node in contents.checkpoint.nodes:
                tree.entries[node.path] = PendingEntry(
                    node.mode, node.origin, node.stage, node.mtime_ns, node.target
                )
            tree.removed.update(path for path, _ in contents.checkpoint.doomed)
        for change in contents.changes:
            tree.apply(change)
        return tree

    def apply(self, change: Change) -> None:
        """One journalled change, as the overlay made it, on this tree of paths."""
        match change:
            case Rename(old=old, new=new):
                self._rename(old, new)
            case Create(path=path, mode=mode, stage=stage, target=target):
                self.entries[path] = PendingEntry(mode, None, stage, None, target)
            case Stage(path=path, stage=stage):
                self._entry(path).stage = stage
            case Remove(path=path):
                for key in [k for k in self.entries if is_ancestor_or_self(path, k)]:
                    entry = self.entries.pop(key)
                    if entry.origin is not None:
                        self.removed.add(entry.origin)
                self.removed.add(path)
            case Meta(path=path, mode=mode, mtime_ns=mtime_ns):
                entry = self._entry(path)
                if mode is not None:
                    entry.mode = mode
                if mtime_ns is not None:
                    entry.mtime_ns = mtime_ns

    def _entry(self, path: bytes) -> PendingEntry:
        """The entry of a path, created for a remote object the journal names for the first time."""
        entry = self.entries.get(path)
        if entry is None:
            entry = self.entries[path] = PendingEntry(stat.S_IFREG | 0o644, origin=path)
        return entry

    def _rename(self, old: bytes, new: bytes) -> None:
        for key in [k for k in self.entries if is_ancestor_or_self(new, k)]:
            del self.entries[key]
        moved = {k: v for k, v in self.entries.items() if is_ancestor_or_self(old, k)}
        if old not in moved:  # a remote object the journal did not know yet
            moved[old] = PendingEntry(stat.S_IFREG | 0o644, origin=old)
        for key, entry in moved.items():
            self.entries.pop(key, None)
            self.entries[new + key[len(old) :]] = entry

    @property
    def changes(self) -> int:
        return len(self.entries) + len(self.removed)


@dataclass
class PendingState:
    """A state directory that holds changes, and whose they are."""

    directory: Path
    identity: StateIdentity | None
    changes: int
    staged_bytes: int

    @property
    def key(self) -> str:
        return self.directory.name

    def describe(self) -> str:
        who = (
            f"session {self.identity.session} ({self.identity.session_id}) at {self.identity.endpoint}"
            if self.identity
            else "an unknown session"
        )
        return f"{self.key}: {who}: {self.changes} change(s), {self.staged_bytes:,} bytes staged"


def _staged_bytes(state: Path) -> int:
    staging = state / "staging"
    if not staging.is_dir():
        return 0
    return sum(path.stat().st_size for path in staging.iterdir() if path.is_file())


def list_pending(root: Path | None = None) -> list[PendingState]:
    """Every state directory on this machine that holds changes not on its session."""
    found = []
    for directory in state_directories(root):
        tree = PendingTree.read(directory)
        if tree.changes:
            found.append(
                PendingState(directory, StateIdentity.load(directory), tree.changes, _staged_bytes(directory))
            )
    return found


def pending_elsewhere(identity: StateIdentity, current: Path) -> list[str]:
    """Messages about earlier sessions of the same name and endpoint that left changes here."""
    messages = []
    for pending in list_pending(current.parent):
        other = pending.identity
        if pending.directory == current or other is None:
            continue
        same_place = normalised_endpoint(other.endpoint) == normalised_endpoint(identity.endpoint)
        if same_place and other.session == identity.session:
            messages.append(
                f"an earlier session named {other.session} ({other.session_id}) left {pending.changes} "
                f"change(s) it never received; see 'baifs salvage list' (key {pending.key})"
            )
    return messages


def find_state(key: str, root: Path | None = None) -> PendingState:
    """The state directory a user names by its key (or a unique prefix) or its session's name or id."""
    candidates = list_pending(root)
    matches = [p for p in candidates if p.key.startswith(key)] or [
        p for p in candidates if p.identity and key in (p.identity.session, p.identity.session_id)
    ]
    if not matches:
        raise SalvageError(f"no state with pending changes matches {key!r}; see 'baifs salvage list'")
    if len(matches) > 1:
        keys = ", ".join(p.key for p in matches)
        raise SalvageError(f"{key!r} matches several states ({keys}); give the key")
    return matches[0]


@dataclass
class ExportReport:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    #: paths whose content only the session had (moved or chmodded remote files).
    without_content: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    moved: list[list[str]] = field(default_factory=list)


def export(state: Path, target: Path) -> ExportReport:
    """Write the pending tree into an empty ``target``; the report says what could not be written."""
    tree = PendingTree.read(state)
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise SalvageError(f"{target} is not empty; export into a new or empty directory")
    report = ExportReport(removed=sorted(os.fsdecode(p) for p in tree.removed))
    staging = state / "staging"
    directory_times: list[tuple[Path, int]] = []
    for path, entry in sorted(tree.entries.items(), key=lambda item: depth(item[0])):
        where = Path(os.fsdecode(os.path.join(os.fsencode(target), path)))
        where.parent.mkdir(parents=True, exist_ok=True)
        if entry.origin is not None and entry.origin != path:
            report.moved.append([os.fsdecode(entry.origin), os.fsdecode(path)])
        if stat.S_ISDIR(entry.mode):
            where.mkdir(exist_ok=True)
            os.chmod(where, stat.S_IMODE(entry.mode))
            report.directories += 1
            if entry.mtime_ns is not None:
                directory_times.append((where, entry.mtime_ns))
        elif stat.S_ISLNK(entry.mode):
            if entry.target is not None:
                os.symlink(entry.target, where)
                report.symlinks += 1
        elif entry.stage is not None and (staging / entry.stage).exists():
            shutil.copy2(staging / entry.stage, where)
            os.chmod(where, stat.S_IMODE(entry.mode))
            if entry.mtime_ns is not None:
                os.utime(where, ns=(entry.mtime_ns, entry.mtime_ns))
            report.files += 1
        elif entry.origin is None:
            where.touch()  # made here and never written
            os.chmod(where, stat.S_IMODE(entry.mode))
            report.files += 1
        else:
            report.without_content.append(os.fsdecode(path))
    for where, mtime_ns in reversed(directory_times):
        os.utime(where, ns=(mtime_ns, mtime_ns))
    (target / REPORT_NAME).write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return report


async def replay(state: Path, session: SessionClient, progress: Any = None) -> int:
    """Push a state directory's pending changes to ``session``; how many changes were recovered."""
    lock = DirectoryLock(state, "this session")
    try:
        lock.acquire("replaying it with baifs salvage")
    except DirectoryLocked as error:
        raise SalvageError(f"{error}: unmount it first") from None
    try:
        (state / CURRENT_RUN_FILE).unlink(missing_ok=True)  # a run of the old session, not of this one
        with tempfile.TemporaryDirectory(prefix="baifs-salvage-") as cache:
            core = MountCore.over_session(session, state, Path(cache), MountOptions(write_back=3600))
            try:
                async with trio.open_nursery() as nursery:
                    recovered = await core.start(nursery)
                    await core.sync.flush_all(progress)
                    nursery.cancel_scope.cancel()
            finally:
                core.close()
        return recovered
    finally:
        lock.release()


def iter_report(report: ExportReport) -> Iterator[str]:
    """A person's summary of an export."""
    yield (
        f"exported {report.files} file(s), {report.directories} directory(ies), {report.symlinks} symlink(s)"
    )
    if report.without_content:
        yield f"{len(report.without_content)} file(s) had no local content (only the session had it):"
        yield from (f"  {path}" for path in report.without_content[:20])
    if report.moved:
        yield f"{len(report.moved)} object(s) were moved or renamed (old → new in {REPORT_NAME})"
    if report.removed:
        yield f"{len(report.removed)} path(s) were to be removed in the session (listed in {REPORT_NAME})"
