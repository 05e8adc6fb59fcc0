"""Reading ahead of tree walks: what a scan will want next, listed and fetched before it asks.

A directory enumerated right after its parent (``ls -R``, ``find``, ``du``,
``grep -r``, ``git status``) is a walk: its first subdirectories and the
siblings that follow it are listed ahead (`enumerated`). A second read miss
in a directory just enumerated is a scan of its files: the small files that
follow, and those of the next directory, are queued for prefetch (`missed`).

Costs, whatever the size of a directory: scan detection is amortized O(1)
(directories seen within `SCAN_WINDOW_SECONDS`, in time order, the old ones
leaving from the front), and choosing what comes next is a bisection into
the sorted names plus at most `LOOK_AHEAD` names looked at.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import OrderedDict
from collections.abc import Iterator

from .fetch import Fetcher
from .listing import PREFETCH_LISTINGS, Listings
from .model import Namespace, Node

#: Enumerations and reads of a directory this close together are a scan (see `_note_scan`).
SCAN_WINDOW_SECONDS = 3.0
#: How many names after the current one a scan looks at for what to fetch ahead
#: (bounds the work per operation in directories of any size).
LOOK_AHEAD = 256


class ReadAhead:
    def __init__(self, namespace: Namespace, listings: Listings, fetcher: Fetcher) -> None:
        self.namespace = namespace
        self.listings = listings
        self.fetcher = fetcher
        #: directories enumerated or read from, and when, oldest first (see `_note_scan`).
        self._scanned: OrderedDict[int, float] = OrderedDict()

    def enumerated(self, directory: Node) -> None:
        """``directory`` is being listed for readdir: in a walk, list what comes next ahead."""
        parent = directory.parent
        if parent is not None and self._recently_scanned(parent):
            inside = [node for node in self._scan_order(directory) if node.is_dir]
            following = [
                node for node in self._scan_order(parent, after=directory.name, wrap=False) if node.is_dir
            ]
            self.listings.prefetch(inside[:PREFETCH_LISTINGS] + following[: 2 * PREFETCH_LISTINGS])
        self._note_scan(directory)

    def missed(self, node: Node) -> None:
        """A small file's content is not cached: at the second miss in a scanned directory, fetch
        the small files after it, and in a tree walk those of the next directory."""
        directory = node.parent
        if directory is None or not self._note_scan(directory):
            return
        self.fetcher.prefetch(self._scan_order(directory, after=node.name))
        parent = directory.parent
        if parent is None or not self._recently_scanned(parent):
            return
        following = self._scan_order(parent, after=directory.name, wrap=False)
        listed = next((d for d in following if d.is_dir and d.listed_at is not None), None)
        if listed is not None:
            self.fetcher.prefetch(self._scan_order(listed))

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
