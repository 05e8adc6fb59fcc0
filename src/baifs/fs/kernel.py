"""What the parts of a mount tell the kernel: entries and attributes it must forget.

The kernel caches names and attributes for their timeouts. When the session
changed behind the mount (a listing showed objects gone, a run ended), the
parts say so through a `KernelNotifier`, which the composition root
(`core`) hands them at construction:

- `KernelCache`, for a FUSE mount: drops entries with
  ``invalidate_entry_async`` (safe from handlers), and after a run the
  attributes of every inode the kernel holds and the names it was told do
  not exist, from a worker thread (those calls block until requests on the
  same inodes are answered, by the handlers on this thread);
- `NoKernel`, where there is no kernel to tell (``baifs salvage replay``,
  tests of the parts without FUSE).

`KernelCache` also remembers the names looked up in vain (negative
entries), so that a run's new files do not hide behind them; a name leaves
that set as soon as the kernel learns it exists, since invalidating a
positive entry unhashes it and a shell whose working directory it is would
lose that directory.
"""

from __future__ import annotations

from typing import Protocol

import pyfuse3
import trio

from .model import Namespace, Node

#: Names looked up in vain, remembered so a run's new files do not hide behind them.
MAX_NEGATIVE_NAMES = 10_000


class KernelNotifier(Protocol):
    def entries_gone(self, nodes: list[Node]) -> None:
        """These nodes left the tree: the kernel forgets their names (never blocks)."""

    async def attributes_stale(self) -> None:
        """Anything may have changed in the session: the kernel asks again about what it cached."""


class NoKernel:
    def entries_gone(self, nodes: list[Node]) -> None:
        pass

    async def attributes_stale(self) -> None:
        pass


class KernelCache:
    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        #: (parent inode, name) pairs the kernel was told do not exist.
        self._negative: set[tuple[int, bytes]] = set()

    def absent(self, parent_inode: int, name: bytes) -> None:
        """The kernel was told ``name`` does not exist in ``parent_inode``."""
        if len(self._negative) < MAX_NEGATIVE_NAMES:
            self._negative.add((parent_inode, name))

    def present(self, parent_inode: int, name: bytes) -> None:
        """The kernel knows ``name`` exists now (an entry was returned, or a rename made it)."""
        self._negative.discard((parent_inode, name))

    def entries_gone(self, nodes: list[Node]) -> None:
        for node in nodes:
            if node.parent is not None:
                pyfuse3.invalidate_entry_async(node.parent.inode, node.name, ignore_enoent=True)

    async def attributes_stale(self) -> None:
        inodes = [inode for inode, node in self.namespace.inodes.items() if node.lookups > 0]
        negative, self._negative = self._negative, set()

        def invalidate() -> None:
            for inode in inodes:
                try:
                    pyfuse3.invalidate_inode(inode, attr_only=True)
                except OSError:
                    pass  # the kernel forgot it meanwhile
            for parent, name in negative:
                try:
                    pyfuse3.invalidate_entry(parent, name)
                except OSError:
                    pass

        await trio.to_thread.run_sync(invalidate)
