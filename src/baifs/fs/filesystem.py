"""The filesystem semantics: every POSIX operation on the local view, and when it reaches the session.

`Filesystem` is FUSE-agnostic: it works on `Node` objects and raises `FSError`
with an errno; `operations` adapts it to pyfuse3. It owns:

- directory listings with a TTL (``dir_ttl``), one request per directory at a
  time however many callers wait, merged into the tree without undoing local
  changes;
- opening, reading and writing: reads come from the staging file (content
  written here) or the cache (content from the session, fetched by
  `Fetcher`); the first write to a file stages a full copy of it;
- reading ahead of tree walks: a directory enumerated right after its
  parent (``ls -R``, ``find``, ``grep -r``, ``git status``) lists its
  siblings and children ahead, and a read miss in a directory just
  enumerated queues the small files that follow (and those of the next
  directory) for prefetch;
- namespace changes, recorded in the overlay (`model`) and the journal;
- write-back: a flush ``write_back`` seconds after the last change, leaving
  files still open for writing for later; ``fsync`` of one file uploads that
  file alone when it can; everything is flushed on ``fsyncdir``, on unmount
  and before runs.

Concurrency (one trio thread; handlers interleave only at ``await``):

- one flush at a time (``_flush_lock``). A flush that needs a script takes
  the session's execution slot *before* the flush lock, so waiting behind a
  user's long run never blocks an ``fsync``; while a run holds the slot,
  write-back uploads what needs no script and leaves the rest pending;
- while a flush changes the session (uploads, script), remote paths are in
  motion: listings wait for it or keep serving the previous listing
  (``_remote_quiet``), and a listing that was in flight meanwhile is taken
  again (``_remote_epoch``); namespace changes wait for a running script;
- the tree changes only between awaits, so a handler never sees a half-done
  change.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ..api.batch import BatchExecutor
from ..api.client import SessionClient, UploadFile
from ..api.errors import BaifsError, RemotePathError, SessionBusy
from .content import DIRECT_DOWNLOAD_MAX, CacheEntry, ContentStore
from .fetch import Fetcher, StaleContent
from .flush import (
    INLINE_SCRIPT_MAX,
    REMOTE_TMP,
    Flusher,
    FlushPlan,
    FlushReport,
    plan,
    plan_uploads,
    remote_name,
    restore,
    script,
)
from .journal import Journal, encode_path, overlay_state
from .model import ROOT_INODE, Namespace, Node, is_ancestor_or_self, join

log = logging.getLogger(__name__)

T = TypeVar("T")

NAME_MAX = 255
#: Names at the root of the session that the mount never shows (control files, flush scratch).
HIDDEN_AT_ROOT = {REMOTE_TMP, b".run", b".runs", b".baifs-status"}
RENAME_NOREPLACE = 1
WRITE_BACK_RETRY_MAX = 60.0
#: Enumerations and reads of a directory this close together are a scan (see `_note_scan`).
SCAN_WINDOW_SECONDS = 3.0
#: Listings taken ahead of a tree walk at the same time.
PREFETCH_LISTINGS = 4


class FSError(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


@dataclass
class MountOptions:
    attr_timeout: float = 1.0
    dir_ttl: float = 5.0
    negative_timeout: float = 1.0
    write_back: float = 1.5
    cache_limit: int = 2 * 1024**3
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int | None = None


@dataclass
class Handle:
    node: Node
    writable: bool
    append: bool
    fd: int
    #: the staging file the descriptor reads, or None for the cache entry.
    stage: str | None
    entry: CacheEntry | None = None


@dataclass
class FilesystemStats:
    flushes: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    scripts: int = 0
    flush_failures: int = 0
    last_flush_error: str = ""
    recovered_changes: int = 0


class Filesystem:
    def __init__(
        self,
        session: SessionClient,
        executor: BatchExecutor,
        store: ContentStore,
        journal: Journal,
        options: MountOptions,
    ) -> None:
        self.session = session
        self.executor = executor
        self.store = store
        self.journal = journal
        self.options = options
        self.namespace = Namespace()
        self.fetcher = Fetcher(session, executor, store)
        self.flusher = Flusher(session, executor, self.namespace, store)
        self.stats = FilesystemStats()
        self.handles: dict[int, Handle] = {}
        self._next_handle = 1
        self._listing: dict[int, trio.Event] = {}
        self._remote_epoch = 0
        self._remote_quiet = trio.Event()
        self._remote_quiet.set()
        self._script_idle = trio.Event()
        self._script_idle.set()
        self._flush_lock = trio.Lock()
        self._changed = trio.Event()
        self._last_change = 0.0
        self._nursery: trio.Nursery | None = None
        #: directories enumerated or read from, and when (see `_note_scan`).
        self._scanned: dict[int, float] = {}
        self._prefetch_limiter = trio.CapacityLimiter(PREFETCH_LISTINGS)
        #: flush directories a failed script left in the session.
        self.leftover_tmp: set[bytes] = set()
        #: called with nodes whose kernel entries must be dropped (set by the FUSE layer).
        self.invalidate: Callable[[list[Node]], None] = lambda nodes: None
        self.flush_progress: dict[str, Any] = {}

    # -- background work --------------------------------------------------

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.fetcher.run_workers)
            nursery.start_soon(self._write_back_loop)
            task_status.started()

    async def _write_back_loop(self) -> None:
        failures = 0
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            while (quiet := time.monotonic() - self._last_change) < self.options.write_back:
                await trio.sleep(self.options.write_back - quiet)
            try:
                report = await self.flush(skip_open_writers=True)
                failures = 0
            except BaifsError as error:
                failures += 1
                delay = min(WRITE_BACK_RETRY_MAX, self.options.write_back * 2**failures)
                log.error(
                    "write-back failed (%s); the changes stay pending; retrying in %.0f s", error, delay
                )
                await trio.sleep(delay)
                self._changed.set()
                continue
            if report.partial and self.namespace.pending_changes():
                # A run held the execution slot: what needs a script is still to do.
                await trio.sleep(self.options.write_back)
                self._changed.set()

    def _note_change(self) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    # -- listings ---------------------------------------------------------

    async def ensure_listed(self, directory: Node, *, force: bool = False) -> None:
        """Make ``directory``'s children current (within the TTL) with the session's listing."""
        if not directory.is_dir or directory.origin is None:
            return
        while True:
            age = time.monotonic() - directory.listed_at if directory.listed_at is not None else None
            if age is not None and not force:
                # Within the TTL, or our own flush is changing the session: the
                # tree already shows what the flush does, so the last listing serves.
                if age < self.options.dir_ttl or not self._remote_quiet.is_set():
                    return
            in_flight = self._listing.get(directory.inode)
            if in_flight is None:
                break
            await in_flight.wait()
            force = False
        done = trio.Event()
        self._listing[directory.inode] = done
        try:
            while True:
                await self._remote_quiet.wait()
                epoch = self._remote_epoch
                origin = directory.origin
                if origin is None or not directory.attached:
                    return
                try:
                    entries = await self.session.list_dir(origin.decode("utf-8", "surrogateescape"))
                except RemotePathError as error:
                    if error.errno in (errno.ENOENT, errno.ENOTDIR) and directory.inode != ROOT_INODE:
                        if epoch == self._remote_epoch:
                            self._vanished([directory])
                        raise FSError(errno.ENOENT) from error
                    raise
                if epoch == self._remote_epoch and directory.origin == origin:
                    hidden = HIDDEN_AT_ROOT if directory.inode == ROOT_INODE else set()
                    removed = self.namespace.merge_listing(directory, entries, hidden)
                    directory.listed_at = time.monotonic()
                    if removed:
                        self._discard_stages(removed)
                        self.invalidate(removed)
                    return
        finally:
            del self._listing[directory.inode]
            done.set()

    def _vanished(self, nodes: list[Node]) -> None:
        """Remote objects that something in the session removed behind our back."""
        gone = []
        for node in nodes:
            if node.parent is None or not node.attached or node.dirty:
                continue
            node.parent.listed_at = None
            self.namespace.detach(node)
            gone.append(node)
        self._discard_stages(gone)
        self.invalidate(gone)

    def expire_listings(self) -> None:
        """Every listing is stale from now on (after something changed the session)."""
        for node in self.namespace.walk(self.namespace.root):
            if node.is_dir:
                node.listed_at = None

    # -- lookups ----------------------------------------------------------

    def node(self, inode: int) -> Node:
        node = self.namespace.inodes.get(inode)
        if node is None:
            raise FSError(errno.ENOENT)
        return node

    async def refresh(self, node: Node) -> Node:
        """Revalidate a node's attributes through its parent's listing when stale."""
        if node.parent is not None and node.attached:
            await self._remote(self.ensure_listed(node.parent))
        return node

    async def lookup(self, parent: Node, name: bytes) -> Node:
        if not parent.is_dir:
            raise FSError(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        await self._remote(self.ensure_listed(parent))
        assert parent.children is not None
        child = parent.children.get(name)
        if child is None:
            raise FSError(errno.ENOENT)
        return child

    async def list_children(self, directory: Node) -> list[Node]:
        """A directory's entries, for readdir; a tree walk lists what comes next ahead of it."""
        if not directory.is_dir:
            raise FSError(errno.ENOTDIR)
        await self._remote(self.ensure_listed(directory))
        assert directory.children is not None
        parent = directory.parent
        if parent is not None and self._recently_scanned(parent):
            # A directory enumerated right after its parent: ls -R, find, du, grep -r, git status.
            ahead = [n for n in (*(parent.children or {}).values(), *directory.children.values()) if n.is_dir]
            self._prefetch_listings(ahead)
        self._note_scan(directory)
        return sorted(directory.children.values(), key=lambda n: n.name)

    def _note_scan(self, directory: Node) -> bool:
        """Remember that ``directory`` was enumerated or read from; whether it was a moment ago too.

        Within `SCAN_WINDOW_SECONDS` of each other, these are a scan: a tree
        walk, grep -r, an IDE indexing.
        """
        now = time.monotonic()
        recent = self._recently_scanned(directory)
        if len(self._scanned) > 10_000:
            self._scanned = {k: t for k, t in self._scanned.items() if now - t < SCAN_WINDOW_SECONDS}
        self._scanned[directory.inode] = now
        return recent

    def _recently_scanned(self, directory: Node) -> bool:
        return (
            time.monotonic() - self._scanned.get(directory.inode, -SCAN_WINDOW_SECONDS) < SCAN_WINDOW_SECONDS
        )

    def _prefetch_small_files(self, node: Node) -> None:
        """A scan reads the small files after this one, and in a tree walk those of the next directory."""
        directory = node.parent
        if directory is None:
            return
        siblings = [s for s in (directory.children or {}).values() if s is not node]
        self.fetcher.prefetch(siblings, after=node.name)
        parent = directory.parent
        if parent is None or not self._recently_scanned(parent):
            return
        following = sorted(
            (
                d
                for d in (parent.children or {}).values()
                if d.is_dir and d.name > directory.name and d.listed_at
            ),
            key=lambda d: d.name,
        )
        if following:
            self.fetcher.prefetch(list((following[0].children or {}).values()))

    def _prefetch_listings(self, directories: list[Node]) -> None:
        """List, in the background, directories whose listing is missing or stale."""
        now = time.monotonic()
        for directory in directories:
            stale = directory.listed_at is None or now - directory.listed_at >= self.options.dir_ttl
            if (
                stale
                and directory.origin is not None
                and directory.inode not in self._listing
                and self._nursery
            ):
                self._nursery.start_soon(self._list_quietly, directory)

    async def _list_quietly(self, directory: Node) -> None:
        async with self._prefetch_limiter:
            try:
                await self.ensure_listed(directory)
            except (FSError, BaifsError) as error:
                log.debug("listing ahead of %r: %s", directory.path, error)

    async def readlink(self, node: Node) -> bytes:
        if not node.is_symlink:
            raise FSError(errno.EINVAL)
        if node.target is None:
            node.target = await self._remote(self.fetcher.link_target(node))
        return node.target

    # -- content ----------------------------------------------------------

    async def open(self, node: Node, flags: int) -> tuple[int, Handle]:
        if node.is_dir:
            raise FSError(errno.EISDIR)
        if not node.is_regular:
            raise FSError(errno.ENXIO)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable:
            await self._stage(node, truncate=bool(flags & os.O_TRUNC))
        if node.stage is not None:
            mode = os.O_RDWR if writable else os.O_RDONLY
            handle = Handle(
                node, writable, bool(flags & os.O_APPEND), self._open_stage(node.stage, mode), node.stage
            )
        else:
            entry = await self._cached(node, whole=node.remote_size <= DIRECT_DOWNLOAD_MAX)
            entry.pins += 1
            handle = Handle(node, False, False, os.open(entry.file, os.O_RDONLY), None, entry)
        node.open_count += 1
        node.write_count += writable
        number = self._next_handle
        self._next_handle += 1
        self.handles[number] = handle
        return number, handle

    def _open_stage(self, stage: str, mode: int) -> int:
        return os.open(self.store.stage_path(stage), mode)

    async def _cached(self, node: Node, *, whole: bool) -> CacheEntry:
        """The cache entry of a node's remote content (complete when ``whole``)."""
        for attempt in range(2):
            if node.origin is None:
                raise FSError(errno.ENOENT)
            if node.remote_mtime_ns < 0 and node.parent is not None:
                await self._remote(self.ensure_listed(node.parent, force=True))
            try:
                if node.remote_size <= DIRECT_DOWNLOAD_MAX:
                    cached = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
                    if cached is not None and cached.complete:
                        return cached
                    if node.parent is not None and self._note_scan(node.parent):  # a second miss here
                        self._prefetch_small_files(node)
                    return await self._remote(self.fetcher.whole_small(node))
                entry = self.store.entry_for(node.origin, node.remote_size, node.remote_mtime_ns)
                if whole:
                    await self._remote(self.fetcher.ensure_all(entry))
                return entry
            except StaleContent as error:
                log.info("%s; listing again", error)
                if attempt or node.parent is None:
                    raise FSError(errno.EIO, "the file keeps changing in the session") from None
                await self._remote(self.ensure_listed(node.parent, force=True))
                if not node.attached:
                    raise FSError(errno.ENOENT) from None
        raise AssertionError("unreachable")

    async def read(self, number: int, offset: int, size: int) -> bytes:
        handle = self.handles[number]
        node = handle.node
        if node.stage is not None and handle.stage != node.stage:
            # Another descriptor gave the file local content: read that from now on.
            os.close(handle.fd)
            handle.fd, handle.stage = self._open_stage(node.stage, os.O_RDONLY), node.stage
        elif handle.stage is None and handle.entry is not None and not handle.entry.complete:
            try:
                await self._remote(self.fetcher.ensure_range(handle.entry, offset, size))
            except StaleContent as error:
                raise FSError(errno.EIO, str(error)) from None
        return os.pread(handle.fd, size, offset)

    async def write(self, number: int, offset: int, data: bytes) -> int:
        handle = self.handles[number]
        if not handle.writable:
            raise FSError(errno.EBADF)
        node = handle.node
        if handle.append:
            offset = node.size
        written = os.pwrite(handle.fd, data, offset)
        node.size = max(node.size, offset + written)
        self._touch_content(node)
        return written

    def _touch_content(self, node: Node) -> None:
        node.mtime_ns = node.ctime_ns = time.time_ns()
        node.content_version += 1
        node.dirty = True
        node.mtime_dirty = False
        if node.attached:
            self.namespace.pending.add(node)
            self._note_change()

    async def release(self, number: int) -> None:
        handle = self.handles.pop(number)
        os.close(handle.fd)
        node = handle.node
        node.open_count -= 1
        node.write_count -= handle.writable
        if handle.entry is not None:
            handle.entry.pins -= 1
            self.store.evict()
        if node.stage is not None and node.open_count == 0:
            if not node.attached:
                self.store.discard_stage(node.stage)
                node.stage = None
            elif not node.dirty and node.origin is not None:
                self.flusher.retire_stage(node)
        self.namespace.release_if_unused(node)
        if handle.writable:
            self._note_change()

    async def _stage(self, node: Node, *, truncate: bool) -> None:
        """Give a regular file a staging copy that writes can go to."""
        if node.stage is not None:
            if truncate and node.size:
                os.truncate(self.store.stage_path(node.stage), 0)
                node.size = 0
                self._touch_content(node)
            return
        source = None
        if not truncate and node.remote_size > 0:
            source = (await self._cached(node, whole=True)).file
        stage = await trio.to_thread.run_sync(
            self.store.stage_from, source, 0 if truncate else node.remote_size
        )
        try:
            self.journal.record("stage", path=encode_path(node.path), stage=stage)
        except OSError:
            self.store.discard_stage(stage)
            raise
        node.stage = stage
        if truncate:
            node.size = 0
            self._touch_content(node)

    async def fsync(self, node: Node) -> None:
        """Return once this file (and what it depends on) is on the session."""
        if not node.attached or node not in self.namespace.pending:
            return
        await self.journal.sync()
        path = node.path
        for other in list(self.namespace.pending):
            if other is not node and other.moved and other.origin == path and other.is_regular:
                await self._localize(other)
        async with self._flush_lock:
            flush_plan = plan_uploads(self.namespace, [node])
            if flush_plan.uploaded(node):
                await self._carry_out(flush_plan, slot_held=False)
            else:
                restore(self.namespace, flush_plan)
        if node not in self.namespace.pending:
            return
        try:
            await self.flush()
        except FlushFailed:
            if node in self.namespace.pending:
                raise

    async def _localize(self, node: Node) -> None:
        """Turn a moved remote file into local content, so its old name can be overwritten.

        Editors save by renaming the file to a backup name and writing a new
        file; uploading the new file over the old remote name then needs no
        ``mv`` in the session, provided the backup's content is known here.
        """
        assert node.origin is not None
        entry = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
        if entry is None or not entry.complete:
            return
        node.stage = await trio.to_thread.run_sync(self.store.stage_from, entry.file, node.remote_size)
        self.namespace.doomed[node.origin] = node.remote_mode if node.remote_mode >= 0 else node.mode
        node.origin = None
        node.remote_mode = -1
        node.dirty = True
        self.journal.record("stage", path=encode_path(node.path), stage=node.stage)
        self.namespace.refresh_pending(node)

    # -- namespace changes ------------------------------------------------

    async def _changing(self, parent: Node, name: bytes) -> None:
        """Common checks and waits before a change in ``parent``."""
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        if not parent.is_dir:
            raise FSError(errno.ENOTDIR)
        if not parent.attached:
            raise FSError(errno.ENOENT)
        await self._remote(self.ensure_listed(parent))
        await self._script_idle.wait()

    async def _new_name(self, parent: Node, name: bytes) -> None:
        await self._changing(parent, name)
        assert parent.children is not None
        if name in parent.children:
            raise FSError(errno.EEXIST)

    async def create(self, parent: Node, name: bytes, mode: int, flags: int) -> tuple[int, Handle]:
        stage = self.store.new_stage()
        node = await self._add(parent, name, stat.S_IFREG | stat.S_IMODE(mode), stage=stage)
        node.stage = stage
        return await self.open(node, flags & ~os.O_TRUNC)

    async def mkdir(self, parent: Node, name: bytes, mode: int) -> Node:
        return await self._add(parent, name, stat.S_IFDIR | stat.S_IMODE(mode))

    async def symlink(self, parent: Node, name: bytes, target: bytes) -> Node:
        node = await self._add(parent, name, stat.S_IFLNK | 0o777, target=encode_path(target))
        node.target = target
        node.size = len(target)
        return node

    async def _add(self, parent: Node, name: bytes, mode: int, **record: str) -> Node:
        """A new object: journalled first (a full disk fails here, before the tree changes)."""
        try:
            await self._new_name(parent, name)
            self.journal.record("create", path=encode_path(join(parent.path, name)), mode=mode, **record)
        except BaseException:
            if "stage" in record:
                self.store.discard_stage(record["stage"])
            raise
        node = self.namespace.add_local(parent, name, mode)
        self._note_change()
        return node

    async def _child(self, parent: Node, name: bytes) -> Node:
        """The child a change applies to, once no script runs: no await may follow this."""
        await self._changing(parent, name)
        assert parent.children is not None
        child = parent.children.get(name)
        if child is None:
            raise FSError(errno.ENOENT)
        return child

    async def unlink(self, parent: Node, name: bytes) -> None:
        node = await self._child(parent, name)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        self.remove_tree(node)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        node = await self._child(parent, name)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        await self._remote(self.ensure_listed(node))
        node = await self._child(parent, name)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        if node.children:
            raise FSError(errno.ENOTEMPTY)
        self.remove_tree(node)

    def remove_tree(self, node: Node) -> None:
        """Take a node (and what is below it) out of the view; its remote objects are doomed."""
        self.journal.record("remove", path=encode_path(node.path))
        self._drop_subtree(node)
        self._note_change()

    def _drop_subtree(self, node: Node) -> None:
        """Remove a subtree from the tree (dooming its remote objects) with its local content."""
        gone = list(self.namespace.walk(node))
        self.namespace.remove(node)
        self._discard_stages(gone)
        for each in gone:
            if each.origin is not None:
                self.store.forget(each.origin)

    def _discard_stages(self, nodes: list[Node]) -> None:
        """Local content of nodes that left the tree, unless a descriptor still uses it."""
        for node in nodes:
            if node.stage is not None and node.open_count == 0:
                self.store.discard_stage(node.stage)
                node.stage = None

    async def rename(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        if flags & ~RENAME_NOREPLACE:  # RENAME_EXCHANGE and RENAME_WHITEOUT are not supported
            raise FSError(errno.EINVAL)
        await self._changing(new_parent, new_name)
        existing = (new_parent.children or {}).get(new_name)
        if existing is not None and existing.is_dir:
            await self._remote(self.ensure_listed(existing))
        node = await self._child(parent, name)
        assert new_parent.children is not None
        if not new_parent.attached:
            raise FSError(errno.ENOENT)
        ancestor: Node | None = new_parent
        while ancestor is not None:
            if ancestor is node:
                raise FSError(errno.EINVAL)
            ancestor = ancestor.parent
        target = new_parent.children.get(new_name)
        if target is node:
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FSError(errno.EEXIST)
            if node.is_dir and not target.is_dir:
                raise FSError(errno.ENOTDIR)
            if target.is_dir and not node.is_dir:
                raise FSError(errno.EISDIR)
            if target.is_dir and (target.children or target.listed_at is None and target.origin is not None):
                raise FSError(errno.ENOTEMPTY)
        self.journal.record(
            "rename", old=encode_path(node.path), new=encode_path(join(new_parent.path, new_name))
        )
        if target is not None:
            self._drop_subtree(target)
        self.namespace.rename(node, new_parent, new_name)
        self._note_change()

    async def setattr(
        self,
        node: Node,
        *,
        size: int | None = None,
        mode: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
    ) -> Node:
        await self._script_idle.wait()
        if size is not None:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            if not node.is_regular:
                raise FSError(errno.EINVAL)
            await self._stage(node, truncate=size == 0)
            assert node.stage is not None
            os.truncate(self.store.stage_path(node.stage), size)
            node.size = size
            self._touch_content(node)
        if mode is not None or mtime_ns is not None:
            record: dict[str, int] = {}
            if mode is not None:
                record["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            if mtime_ns is not None:
                record["mtime_ns"] = mtime_ns
            self.journal.record("meta", path=encode_path(node.path), **record)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            node.ctime_ns = time.time_ns()
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
            node.mtime_dirty = True
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mode is not None or mtime_ns is not None:
            self.namespace.refresh_pending(node)
            self._note_change()
        return node

    # -- flushing ---------------------------------------------------------

    async def flush(
        self, *, skip_open_writers: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> FlushReport:
        """Push pending changes to the session.

        While a user's run holds the execution slot, a write-back flush
        (``skip_open_writers``) uploads what needs no script and returns; every
        other flush waits for the slot.
        """
        if skip_open_writers and self.executor.busy:
            async with self._flush_lock:
                staged = [n for n in self.namespace.pending if n.dirty and n.write_count == 0]
                flush_plan = plan_uploads(self.namespace, staged)
                report = await self._carry_out(flush_plan, slot_held=False, progress=progress)
                report.partial = True
                return report
        async with self.executor.slot():
            return await self.flush_in_slot(skip_open_writers=skip_open_writers, progress=progress)

    async def flush_in_slot(
        self, *, skip_open_writers: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> FlushReport:
        """A full flush by a caller that holds the session's execution slot (a run's barrier)."""
        async with self._flush_lock:
            open_writers = {n for n in self.namespace.pending if n.write_count > 0}
            flush_plan = plan(
                self.namespace,
                defer=open_writers if skip_open_writers else (),
                litter=self._litter(),
            )
            return await self._carry_out(flush_plan, slot_held=True, progress=progress)

    def _litter(self) -> list[bytes]:
        """Scratch directories in the session that nothing refers to any more."""
        self.leftover_tmp.update(self.fetcher.take_litter())
        referenced = [n.origin for n in self.namespace.pending if n.origin is not None]
        free = {
            tmp
            for tmp in self.leftover_tmp
            if not any(is_ancestor_or_self(tmp, origin) for origin in referenced)
        }
        self.leftover_tmp -= free
        return sorted(free)

    async def _carry_out(
        self, flush_plan: FlushPlan, *, slot_held: bool, progress: Callable[[int, int], None] | None = None
    ) -> FlushReport:
        """Upload, run the script (in the slot the caller holds), record the outcome."""
        report = FlushReport()
        if flush_plan.empty and not flush_plan.litter:
            return report
        self.flush_progress = {
            "files_total": len(flush_plan.uploads),
            "bytes_total": flush_plan.upload_bytes,
            "files_done": 0,
            "bytes_done": 0,
        }

        def on_progress(files: int, size: int) -> None:
            self.flush_progress.update(files_done=files, bytes_done=size)
            if progress is not None:
                progress(files, size)

        results = None
        shell = script(flush_plan) if slot_held and (flush_plan.needs_script or flush_plan.litter) else None
        script_file, extra = None, []
        if shell is not None and len(rendered := shell.render().encode()) > INLINE_SCRIPT_MAX:
            script_file = join(flush_plan.tmp, b"flush.sh")
            extra.append(UploadFile.of(remote_name(script_file), rendered))
        self._remote_quiet = trio.Event()
        self._remote_epoch += 1
        try:
            listings = await self.flusher.upload(flush_plan, report, on_progress, extra)
            if shell is not None:
                self.journal.record(
                    "script", moves=[[encode_path(m.origin), encode_path(m.parked)] for m in flush_plan.moves]
                )
                self._script_idle = trio.Event()
                try:
                    results = await self.flusher.run_script(shell, script_file)
                finally:
                    self._script_idle.set()
                report.script_ran = True
        except BaifsError as error:
            self.stats.flush_failures += 1
            self.stats.last_flush_error = str(error)
            restore(self.namespace, flush_plan)
            self.leftover_tmp.update(flush_plan.litter)
            raise
        finally:
            self._remote_epoch += 1
            self._remote_quiet.set()
            self.flush_progress = {}
        self.flusher.apply(flush_plan, listings, results, report)
        await self.journal.checkpoint(overlay_state(self.namespace))
        self.stats.flushes += 1
        self.stats.uploaded_files += report.uploaded_files
        self.stats.uploaded_bytes += report.uploaded_bytes
        self.stats.scripts += report.script_ran
        if report.vanished:
            log.warning(
                "%d object(s) disappeared from the session before the flush reached them",
                len(report.vanished),
            )
            self._vanished(report.vanished)
        if report.failed_steps:
            if report.left_tmp:
                self.leftover_tmp.add(flush_plan.tmp)
            self.leftover_tmp.update(flush_plan.litter)
            self.stats.flush_failures += 1
            self.stats.last_flush_error = "; ".join(report.failed_steps[:3])
            self.expire_listings()
            raise FlushFailed(
                f"{len(report.failed_steps)} change(s) failed in the session: {self.stats.last_flush_error}"
            )
        return report

    async def flush_all(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Flush until nothing is pending (changes made meanwhile included), scratch removed."""
        for _ in range(10):
            if not self.namespace.pending_changes() and not self.leftover_tmp and not self.fetcher.has_litter:
                return
            await self.flush(progress=progress)

    async def _remote(self, awaitable: Awaitable[T]) -> T:
        """Await a remote operation; API failures become EIO (logged), busy slots EAGAIN."""
        try:
            return await awaitable
        except (FSError, StaleContent):
            raise
        except SessionBusy as error:
            log.warning("%s", error)
            raise FSError(errno.EAGAIN, str(error)) from error
        except RemotePathError as error:
            raise FSError(error.errno or errno.EIO, str(error)) from error
        except BaifsError as error:
            log.error("remote operation failed: %s", error)
            raise FSError(errno.EIO, str(error)) from error


class FlushFailed(BaifsError):
    """Some changes of a flush could not be applied in the session; they stay pending."""
