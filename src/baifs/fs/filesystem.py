"""The filesystem semantics: every POSIX operation on the local view, and when it needs the session.

`Filesystem` is FUSE-agnostic: it works on `Node` objects and raises `FSError`
with an errno; `operations` adapts it to pyfuse3; `sync` pushes what it
changes to the session. It owns:

- directory listings with a TTL (``dir_ttl``), one request per directory at a
  time however many callers wait, taken in the background and merged into
  the tree without undoing local changes. A stale listing keeps serving
  while its successor is slow (over `STALE_GRACE_SECONDS`) or the session is
  away, so what the mount knows (files it made or listed) stays usable;
- opening, reading and writing: reads come from the staging file (content
  written here) or the cache (content from the session, fetched by
  `Fetcher`); the first write to a file stages a full copy of it; an open
  descriptor follows the file's current content, so its size and what it
  reads agree after the session changed the file;
- reading ahead of tree walks: a directory enumerated right after its
  parent (``ls -R``, ``find``, ``grep -r``, ``git status``) lists its
  siblings and children ahead, and a read miss in a directory just
  enumerated queues the small files that follow (and those of the next
  directory) for prefetch;
- namespace changes, recorded in the overlay (`model`) and the journal, and
  handed to the sync engine (`sync`) as changes to push.

Every wait for the session in a system call is bounded by the session's
progress (`watchdog`): no call waits more than 20 s for a session that does
not answer.

Concurrency: one trio thread; handlers interleave only at ``await``, and the
tree changes only between awaits, so a handler never sees a half-done
change. Changes may go on while a flush runs: the sync engine commits what
the session confirmed wherever the nodes went meanwhile.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ..api.batch import BatchExecutor
from ..api.client import SessionClient
from ..api.errors import BaifsError, RemotePathError, SessionBusy
from ..concurrency import keep_running
from .content import DIRECT_DOWNLOAD_MAX, CacheEntry, ContentStore
from .fetch import Fetcher, StaleContent
from .flush import REMOTE_TMP
from .journal import Journal, content_base, encode_path
from .model import ROOT_INODE, Namespace, Node, join
from .profile import PROBE_PREFIX, ProfileKeeper
from .supervisor import Supervisor
from .sync import SyncEngine
from .watchdog import Watchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

NAME_MAX = 255
#: Names at the root of the session that the mount never shows (control files, flush scratch).
HIDDEN_AT_ROOT = {REMOTE_TMP, b".run", b".runs", b".baifs-status"}
PROBE_NAME = PROBE_PREFIX.decode("ascii")
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: ``listed_at`` of a directory whose listing is known but must be taken again.
LISTING_EXPIRED = -math.inf
#: How long a stale listing waits for its successor before it serves as it is
#: (shorter once the session is known to be away: if it is back, it answers at once).
STALE_GRACE_SECONDS = 2.0
STALE_GRACE_AWAY_SECONDS = 0.3
#: How long a system call waits for the execution slot when a run holds it.
SLOT_WAIT_SECONDS = 20.0
#: Enumerations and reads of a directory this close together are a scan (see `_note_scan`).
SCAN_WINDOW_SECONDS = 3.0
#: Listings taken ahead of a tree walk at the same time.
PREFETCH_LISTINGS = 4
#: How many names after the current one a scan looks at for what to fetch ahead
#: (bounds the work per operation in directories of any size).
LOOK_AHEAD = 256


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
    #: the descriptor returned content of ``entry`` (its version) to its reader.
    served: bool = False


@dataclass
class Listing:
    """A listing on its way; the callers that wait for it read ``error`` when it is done."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Filesystem:
    def __init__(
        self,
        session: SessionClient,
        executor: BatchExecutor,
        store: ContentStore,
        journal: Journal,
        options: MountOptions,
        profiles: ProfileKeeper,
    ) -> None:
        self.session = session
        self.executor = executor
        self.store = store
        self.journal = journal
        self.options = options
        self.namespace = Namespace()
        self.supervisor = Supervisor(session, executor)
        executor.liveness = self.supervisor.heartbeat
        self.fetcher = Fetcher(session, self.supervisor, store)
        self.sync = SyncEngine(
            session,
            executor,
            self.namespace,
            store,
            journal,
            self.fetcher,
            profiles,
            self.supervisor,
            write_back=options.write_back,
            on_vanished=self._vanished,
            expire_listings=self.expire_listings,
        )
        self.watchdog = Watchdog(session.connection.health)
        self.handles: dict[int, Handle] = {}
        self._next_handle = 1
        self._listing: dict[int, Listing] = {}
        #: one staging copy brought to the session's content at a time (`_follow_session`).
        self._following = trio.Lock()
        self._nursery: trio.Nursery | None = None
        #: directories enumerated or read from, and when, oldest first (see `_note_scan`).
        self._scanned: OrderedDict[int, float] = OrderedDict()
        #: listings merged before this moment are stale (`expire_listings`).
        self._listings_expired_at = -math.inf
        self._prefetch_limiter = trio.CapacityLimiter(PREFETCH_LISTINGS)
        #: called with nodes whose kernel entries must be dropped (set by the FUSE layer).
        self.invalidate: Callable[[list[Node]], None] = lambda nodes: None

    # -- background work --------------------------------------------------

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Downloads, write-back, the watchdog and listings taken for callers; until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(keep_running, "the download workers", self.fetcher.run_workers)
                nursery.start_soon(keep_running, "write-back", self.sync.run_write_back)
                nursery.start_soon(keep_running, "the watchdog", self.watchdog.run)
                task_status.started()
        finally:
            self._nursery = None  # from now on listings are taken by their callers

    def _note_change(self) -> None:
        self.sync.note_change()

    # -- listings ---------------------------------------------------------

    async def ensure_listed(self, directory: Node, *, force: bool = False) -> None:
        """Make ``directory``'s children current (within the TTL) with the session's listing.

        A stale listing serves while its successor is slow or the session is
        away; the successor still lands in the background.
        """
        if not directory.is_dir or directory.origin is None:
            return
        motion = self.sync.motion
        while True:
            stale = directory.listed_at is not None and not force
            if stale:
                # Within the TTL, or our own flush is changing the session: the
                # tree already shows what the flush does, so the last listing serves.
                if self._listing_age(directory) < self.options.dir_ttl or not motion.quiet.is_set():
                    return
            listing = self._listing.get(directory.inode)
            joined = listing is not None
            if listing is None:
                listing = self._listing[directory.inode] = Listing()
                if self._nursery is None:  # before the background runs (recovery): take it here
                    await self._take_listing(directory, listing)
                else:
                    self._nursery.start_soon(self._take_listing, directory, listing)
            if stale:
                away = self.session.connection.health.away
                grace = STALE_GRACE_AWAY_SECONDS if away else STALE_GRACE_SECONDS
                with trio.move_on_after(grace):
                    await listing.done.wait()
                if not listing.done.is_set():
                    return  # served stale; the listing lands when it can
            else:
                await listing.done.wait()
            error = listing.error
            if error is None:
                if joined and force:
                    force = False  # it may have started before we asked: check its age again
                    continue
                return
            if stale and not isinstance(error, FSError | RemotePathError):
                log.warning("listing %r failed (%s); serving the last one", directory.path, error)
                return
            raise error

    async def _take_listing(self, directory: Node, listing: Listing) -> None:
        """One listing of a directory, merged unless a flush moved remote paths meanwhile."""
        motion = self.sync.motion
        try:
            while True:
                await motion.quiet.wait()
                epoch = motion.epoch
                origin = directory.origin
                if origin is None or not directory.attached:
                    return
                try:
                    entries = await self.fetcher.aliases.list_dir(origin)
                except RemotePathError as error:
                    if error.errno in (errno.ENOENT, errno.ENOTDIR) and directory.inode != ROOT_INODE:
                        if epoch == motion.epoch:
                            self._vanished([directory])
                        if not directory.attached or directory.origin is not None:
                            listing.error = FSError(errno.ENOENT)
                        # else: kept for the local changes in it, it is all there is to list
                        return
                    raise
                if epoch == motion.epoch and directory.origin == origin:
                    self._merge(directory, entries)
                    return
        except Exception as error:  # handed to every caller that waits for this listing
            listing.error = error
        finally:
            del self._listing[directory.inode]
            listing.done.set()

    def _merge(self, directory: Node, entries: list[Any]) -> None:
        hidden: set[bytes] = set()
        if directory.inode == ROOT_INODE:  # baifs's own names, and discovery's probe while it lives
            probes = [e.name for e in entries if e.name.startswith(PROBE_NAME)]
            hidden = HIDDEN_AT_ROOT | {name.encode("utf-8", "surrogateescape") for name in probes}
        merged = self.namespace.merge_listing(directory, entries, hidden)
        directory.listed_at = time.monotonic()
        for stage in merged.stale:
            self.store.discard_stage(stage)
        if merged.removed:
            self._discard_stages(merged.removed)
            self.invalidate(merged.removed)
        for child in (directory.children or {}).values():
            if (
                child.stage is not None
                and not child.dirty
                and child.open_count == 0
                and child.origin is not None
            ):
                self.sync.committer.retire_stage(child)  # its mtime is known now

    def _vanished(self, nodes: list[Node]) -> None:
        """Remote objects that something in the session removed behind our back."""
        gone = []
        for node in nodes:
            if node.parent is None or not node.attached or node.origin is None:
                continue
            node.parent.listed_at = LISTING_EXPIRED
            gone += self.namespace.lose_remote(node)
        self._discard_stages(gone)
        self.invalidate(gone)

    def expire_listings(self) -> None:
        """Every listing is stale from now on (after something changed the session); O(1)."""
        self._listings_expired_at = time.monotonic()

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
        children = directory.children
        assert children is not None
        parent = directory.parent
        if parent is not None and self._recently_scanned(parent):
            # A directory enumerated right after its parent: ls -R, find, du, grep -r, git status.
            # List ahead its first subdirectories and the siblings that follow it.
            inside = [node for node in self._scan_order(directory) if node.is_dir]
            following = [
                node for node in self._scan_order(parent, after=directory.name, wrap=False) if node.is_dir
            ]
            self._prefetch_listings(inside[:PREFETCH_LISTINGS] + following[: 2 * PREFETCH_LISTINGS])
        self._note_scan(directory)
        return [children[name] for name in self.namespace.in_order(directory)]

    def _scan_order(self, directory: Node, *, after: bytes = b"", wrap: bool = True) -> Iterator[Node]:
        """Up to `LOOK_AHEAD` children in the order a scan meets them: the names after ``after`` first,
        then (``wrap``) those before it."""
        names = self.namespace.in_order(directory)
        children = directory.children or {}
        start = bisect.bisect_right(names, after)
        order = itertools.chain(
            itertools.islice(names, start, None), itertools.islice(names, start if wrap else 0)
        )
        for name in itertools.islice(order, LOOK_AHEAD):
            if name != after:
                yield children[name]

    def _note_scan(self, directory: Node) -> bool:
        """Remember that ``directory`` was enumerated or read from; whether it was a moment ago too.

        Within `SCAN_WINDOW_SECONDS` of each other, these are a scan: a tree
        walk, grep -r, an IDE indexing. Entries older than that leave from the
        front of ``_scanned`` (kept in time order), a constant cost per entry.
        """
        now = time.monotonic()
        recent = self._recently_scanned(directory)
        self._scanned[directory.inode] = now
        self._scanned.move_to_end(directory.inode)
        while self._scanned:
            inode, seen = next(iter(self._scanned.items()))
            if now - seen < SCAN_WINDOW_SECONDS:
                break
            del self._scanned[inode]
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
        self.fetcher.prefetch(self._scan_order(directory, after=node.name))
        parent = directory.parent
        if parent is None or not self._recently_scanned(parent):
            return
        following = self._scan_order(parent, after=directory.name, wrap=False)
        listed = next((d for d in following if d.is_dir and d.listed_at is not None), None)
        if listed is not None:
            self.fetcher.prefetch(self._scan_order(listed))

    def _listing_age(self, directory: Node) -> float:
        """Seconds since the directory's listing was merged (infinite if expired or never taken)."""
        listed_at = directory.listed_at
        if listed_at is None or listed_at <= self._listings_expired_at:
            return math.inf
        return time.monotonic() - listed_at

    def _prefetch_listings(self, directories: list[Node]) -> None:
        """List, in the background, directories whose listing is missing or stale."""
        for directory in directories:
            if (
                self._listing_age(directory) >= self.options.dir_ttl
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
        await self._follow_session(node)
        if node.stage is not None:
            if handle.stage != node.stage:
                # Another descriptor gave the file local content: read that from now on.
                self._switch(handle, self._open_stage(node.stage, os.O_RDONLY), node.stage, None)
        elif node.origin is not None and (handle.entry is None or self._superseded(handle.entry, node)):
            # The session's content is newer than what this descriptor read so far
            # (a run appended to a log): read the current version, as fstat shows it.
            # A version that did not grow was rewritten: what was read of the old one
            # is not part of it, and the reader gets an error instead of a mix.
            if handle.served and handle.entry is not None and node.remote_size <= handle.entry.size:
                raise FSError(errno.EIO, "the file was rewritten in the session while it was read")
            entry = await self._cached(node, whole=node.remote_size <= DIRECT_DOWNLOAD_MAX)
            self._switch(handle, os.open(entry.file, os.O_RDONLY), None, entry)
        if handle.stage is None and handle.entry is not None and not handle.entry.complete:
            try:
                await self._remote(self.fetcher.ensure_range(handle.entry, offset, size))
            except StaleContent as error:
                # The version this descriptor reads is gone from the session: its reader
                # gets an error, not the rest of another version; the next open reads the
                # current one, which a listing now names.
                log.info("%s; listing again, the read fails", error)
                if node.parent is not None:
                    await self._remote(self.ensure_listed(node.parent, force=True))
                raise FSError(errno.EIO, str(error)) from None
        handle.served = handle.stage is None
        return os.pread(handle.fd, size, offset)

    @staticmethod
    def _superseded(entry: CacheEntry, node: Node) -> bool:
        return node.remote_mtime_ns >= 0 and (entry.remote_path, entry.size, entry.mtime_ns) != (
            node.origin,
            node.remote_size,
            node.remote_mtime_ns,
        )

    def _switch(self, handle: Handle, fd: int, stage: str | None, entry: CacheEntry | None) -> None:
        """Point a descriptor at other content (a staging file, or a cache entry)."""
        os.close(handle.fd)
        if handle.entry is not None:
            handle.entry.pins -= 1
        if entry is not None:
            entry.pins += 1
        handle.fd, handle.stage, handle.entry = fd, stage, entry

    async def write(self, number: int, offset: int, data: bytes) -> int:
        handle = self.handles[number]
        if not handle.writable:
            raise FSError(errno.EBADF)
        node = handle.node
        await self._follow_session(node)
        if handle.append:
            offset = node.size
        written = os.pwrite(handle.fd, data, offset)
        node.size = max(node.size, offset + written)
        self._touch_content(node)
        return written

    async def _follow_session(self, node: Node) -> None:
        """Bring the staging copy of a file open for writing, not written yet, to the session's content.

        A listing showed the session's file changed (a run appended to it)
        since the copy was made at open: the copy is rewritten in place, so
        every descriptor on it reads the session's version and a local
        append extends it, instead of writing the old one back over it.
        """
        if not node.stage_stale:
            return
        async with self._following:
            if not node.stage_stale or node.stage is None:
                return
            source = (await self._cached(node, whole=True)).file if node.remote_size > 0 else None
            await trio.to_thread.run_sync(self.store.refill_stage, node.stage, source)
            node.stage_stale = False

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
            if not node.attached or node.stage_stale:
                self.store.discard_stage(node.stage)  # gone, or older than the session's content
                node.stage, node.stage_stale = None, False
            elif not node.dirty and node.origin is not None:
                self.sync.committer.retire_stage(node)
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
            self.journal.record("stage", path=encode_path(node.path), stage=stage, base=content_base(node))
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
        await self._remote(self.sync.fsync(node, slot_timeout=SLOT_WAIT_SECONDS))

    async def flush_everything(self) -> None:
        """``fsyncdir`` and ``baifs sync``: return once everything is on the session."""
        await self.journal.sync()
        await self._remote(self.sync.flush_all(slot_timeout=SLOT_WAIT_SECONDS))

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

    async def mkfifo(self, parent: Node, name: bytes, mode: int) -> Node:
        """A FIFO, made in the session by the flush's script (opened here, it is a local pipe)."""
        return await self._add(parent, name, stat.S_IFIFO | stat.S_IMODE(mode))

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
        parent.entries_changed(node.ctime_ns)
        self._note_change()
        return node

    async def _child(self, parent: Node, name: bytes) -> Node:
        """The child a change applies to: no await may follow this."""
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
        if node.parent is not None:
            node.parent.entries_changed(time.time_ns())
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
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FSError(errno.EINVAL)  # RENAME_WHITEOUT is for overlay file systems
        await self._changing(new_parent, new_name)
        existing = (new_parent.children or {}).get(new_name)
        if existing is not None and existing.is_dir:
            await self._remote(self.ensure_listed(existing))
        node = await self._child(parent, name)
        assert new_parent.children is not None
        if not new_parent.attached:
            raise FSError(errno.ENOENT)
        if new_parent.within(node):
            raise FSError(errno.EINVAL)  # into its own subtree
        target = new_parent.children.get(new_name)
        if flags & RENAME_EXCHANGE:
            await self._exchange(node, target)
            return
        if target is node:
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise FSError(errno.EEXIST)
            if node.is_dir and not target.is_dir:
                raise FSError(errno.ENOTDIR)
            if target.is_dir and not node.is_dir:
                raise FSError(errno.EISDIR)
            if target.is_dir and (target.children or not target.children_known):
                raise FSError(errno.ENOTEMPTY)
        self.journal.record(
            "rename", old=encode_path(node.path), new=encode_path(join(new_parent.path, new_name))
        )
        if target is not None:
            self._drop_subtree(target)
        now = time.time_ns()
        parent.entries_changed(now)
        new_parent.entries_changed(now)
        node.ctime_ns = now
        self.namespace.rename(node, new_parent, new_name)
        self._note_change()

    async def _exchange(self, node: Node, other: Node | None) -> None:
        """RENAME_EXCHANGE: both names stay, their objects (and inode numbers) swap places."""
        if other is None:
            raise FSError(errno.ENOENT)
        if other is node:
            return
        if node.parent is not None and node.parent.within(other):
            raise FSError(errno.EINVAL)  # the other one holds this one
        self.journal.record("rename", old=encode_path(node.path), new=encode_path(other.path), exchange=1)
        now = time.time_ns()
        for each in (node, other):
            each.ctime_ns = now
            assert each.parent is not None
            each.parent.entries_changed(now)
        self.namespace.exchange(node, other)
        self._note_change()

    async def setattr(
        self,
        node: Node,
        *,
        size: int | None = None,
        mode: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
        owner: tuple[int, int] | None = None,
    ) -> Node:
        """truncate, chmod, utimensat and chown. The owner is kept for the mount's life only."""
        if size is not None:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            if not node.is_regular:
                raise FSError(errno.EINVAL)
            await self._follow_session(node)
            await self._stage(node, truncate=size == 0)
            assert node.stage is not None
            os.truncate(self.store.stage_path(node.stage), size)
            node.size = size
            self._touch_content(node)
        # What the session stores (and the journal keeps until it does); the owner is local only.
        stored = {
            key: value
            for key, value in (
                ("mode", None if mode is None else stat.S_IFMT(node.mode) | stat.S_IMODE(mode)),
                ("mtime_ns", mtime_ns),
                ("atime_ns", atime_ns),
            )
            if value is not None
        }
        if stored:
            self.journal.record("meta", path=encode_path(node.path), **stored)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
            node.mtime_dirty = True
        if atime_ns is not None:
            node.atime_ns = atime_ns
            node.atime_dirty = True
        if owner is not None:
            node.owner = owner
        if stored or owner is not None:
            node.ctime_ns = time.time_ns()
        if stored:
            self.namespace.refresh_pending(node)
            self._note_change()
        return node

    # -- the session ------------------------------------------------------

    async def _remote(self, awaitable: Awaitable[T]) -> T:
        """Await a remote operation for a system call, bounded by the session's progress.

        API failures become EIO (logged), a run holding the execution slot
        EAGAIN, a path the session refused its errno.
        """
        try:
            with self.watchdog.bounded():
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
