"""Open files: descriptors, and the content they read and write.

A descriptor reads the file's staging copy (content written here) or a
cache entry (content from the session, brought by `fetch`). The first write
to a file stages a full copy of it, so a flush always uploads whole files.
A descriptor follows the file's current content: after another descriptor
gave the file local content it reads that; after the session changed the
file (a run appended to a log) it reads the session's version, as fstat
shows it, and a version that did not grow fails the read (EIO) instead of
mixing two. A file open for writing and not written yet follows the
session's content too (`follow_session`), so a local append extends the
session's version rather than writing the old one back over it.

Content changes reach the overlay (`overlay.Overlay.stage`,
`content_changed`, `released`); waits for the session are bounded by its
progress (`errors.bounded`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .content import DIRECT_DOWNLOAD_MAX, CacheEntry, ContentStore
from .errors import FSError, StaleContent, bounded
from .fetch import Fetcher
from .listing import Listings
from .model import Node
from .overlay import Overlay
from .readahead import ReadAhead
from .watchdog import Watchdog

log = logging.getLogger(__name__)


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


class Handles:
    def __init__(
        self,
        overlay: Overlay,
        store: ContentStore,
        fetcher: Fetcher,
        listings: Listings,
        readahead: ReadAhead,
        watchdog: Watchdog,
        resolve: Callable[[], Awaitable[None]],
    ) -> None:
        self.overlay = overlay
        self.store = store
        self.fetcher = fetcher
        self.listings = listings
        self.readahead = readahead
        self.watchdog = watchdog
        #: reads what an unresolved flush did (`sync.SyncEngine.resolve`), for a file it may have moved.
        self.resolve = resolve
        self._table: dict[int, Handle] = {}
        self._next = 1
        #: one staging copy brought to the session's content at a time (`follow_session`).
        self._following = trio.Lock()

    def get(self, number: int) -> Handle | None:
        return self._table.get(number)

    async def open(self, node: Node, flags: int) -> tuple[int, Handle]:
        if node.is_dir:
            raise FSError(errno.EISDIR)
        if not node.is_regular:
            raise FSError(errno.ENXIO)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable:
            await self.stage(node, truncate=bool(flags & os.O_TRUNC))
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
        number = self._next
        self._next += 1
        self._table[number] = handle
        return number, handle

    def new_stage(self) -> str:
        """An empty staging file, for a file made here."""
        return self.store.new_stage()

    def _open_stage(self, stage: str, mode: int) -> int:
        return os.open(self.store.stage_path(stage), mode)

    async def _cached(self, node: Node, *, whole: bool) -> CacheEntry:
        """The cache entry of a node's remote content (complete when ``whole``).

        Content that is not what the listing said (or not there) is listed again once; while a
        flush's outcome is unknown, what that flush did is read first (it may have moved the file).
        """
        attempts, resolved = 0, False
        while True:
            if node.origin is None:
                raise FSError(errno.ENOENT)
            if node.remote_mtime_ns < 0 and node.parent is not None:
                await bounded(self.watchdog, self.listings.ensure(node.parent, force=True))
            try:
                if node.remote_size <= DIRECT_DOWNLOAD_MAX:
                    cached = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
                    if cached is not None and cached.complete:
                        return cached
                    self.readahead.missed(node)
                    return await bounded(self.watchdog, self.fetcher.whole_small(node))
                entry = self.store.entry_for(node.origin, node.remote_size, node.remote_mtime_ns)
                if whole:
                    await bounded(self.watchdog, self.fetcher.ensure_all(entry))
                return entry
            except (StaleContent, FSError) as error:
                if isinstance(error, FSError) and error.errno != errno.ENOENT:
                    raise
                if not resolved and await self._moved_by_a_flush(node):
                    resolved = True
                    continue
                if isinstance(error, FSError):
                    raise
                log.info("%s; listing again", error)
                attempts += 1
                if attempts > 1 or node.parent is None:
                    raise FSError(errno.EIO, "the file keeps changing in the session") from None
                await bounded(self.watchdog, self.listings.ensure(node.parent, force=True))
                if not node.attached:
                    raise FSError(errno.ENOENT) from None

    async def _moved_by_a_flush(self, node: Node) -> bool:
        """Whether a flush whose outcome was not known (it may have moved the file) has just been
        read, so the content is to be looked for again where that flush left it."""
        if not self.listings.unresolved:
            return False
        log.info("%r is not what or where it was; reading what an earlier flush did", node.path)
        await bounded(self.watchdog, self.resolve())
        return True

    async def read(self, number: int, offset: int, size: int, *, resolved: bool = False) -> bytes:
        handle = self._table[number]
        node = handle.node
        await self.follow_session(node)
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
                await bounded(self.watchdog, self.fetcher.ensure_range(handle.entry, offset, size))
            except StaleContent as error:
                if not resolved and await self._moved_by_a_flush(node):
                    return await self.read(number, offset, size, resolved=True)
                # The version this descriptor reads is gone from the session: its reader
                # gets an error, not the rest of another version; the next open reads the
                # current one, which a listing now names.
                log.info("%s; listing again, the read fails", error)
                if node.parent is not None:
                    await bounded(self.watchdog, self.listings.ensure(node.parent, force=True))
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
        handle = self._table[number]
        if not handle.writable:
            raise FSError(errno.EBADF)
        node = handle.node
        await self.follow_session(node)
        if handle.append:
            offset = node.size
        self.overlay.writing(node)
        written = os.pwrite(handle.fd, data, offset)
        self.overlay.content_changed(node, max(node.size, offset + written))
        return written

    async def truncate(self, node: Node, size: int) -> None:
        """``truncate``/``ftruncate`` of a regular file to ``size`` bytes."""
        await self.follow_session(node)
        await self.stage(node, truncate=size == 0)
        assert node.stage is not None
        self.overlay.writing(node)
        os.truncate(self.store.stage_path(node.stage), size)
        self.overlay.content_changed(node, size)

    async def follow_session(self, node: Node) -> None:
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
            self.overlay.refilled(node)

    async def release(self, number: int) -> None:
        handle = self._table.pop(number)
        os.close(handle.fd)
        node = handle.node
        node.open_count -= 1
        node.write_count -= handle.writable
        if handle.entry is not None:
            handle.entry.pins -= 1
            self.store.evict()
        self.overlay.released(node)
        if handle.writable:
            self.overlay.note_change()

    async def stage(self, node: Node, *, truncate: bool) -> None:
        """Give a regular file a staging copy that writes can go to."""
        if node.stage is not None:
            if truncate and node.size:
                self.overlay.writing(node)
                os.truncate(self.store.stage_path(node.stage), 0)
                self.overlay.content_changed(node, 0)
            return
        source = None
        if not truncate and node.remote_size > 0:
            source = (await self._cached(node, whole=True)).file
        stage = await trio.to_thread.run_sync(
            self.store.stage_from, source, 0 if truncate else node.remote_size
        )
        self.overlay.stage(node, stage)
        if truncate:
            self.overlay.content_changed(node, 0)

    async def localize(self, node: Node) -> None:
        """Turn a moved remote file into local content, so its old name can be overwritten.

        Editors save by renaming the file to a backup name and writing a new
        file; uploading the new file over the old remote name then needs no
        ``mv`` in the session, provided the backup's content is cached here.
        """
        assert node.origin is not None
        entry = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
        if entry is None or not entry.complete:
            return
        stage = await trio.to_thread.run_sync(self.store.stage_from, entry.file, node.remote_size)
        self.overlay.localize(node, stage)

    async def readlink(self, node: Node) -> bytes:
        """A symlink's target: known here, or read from the session's archive of it."""
        if node.target is None:
            node.target = await bounded(self.watchdog, self.fetcher.link_target(node))
        return node.target
