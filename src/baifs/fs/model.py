"""The local view of the session's tree: nodes, and the overlay of changes not yet pushed.

The local view is the remote tree, as far as listings revealed it, plus an
overlay of local changes. Both live in one tree of `Node` objects. Each node
records which remote object it stands for (``origin``: its path in the remote
tree as of the last flush, or None for something created here) and what
about it is pending: new content (``dirty``), a mode other than the remote
one, explicitly set times (``mtime_dirty``, ``atime_dirty``), or a move
(``origin`` differs from where its parent's origin would put it). Remote
objects removed here wait in ``doomed`` until a flush removes them in the
session.

Hard cases this layout solves:

- a file created and deleted before a flush never leaves this machine;
- renaming a file not yet uploaded only changes where it will be uploaded;
- replacing a remote regular file by another regular file (editors' atomic
  save: write a temp file, rename it over the target) costs an upload, since
  an upload overwrites in place;
- a remote listing that arrives while changes are pending is merged without
  undoing them: a remote path that a pending change claims (a doomed path,
  or the origin of a moved node) stays hidden, and a local object that took
  a name wins over the remote one, until the flush that pushes them;
- an object the session removed (or replaced by one of another type) while
  it, or something inside it, holds local changes is made again with them
  (`Namespace.lose_remote`): directories on the way, changed files, files
  open for writing; what holds no change goes with the session's removal.

Invariants:
- a node's inode number never changes and is never reused during a mount;
- at most one attached node has a given origin;
- a node is in ``pending`` iff it is attached and dirty, has a mode change,
  a set mtime or atime, no origin (it needs creating), or an explicit move;
- a clean node keeps a staging file only while the remote object's mtime is
  unknown (the flush's script placed it and the listing after it failed):
  that file is its content until a listing shows the object, and then goes
  (the listing cannot tell the placed file from a newer one of the same
  size, so the session's content is read again);
- ``doomed`` holds remote paths as they are before the next flush, and no
  attached node's origin is in it.
"""

from __future__ import annotations

import itertools
import math
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

ROOT_INODE = 1
#: ``listed_at`` of a directory whose listing is known but must be taken again.
LISTING_EXPIRED = -math.inf


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def depth(path: bytes) -> int:
    return path.count(b"/") + 1 if path else 0


def is_ancestor_or_self(ancestor: bytes, path: bytes) -> bool:
    return not ancestor or path == ancestor or path.startswith(ancestor + b"/")


#: Listings carry times as float seconds: about 240 ns apart at today's dates.
MTIME_PRECISION_NS = 1000


def same_mtime(known_ns: int, listed_ns: int) -> bool:
    """Whether a listed mtime is the one known here (set in nanoseconds by a flush), as a float can say."""
    return abs(known_ns - listed_ns) < MTIME_PRECISION_NS


@dataclass(frozen=True, slots=True)
class Entry:
    """What a listing says of one remote object (`remote` makes them from the session's answers)."""

    name: bytes
    mode: int
    size: int
    ctime_ns: int
    mtime_ns: int
    atime_ns: int


class Node:
    __slots__ = (
        "inode",
        "parent",
        "name",
        "mode",
        "size",
        "mtime_ns",
        "ctime_ns",
        "atime_ns",
        "origin",
        "remote_size",
        "remote_mtime_ns",
        "remote_mode",
        "stage",
        "stage_stale",
        "dirty",
        "mtime_dirty",
        "atime_dirty",
        "target",
        "children",
        "order",
        "subdirs",
        "owner",
        "listed_at",
        "lookups",
        "open_count",
        "write_count",
        "content_version",
        "kernel_version",
        "maybe_at",
    )

    def __init__(self, inode: int, name: bytes, mode: int, *, origin: bytes | None) -> None:
        now = time.time_ns()
        self.inode = inode
        self.parent: Node | None = None
        self.name = name
        self.mode = mode
        self.size = 0
        self.mtime_ns = self.ctime_ns = self.atime_ns = now
        self.origin = origin
        #: size, mtime and mode of the remote object at ``origin`` when last
        #: seen; -1 when unknown (then the next listing settles them).
        self.remote_size = -1
        self.remote_mtime_ns = -1
        self.remote_mode = -1
        #: name of the staging file that holds this file's local content.
        self.stage: str | None = None
        #: the staging copy of a file open for writing and not written yet is older than
        #: the session's content: it is refreshed before the next read or write through it.
        self.stage_stale = False
        #: the local content is not (yet) on the session.
        self.dirty = False
        self.mtime_dirty = False
        self.atime_dirty = False
        self.target: bytes | None = None
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        #: the children's names, sorted; None until asked for after a change (`Namespace.in_order`).
        self.order: list[bytes] | None = None
        #: how many children are directories (kept by `Namespace.attach` and `unhook`).
        self.subdirs = 0
        #: (uid, gid) given by chown here: shown for the mount's life, never sent to the session
        #: (its API has no way to store it); None: the mount's configured owner.
        self.owner: tuple[int, int] | None = None
        #: monotonic time of the last listing merge (directories with an origin); None
        #: before the first, minus infinity once expired (still known, to be listed again).
        self.listed_at: float | None = None
        self.lookups = 0
        self.open_count = 0
        self.write_count = 0
        #: bumped when the content changes; the kernel's page cache is kept
        #: across opens only while it equals ``kernel_version``.
        self.content_version = 0
        self.kernel_version = -1
        #: where a script whose outcome is not known may have made this node's object (a node made
        #: here and not confirmed yet): if the node leaves that name first, the name is doomed.
        self.maybe_at: bytes | None = None

    def __repr__(self) -> str:
        return f"<Node {self.inode} {self.path!r}>"

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_fifo(self) -> bool:
        return stat.S_ISFIFO(self.mode)

    @property
    def attached(self) -> bool:
        node: Node | None = self
        while node is not None and node.inode != ROOT_INODE:
            if (
                node.parent is None
                or node.parent.children is None
                or node.parent.children.get(node.name) is not node
            ):
                return False
            node = node.parent
        return True

    @property
    def path(self) -> bytes:
        parts = []
        node: Node | None = self
        while node is not None and node.inode != ROOT_INODE:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def implied_origin(self) -> bytes | None:
        """Where this node's remote object is if only its ancestors moved."""
        if self.parent is None:
            return b""
        parent_origin = self.parent.origin
        return None if parent_origin is None else join(parent_origin, self.name)

    @property
    def mode_differs(self) -> bool:
        """The permission bits here are not those of the remote object."""
        return (
            not self.is_symlink
            and self.remote_mode >= 0
            and stat.S_IMODE(self.mode) != stat.S_IMODE(self.remote_mode)
        )

    def within(self, ancestor: Node) -> bool:
        """Whether this node is ``ancestor`` or below it."""
        node: Node | None = self
        while node is not None:
            if node is ancestor:
                return True
            node = node.parent
        return False

    def entries_changed(self, now_ns: int) -> None:
        """An entry was added to or removed from this directory: its mtime and ctime move (here;
        the session's own clock sets them there, and its next listing brings them)."""
        self.mtime_ns = self.ctime_ns = max(now_ns, self.ctime_ns)

    @property
    def children_known(self) -> bool:
        """Every child is in ``children``: the directory was listed, or made here."""
        return self.children is not None and (self.listed_at is not None or self.origin is None)

    @property
    def link_count(self) -> int:
        """``st_nlink``: 2 plus the subdirectories for a directory (1, "unknown", before its
        listing is known), 1 for anything else in the tree, 0 once unlinked (still open)."""
        if self.is_dir:
            return 2 + self.subdirs if self.children_known else 1
        return 1 if self.attached else 0

    @property
    def attributes_pending(self) -> bool:
        """A mode or times set here and not yet in the session."""
        return self.mtime_dirty or self.atime_dirty or self.mode_differs

    @property
    def moved(self) -> bool:
        return self.origin is not None and self.parent is not None and self.origin != self.implied_origin()

    def set_remote(self, entry: Entry) -> None:
        self.remote_size = entry.size
        if not same_mtime(self.remote_mtime_ns, entry.mtime_ns):
            self.remote_mtime_ns = entry.mtime_ns  # else keep the exact one a flush set
        self.remote_mode = entry.mode

    def take_remote_attributes(self, entry: Entry) -> bool:
        """Adopt a listing entry of this node's clean remote object; whether its content changed.

        While the remote object is the one last seen (same size and mtime, or
        same size where the mtime was not known: a flush wrote it), the local
        times are kept: they may be the times of a write made here, and tools
        such as make, rsync and git must not see them jump.
        """
        changed = self.remote_size != entry.size or (
            self.remote_mtime_ns != -1 and not same_mtime(self.remote_mtime_ns, entry.mtime_ns)
        )
        mode_changed = self.remote_mode != entry.mode
        self.set_remote(entry)
        if changed:
            self.content_version += 1
            if self.is_symlink:
                self.target = None
            self.size = entry.size
            self.mtime_ns, self.ctime_ns, self.atime_ns = entry.mtime_ns, entry.ctime_ns, entry.atime_ns
        if changed or mode_changed:
            self.mode = entry.mode
        return changed


@dataclass
class Merged:
    """What merging a listing took out of the tree."""

    #: nodes whose remote objects are gone from the session.
    removed: list[Node]
    #: staging files of clean nodes whose remote content changed.
    stale: list[str]


class Namespace:
    def __init__(self) -> None:
        self._inode_numbers = itertools.count(ROOT_INODE + 1)
        self.root = Node(ROOT_INODE, b"", stat.S_IFDIR | 0o755, origin=b"")
        self.root.lookups = 1
        self.inodes: dict[int, Node] = {ROOT_INODE: self.root}
        self.pending: set[Node] = set()
        self.doomed: dict[bytes, int] = {}
        #: remote paths of nodes recovery is placing: a listing merged meanwhile leaves them alone.
        self.restoring: set[bytes] = set()

    def new_node(self, name: bytes, mode: int, *, origin: bytes | None) -> Node:
        node = Node(next(self._inode_numbers), name, mode, origin=origin)
        self.inodes[node.inode] = node
        return node

    def attach(self, parent: Node, node: Node) -> None:
        assert parent.children is not None
        node.parent = parent
        parent.children[node.name] = node
        parent.order = None
        parent.subdirs += node.is_dir

    def unhook(self, node: Node) -> None:
        """Take a node out of its parent's children (it keeps ``parent``)."""
        parent = node.parent
        if parent is not None and parent.children is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
            parent.order = None
            parent.subdirs -= node.is_dir

    def in_order(self, directory: Node) -> list[bytes]:
        """The names in a directory, sorted: sorted once after each change, O(1) until the next."""
        if directory.order is None:
            directory.order = sorted(directory.children or ())
        return directory.order

    def detach(self, node: Node) -> None:
        self.unhook(node)
        for gone in self.walk(node):
            self.pending.discard(gone)
            self.release_if_unused(gone)

    def release_if_unused(self, node: Node) -> None:
        """Forget a node the tree and the kernel no longer reference."""
        if node.lookups <= 0 and node.open_count <= 0 and not node.attached and node.inode != ROOT_INODE:
            self.inodes.pop(node.inode, None)

    def resolve(self, path: bytes) -> Node | None:
        node = self.root
        for name in path.split(b"/") if path else []:
            if node.children is None or name not in node.children:
                return None
            node = node.children[name]
        return node

    def walk(self, node: Node) -> Iterator[Node]:
        yield node
        for child in list((node.children or {}).values()):
            yield from self.walk(child)

    def refresh_pending(self, node: Node) -> None:
        pending = node.dirty or node.attributes_pending or node.origin is None or node.moved
        if pending and node.attached:
            self.pending.add(node)
        else:
            self.pending.discard(node)

    def claimed(self) -> set[bytes]:
        """Remote paths that pending changes remove or move away (or recovery is placing)."""
        claimed = set(self.doomed) | self.restoring
        claimed.update(n.origin for n in self.pending if n.origin is not None and n.moved)
        return claimed

    def merge_listing(self, directory: Node, entries: list[Entry], hidden: set[bytes]) -> Merged:
        """Fold a listing of ``directory.origin`` into the tree."""
        assert directory.children is not None and directory.origin is not None
        claimed = self.claimed()
        seen: set[bytes] = set()
        removed: list[Node] = []
        stale: list[str] = []
        for entry in entries:
            name = entry.name
            remote_path = join(directory.origin, name)
            if name in hidden or remote_path in claimed:
                continue
            seen.add(name)
            child = directory.children.get(name)
            if child is None:
                child = self.new_node(name, entry.mode, origin=remote_path)
                child.take_remote_attributes(entry)
                self.attach(directory, child)
            elif child.origin != remote_path:
                continue  # a local object took this name; it wins until flushed
            elif stat.S_IFMT(child.mode) != stat.S_IFMT(entry.mode):
                if self.holds_local_changes(child):
                    # Replaced in the session while changed here: the local object keeps the
                    # name and is made again (the session's object is not touched).
                    removed += self.lose_remote(child)
                    continue
                self.detach(child)
                removed.append(child)
                replacement = self.new_node(name, entry.mode, origin=remote_path)
                replacement.take_remote_attributes(entry)
                self.attach(directory, replacement)
            elif child.dirty or child.attributes_pending:
                child.set_remote(entry)
            elif child.write_count:
                # Open for writing, nothing written yet: it follows the session's content.
                if child.take_remote_attributes(entry):
                    child.stage_stale = True
            else:
                if child.stage is not None and child.remote_mtime_ns < 0:
                    # Kept content of a placed file: the session's may be newer with the
                    # same size, and nothing tells them apart; read the session's.
                    stale.append(child.stage)
                    child.stage = None
                    child.content_version += 1
                if child.take_remote_attributes(entry) and child.stage is not None:
                    stale.append(child.stage)  # its kept content is not the session's any more
                    child.stage = None
        for name, child in list(directory.children.items()):
            if name in seen or child.origin != join(directory.origin, name):
                continue
            removed += self.lose_remote(child)
        return Merged(removed, stale)

    def holds_local_changes(self, node: Node) -> bool:
        """Whether a subtree holds what the session does not have: new content (a file open
        for writing included), something made here, something moved in."""
        return any(
            n.dirty or n.write_count or n.origin is None or (n.moved and n is not node)
            for n in self.walk(node)
        )

    def lose_remote(self, node: Node) -> list[Node]:
        """The session removed a node's remote object: what holds local changes is made again.

        Directories on the way to a change become new directories, changed
        files new files (a file open for writing keeps the content it has
        here); what holds no change goes with the session's removal and is
        returned, detached. Objects made here or moved in from elsewhere stay
        as they are.
        """
        gone_path = node.origin
        assert gone_path is not None
        removed: list[Node] = []

        def orphan(each: Node) -> None:
            if each.origin is None or not is_ancestor_or_self(gone_path, each.origin):
                return  # made here, or moved in: not what the session removed
            if not self.holds_local_changes(each):
                self.detach(each)
                removed.append(each)
                return
            for child in list((each.children or {}).values()):
                orphan(child)
            each.origin = None
            each.remote_mode = each.remote_size = each.remote_mtime_ns = -1
            if each.is_regular:
                each.dirty = each.stage is not None
            self.refresh_pending(each)

        orphan(node)
        return removed

    def add_local(self, parent: Node, name: bytes, mode: int) -> Node:
        """A new object created here (file, directory or symlink)."""
        node = self.new_node(name, mode, origin=None)
        node.dirty = node.is_regular
        self.attach(parent, node)
        self.pending.add(node)
        return node

    def remove(self, node: Node) -> None:
        """unlink/rmdir: the node leaves the tree; its remote objects are doomed."""
        self._doom_remote(node)
        self.detach(node)

    def _doom_remote(self, node: Node) -> None:
        """Doom the remote objects of a subtree that leaves the local view."""
        self._doom_maybe(node)
        if node.origin is not None:
            self.doomed[node.origin] = node.remote_mode if node.remote_mode >= 0 else node.mode
            if not node.moved:
                return  # the remote subtree goes with it; moved-in children are handled below
        for child in list((node.children or {}).values()):
            if child.origin is None or child.moved or node.origin is None:
                self._doom_remote(child)

    def _doom_maybe(self, node: Node) -> None:
        """Objects a script whose outcome is unknown may have made for this subtree, at the names
        it is leaving: doomed (a removal takes only what is found, as the mount knew it)."""
        for each in self.walk(node):
            if each.origin is None and each.maybe_at is not None:
                self.doomed.setdefault(each.maybe_at, each.mode)
                each.maybe_at = None

    def rename(self, node: Node, new_parent: Node, new_name: bytes) -> None:
        """Move a node to a free name (the caller removed what was there)."""
        assert new_name not in (new_parent.children or {})
        assert node.parent is not None and node.parent.children is not None
        self._doom_maybe(node)
        self.unhook(node)
        node.name = new_name
        self.attach(new_parent, node)
        self.refresh_pending(node)

    def exchange(self, one: Node, other: Node) -> None:
        """Swap two nodes' places (``renameat2`` with RENAME_EXCHANGE); each keeps its inode."""
        one_place, other_place = (one.parent, one.name), (other.parent, other.name)
        assert one_place[0] is not None and other_place[0] is not None
        self._doom_maybe(one)
        self._doom_maybe(other)
        self.unhook(one)
        self.unhook(other)
        one.name, other.name = other_place[1], one_place[1]
        self.attach(other_place[0], one)
        self.attach(one_place[0], other)
        self.refresh_pending(one)
        self.refresh_pending(other)

    def pending_changes(self) -> int:
        return len(self.pending) + len(self.doomed)
