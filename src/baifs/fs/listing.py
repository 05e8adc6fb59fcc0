"""Directory listings: what the session holds, one directory level at a time, kept for a TTL.

Owns:

- taking a directory's listing (one request per directory at a time,
  however many callers wait) and folding it into the view through the
  overlay, without undoing what is pending;
- the TTL (``ttl``): a listing younger than that serves as it is; an older
  one keeps serving while its successor is slow (`STALE_GRACE_SECONDS`) or
  the session is away, so what the mount knows stays usable;
- expiry: after something changed the session (a run, a flush that kept
  something) every listing counts as stale at once (`expire`, O(1));
- the motion of remote paths (`RemoteMotion`): while a flush changes the
  session, listings wait for it or serve the previous listing, and a
  listing that was in flight meanwhile is taken again; while a script's
  outcome is unknown, a directory not found where the mount knew it is not
  taken for removed (the script may have moved it);
- objects the session removed behind the mount's back (`vanished`), whose
  kernel entries go;
- listings taken ahead of a tree walk, in the background (`prefetch`).

Listings are taken in the background once `run` has started, so a caller
that gives up (a bounded system call) leaves the listing to land; before
that (recovery) the caller takes them itself.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import trio

from ..api.errors import RemotePathError
from ..errors import BaifsError
from . import scratch
from .errors import FSError
from .kernel import KernelNotifier
from .model import ROOT_INODE, Entry, Node
from .overlay import Overlay
from .remote import Remote

log = logging.getLogger(__name__)

#: How long a stale listing waits for its successor before it serves as it is
#: (shorter once the session is known to be away: if it is back, it answers at once).
STALE_GRACE_SECONDS = 2.0
STALE_GRACE_AWAY_SECONDS = 0.3
#: Listings taken ahead of a tree walk at the same time.
PREFETCH_LISTINGS = 4


class RemoteMotion:
    """Whether a flush is changing the session: listings wait, or are taken again after it; and
    whether a script's outcome is not known yet (``unresolved``: it may have moved any path)."""

    def __init__(self) -> None:
        self.quiet = trio.Event()
        self.quiet.set()
        self.epoch = 0
        self.unresolved = False

    @contextmanager
    def moving(self) -> Iterator[None]:
        self.quiet = trio.Event()
        self.epoch += 1
        try:
            yield
        finally:
            self.epoch += 1
            self.quiet.set()


@dataclass
class Listing:
    """A listing on its way; the callers that wait for it read ``error`` when it is done."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Listings:
    def __init__(self, remote: Remote, overlay: Overlay, kernel: KernelNotifier, *, ttl: float) -> None:
        self.remote = remote
        self.overlay = overlay
        self.kernel = kernel
        self.ttl = ttl
        self.motion = RemoteMotion()
        self._listing: dict[int, Listing] = {}
        #: listings merged before this moment are stale (`expire`).
        self._expired_at = -math.inf
        self._nursery: trio.Nursery | None = None
        self._prefetch_limiter = trio.CapacityLimiter(PREFETCH_LISTINGS)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The home of listings taken in the background; until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None  # from now on listings are taken by their callers

    async def ensure(self, directory: Node, *, force: bool = False) -> None:
        """Make ``directory``'s children current (within the TTL) with the session's listing.

        A stale listing serves while its successor is slow or the session is
        away; the successor still lands in the background.
        """
        if not directory.is_dir or directory.origin is None:
            return
        motion = self.motion
        while True:
            stale = directory.listed_at is not None and not force
            if stale:
                # Within the TTL, or our own flush is changing the session: the
                # tree already shows what the flush does, so the last listing serves.
                if self.age(directory) < self.ttl or not motion.quiet.is_set():
                    return
            listing = self._listing.get(directory.inode)
            joined = listing is not None
            if listing is None:
                listing = self._listing[directory.inode] = Listing()
                if self._nursery is None:  # before the background runs (recovery): take it here
                    await self._take(directory, listing)
                else:
                    self._nursery.start_soon(self._take, directory, listing)
            if stale:
                grace = STALE_GRACE_AWAY_SECONDS if self.remote.health.away else STALE_GRACE_SECONDS
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

    async def _take(self, directory: Node, listing: Listing) -> None:
        """One listing of a directory, merged unless a flush moved remote paths meanwhile."""
        motion = self.motion
        try:
            while True:
                await motion.quiet.wait()
                epoch = motion.epoch
                origin = directory.origin
                if origin is None or not directory.attached:
                    return
                entries = await self.remote.list_dir(origin)
                if entries is None:
                    if directory.inode == ROOT_INODE:
                        raise FSError(errno.ENOENT, "the session has no /home/work")
                    if motion.unresolved:
                        # A script whose outcome is not known yet may have moved it: what is known
                        # of it serves until that outcome is read (the next flush reads it first).
                        log.info("listing %r: not where it was, while a flush is unresolved", origin)
                        return
                    if epoch == motion.epoch:
                        self.vanished([directory])
                    if not directory.attached or directory.origin is not None:
                        listing.error = FSError(errno.ENOENT)
                    # else: kept for the local changes in it, it is all there is to list
                    return
                if epoch == motion.epoch and directory.origin == origin:
                    self._merge(directory, entries)
                    return
        except Exception as error:  # handed to every caller that waits for this listing
            listing.error = error
        finally:
            del self._listing[directory.inode]
            listing.done.set()

    def _merge(self, directory: Node, entries: list[Entry]) -> None:
        hidden: set[bytes] = set()
        if directory.inode == ROOT_INODE:  # baifs's own names, and discovery's probe while it lives
            hidden = {*scratch.RESERVED_AT_ROOT, *(e.name for e in entries if scratch.is_probe(e.name))}
        removed = self.overlay.merge_listing(directory, entries, hidden)
        if removed:
            self.kernel.entries_gone(removed)

    def vanished(self, nodes: list[Node]) -> None:
        """Remote objects that something in the session removed behind our back."""
        self.kernel.entries_gone(self.overlay.vanished(nodes))

    def moving(self) -> AbstractContextManager[None]:
        """While a flush changes the session (see `RemoteMotion`)."""
        return self.motion.moving()

    @property
    def unresolved(self) -> bool:
        """Whether a flush's outcome is not known yet (its script may have moved any path)."""
        return self.motion.unresolved

    @unresolved.setter
    def unresolved(self, unresolved: bool) -> None:
        self.motion.unresolved = unresolved

    def expire(self) -> None:
        """Every listing is stale from now on (after something changed the session); O(1)."""
        self._expired_at = time.monotonic()

    def age(self, directory: Node) -> float:
        """Seconds since the directory's listing was merged (infinite if expired or never taken)."""
        listed_at = directory.listed_at
        if listed_at is None or listed_at <= self._expired_at:
            return math.inf
        return time.monotonic() - listed_at

    def prefetch(self, directories: list[Node]) -> None:
        """List, in the background, directories whose listing is missing or stale."""
        for directory in directories:
            if (
                self.age(directory) >= self.ttl
                and directory.origin is not None
                and directory.inode not in self._listing
                and self._nursery
            ):
                self._nursery.start_soon(self._list_quietly, directory)

    async def _list_quietly(self, directory: Node) -> None:
        async with self._prefetch_limiter:
            try:
                await self.ensure(directory)
            except (FSError, BaifsError) as error:
                log.debug("listing ahead of %r: %s", directory.path, error)
