"""The namespace semantics: the POSIX rules of every operation on names, and when it needs the session.

`Filesystem` is FUSE-agnostic: it works on `Node` objects and raises `FSError`
with an errno; `operations` adapts it to pyfuse3. It checks what POSIX
requires (a name free or taken, a directory empty, no move into its own
subtree, the right type) against a current listing (`listing`), then hands
the change to the overlay (`overlay`), which journals it and changes the
tree; write-back pushes it later (`sync`). Open files and their content are
`handles`' business, listings `listing`'s.

Every wait for the session in a system call is bounded by the session's
progress (`errors.bounded`): no call waits more than 20 s for a session that
does not answer.

Concurrency: one trio thread; handlers interleave only at ``await``, and the
tree changes only between awaits (the checks that decide a change are made
after the last await before it), so a handler never sees a half-done change.
Changes may go on while a flush runs: the overlay records what the session
confirmed wherever the nodes went meanwhile.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import FSError, bounded
from .handles import Handle, Handles
from .listing import Listings
from .model import Namespace, Node
from .overlay import Overlay
from .readahead import ReadAhead
from .sync import SyncEngine
from .watchdog import Watchdog

NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: How long a system call waits for the execution slot when a run holds it.
SLOT_WAIT_SECONDS = 20.0


class Filesystem:
    def __init__(
        self,
        overlay: Overlay,
        listings: Listings,
        readahead: ReadAhead,
        handles: Handles,
        sync: SyncEngine,
        watchdog: Watchdog,
    ) -> None:
        self.overlay = overlay
        self.namespace: Namespace = overlay.namespace
        self.listings = listings
        self.readahead = readahead
        self.handles = handles
        self.sync = sync
        self.watchdog = watchdog

    # -- lookups ----------------------------------------------------------

    def node(self, inode: int) -> Node:
        node = self.namespace.inodes.get(inode)
        if node is None:
            raise FSError(errno.ENOENT)
        return node

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` references to ``inode``."""
        node = self.namespace.inodes.get(inode)
        if node is not None:
            node.lookups -= count
            self.overlay.forgotten(node)

    async def refresh(self, node: Node) -> Node:
        """Revalidate a node's attributes through its parent's listing when stale."""
        if node.parent is not None and node.attached:
            await bounded(self.watchdog, self.listings.ensure(node.parent))
        return node

    async def lookup(self, parent: Node, name: bytes) -> Node:
        if not parent.is_dir:
            raise FSError(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        await bounded(self.watchdog, self.listings.ensure(parent))
        assert parent.children is not None
        child = parent.children.get(name)
        if child is None:
            raise FSError(errno.ENOENT)
        return child

    async def list_children(self, directory: Node) -> list[Node]:
        """A directory's entries, for readdir; a tree walk lists what comes next ahead of it."""
        if not directory.is_dir:
            raise FSError(errno.ENOTDIR)
        await bounded(self.watchdog, self.listings.ensure(directory))
        children = directory.children
        assert children is not None
        self.readahead.enumerated(directory)
        return [children[name] for name in self.namespace.in_order(directory)]

    async def readlink(self, node: Node) -> bytes:
        if not node.is_symlink:
            raise FSError(errno.EINVAL)
        return await self.handles.readlink(node)

    # -- the session ------------------------------------------------------

    async def fsync(self, node: Node) -> None:
        """Return once this file (and what it depends on) is on the session."""
        if not node.attached or node not in self.namespace.pending:
            return
        await self.overlay.make_durable()
        path = node.path
        for other in list(self.namespace.pending):
            if other is not node and other.moved and other.origin == path and other.is_regular:
                await self.handles.localize(other)
        await bounded(self.watchdog, self.sync.fsync(node, slot_timeout=SLOT_WAIT_SECONDS))

    async def flush_everything(self) -> None:
        """``fsyncdir`` and ``baifs sync``: return once everything is on the session."""
        await self.overlay.make_durable()
        await bounded(self.watchdog, self.sync.flush_all(slot_timeout=SLOT_WAIT_SECONDS))

    # -- namespace changes ------------------------------------------------

    async def _changing(self, parent: Node, name: bytes) -> None:
        """Common checks and waits before a change in ``parent``."""
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        if not parent.is_dir:
            raise FSError(errno.ENOTDIR)
        if not parent.attached:
            raise FSError(errno.ENOENT)
        await bounded(self.watchdog, self.listings.ensure(parent))

    async def _new_name(self, parent: Node, name: bytes) -> None:
        """Checks before a new object is made: no await may follow this."""
        await self._changing(parent, name)
        assert parent.children is not None
        if name in parent.children:
            raise FSError(errno.EEXIST)

    async def create(self, parent: Node, name: bytes, mode: int, flags: int) -> tuple[int, Handle]:
        await self._new_name(parent, name)
        node = self.overlay.create(
            parent, name, stat.S_IFREG | stat.S_IMODE(mode), stage=self.handles.new_stage()
        )
        return await self.handles.open(node, flags & ~os.O_TRUNC)

    async def mkdir(self, parent: Node, name: bytes, mode: int) -> Node:
        await self._new_name(parent, name)
        return self.overlay.create(parent, name, stat.S_IFDIR | stat.S_IMODE(mode))

    async def mkfifo(self, parent: Node, name: bytes, mode: int) -> Node:
        """A FIFO, made in the session by the flush's script (opened here, it is a local pipe)."""
        await self._new_name(parent, name)
        return self.overlay.create(parent, name, stat.S_IFIFO | stat.S_IMODE(mode))

    async def symlink(self, parent: Node, name: bytes, target: bytes) -> Node:
        await self._new_name(parent, name)
        return self.overlay.create(parent, name, stat.S_IFLNK | 0o777, target=target)

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
        self.overlay.remove(node)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        node = await self._child(parent, name)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        await bounded(self.watchdog, self.listings.ensure(node))
        node = await self._child(parent, name)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        if node.children:
            raise FSError(errno.ENOTEMPTY)
        self.overlay.remove(node)

    async def rename(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FSError(errno.EINVAL)  # RENAME_WHITEOUT is for overlay file systems
        await self._changing(new_parent, new_name)
        existing = (new_parent.children or {}).get(new_name)
        if existing is not None and existing.is_dir:
            await bounded(self.watchdog, self.listings.ensure(existing))
        node = await self._child(parent, name)
        assert new_parent.children is not None
        if not new_parent.attached:
            raise FSError(errno.ENOENT)
        target = new_parent.children.get(new_name)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FSError(errno.ENOENT)  # as the kernel checks, before the subtree
            self._exchange(node, target, new_parent)
            return
        if new_parent.within(node):
            raise FSError(errno.EINVAL)  # into its own subtree
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
        self.overlay.rename(node, new_parent, new_name)

    def _exchange(self, node: Node, other: Node, other_parent: Node) -> None:
        """RENAME_EXCHANGE: both names stay, their objects (and inode numbers) swap places."""
        if other_parent.within(node):
            raise FSError(errno.EINVAL)  # into its own subtree
        if other is node:
            return
        if node.parent is not None and node.parent.within(other):
            raise FSError(errno.EINVAL)  # the other one holds this one
        self.overlay.exchange(node, other)

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
            await self.handles.truncate(node, size)
        self.overlay.set_meta(node, mode=mode, mtime_ns=mtime_ns, atime_ns=atime_ns, owner=owner)
        return node
