"""Recovery: rebuilding what an earlier mount of the session had not pushed.

At mount time the journal (`changes`) holds the overlay as it was after the
last flush (a `changes.Checkpoint`) and the changes made after it. Both are
replayed onto a fresh tree built from the session's listings, every change
to the tree made by the overlay (`overlay.Overlay`):

1. every remote object the checkpoint mentions is found by its remote path
   first, before anything moves (an object a crashed flush had moved aside
   into the scratch area is found where the journal's `changes.ScriptMoves`
   says);
2. the objects that must be elsewhere are taken out, doomed paths removed,
   then everything is placed where the checkpoint says, shallowest first,
   with its mode, set times, staged content or symlink target;
3. the later changes are replayed as they were made: the namespace changes
   through `Filesystem`, which checks them against the session as it is now
   (a rename over what the session filled meanwhile is refused and skipped),
   content through the overlay.

Replay never overwrites blindly what the session changed since: content
recorded with the session's version it started from (``base``, size and
mtime) is put back only while the session's file is still that version.
Otherwise both are kept: the session's file keeps its name, and this
machine's content becomes a new file beside it,
``NAME.baifs-conflict-YYYYMMDD-HHMMSS-HOST.EXT``, logged and counted in
``baifs status`` ("conflict copies", `overlay.Overlay.adopt_stage`).

Replay is idempotent in effect: a crashed flush may have done part of its
work already, so an object found at its destination is taken as moved, a
new object found already created is adopted, and a change whose source is
gone is skipped (and logged). Staging files no node refers to are deleted;
the session's leftover scratch is noted for removal by the next flush.
"""

from __future__ import annotations

import logging
import os
import stat

from ..errors import BaifsError
from .changes import Change, Checkpoint, Create, JournalContents, Meta, Remove, Rename, ScriptMoves, Stage
from .errors import FSError
from .filesystem import RENAME_EXCHANGE, Filesystem
from .listing import Listings
from .model import Node, join
from .overlay import Overlay
from .remote import Remote
from .scratch import ROOT, Scratch

log = logging.getLogger(__name__)


class Recovery:
    """One replay of a journal onto a fresh mount."""

    def __init__(
        self, fs: Filesystem, listings: Listings, overlay: Overlay, remote: Remote, scratch: Scratch
    ) -> None:
        self.fs = fs
        self.listings = listings
        self.overlay = overlay
        self.remote = remote
        self.scratch = scratch
        #: where crashed flushes' scripts were to move objects aside, by remote path.
        self.parked: dict[bytes, bytes] = {}

    async def run(self, contents: JournalContents) -> int:
        """Replay ``contents``; the number of changes recovered. The caller checkpoints after it.

        The records are already in the journal: they are not written again, so a state disk still
        full cannot fail their replay (and the journal stays whole until that checkpoint).
        """
        recovered = 0
        if not contents.empty:
            self.parked = {
                origin: at
                for change in contents.changes
                if isinstance(change, ScriptMoves)
                for origin, at in change.moves
            }
            with self.overlay.replaying():
                if contents.checkpoint is not None:
                    recovered += await self._restore(contents.checkpoint)
                for change in contents.changes:
                    try:
                        recovered += await self._replay(change)
                    except (FSError, BaifsError, OSError) as error:
                        log.warning("recovery: skipped %s (%s)", change.op, error)
        self.overlay.forget_unused_stages()
        names = await self.remote.list_scratch()  # what earlier mounts left there: the next flush removes it
        self.scratch.note_leftover(join(ROOT, name) for name in names)
        return recovered

    async def _resolve(self, path: bytes) -> Node | None:
        """The node at a path of the local view, listing directories as needed."""
        node = self.overlay.namespace.root
        for name in path.split(b"/") if path else []:
            try:
                node = await self.fs.lookup(node, name)
            except FSError:
                return None
        return node

    async def _remote_object(self, remote_path: bytes) -> Node | None:
        """A detached node for a remote object the view does not show (a parked one)."""
        parent, _, name = remote_path.rpartition(b"/")
        try:
            entries = await self.remote.list_dir(parent)
        except BaifsError:
            return None
        entry = next((entry for entry in entries or () if entry.name == name), None)
        return None if entry is None else self.overlay.adopt_remote(remote_path, entry)

    async def _restore(self, checkpoint: Checkpoint) -> int:
        records = checkpoint.nodes
        #: directories other records are inside: made again when the session does not have them
        #: (removed there, or made by an upload that never landed).
        needed = {
            record.path[:index]
            for record in records
            for index in range(len(record.path))
            if record.path[index : index + 1] == b"/"
        }
        found: dict[int, Node] = {}
        for index, record in enumerate(records):
            origin = record.origin
            if origin is None:
                continue
            # Where a crashed script left it aside first: what is at its old name may be new.
            node = await self._remote_object(self.parked[origin]) if origin in self.parked else None
            if node is None:
                node = await self._resolve(origin)
            if node is None and origin != record.path:
                node = await self._resolve(record.path)  # the crashed flush moved it already
            if node is None:
                log.warning("recovery: %r is no longer in the session", os.fsdecode(origin))
                continue
            found[index] = node
        for node in found.values():
            self.overlay.take_out(node)
        for path, mode in checkpoint.doomed:
            self.overlay.doom(path, mode)
        for index, record in enumerate(records):
            parent_path, _, name = record.path.rpartition(b"/")
            parent = await self._resolve(parent_path)
            if parent is None and (record.origin is None or record.stage is not None):
                parent = await self._make_directories(parent_path)  # its content must go somewhere
            if parent is None or parent.children is None:
                log.warning("recovery: no directory for %r", os.fsdecode(record.path))
                continue
            await self.listings.ensure(parent)
            occupant = parent.children.get(name)
            node = found.get(index)
            if node is None and not (
                record.origin is None or record.stage is not None or record.path in needed
            ):
                continue  # its remote object is gone and nothing of it is pending here
            if node is None and occupant is not None and occupant.origin is not None:
                if stat.S_IFMT(occupant.mode) == stat.S_IFMT(record.mode):
                    node = occupant  # a crashed flush created it already
            # Otherwise new, or content (or a directory holding what is pending) whose remote
            # object is not there (gone, or an upload that never landed): it is made again.
            self.overlay.place(parent, node, record)
        self.overlay.restored()
        return len(records) + len(checkpoint.doomed)

    async def _make_directories(self, path: bytes) -> Node | None:
        """The directory at ``path``, with the ones on its way the session does not have made
        again (they were removed there, or made by an upload that never landed)."""
        node = self.overlay.namespace.root
        for name in path.split(b"/") if path else []:
            if node.children is None:
                return None
            await self.listings.ensure(node)
            child = node.children.get(name)
            node = child if child is not None else self.overlay.make_directory(node, name)
        return node

    async def _replay(self, change: Change) -> int:
        """One change made after the checkpoint; 1 if it took effect."""
        match change:
            case Rename(old=old, new=new, exchange=exchange):
                parent = await self._resolve(new.rpartition(b"/")[0])
                if parent is None or parent.children is None:
                    return 0
                if old in self.parked and not exchange:
                    # A crashed flush's script moved it aside and left it there: it goes where the
                    # rename took it (what is at its old name now may be another object).
                    aside = await self._remote_object(self.parked[old])
                    if aside is not None:
                        self.overlay.attach_found(aside, parent, new.rpartition(b"/")[2])
                        return 1
                node = await self._resolve(old)
                if node is None or node.parent is None:
                    return 0
                flags = RENAME_EXCHANGE if exchange else 0
                await self.fs.rename(node.parent, node.name, parent, new.rpartition(b"/")[2], flags)
                return 1
            case Remove(path=path):
                node = await self._resolve(path)
                if node is None or node.parent is None:
                    return 0
                self.overlay.remove(node)
                return 1
            case Create(path=path, mode=mode, stage=stage, target=target):
                parent_path, _, name = path.rpartition(b"/")
                parent = await self._resolve(parent_path)
                if parent is None and stage is not None:  # its content must go somewhere
                    parent = await self._make_directories(parent_path)
                node = await self._resolve(path)
                if parent is None or parent.children is None:
                    return 0
                created = node is None
                if node is None:
                    node = self.overlay.create(parent, name, mode, target=target)
                staged = self.overlay.adopt_stage(node, stage) if stage is not None and node.is_regular else 0
                return int(created) or staged
            case Stage(path=path, stage=stage, base=base):
                node = await self._resolve(path)
                if node is None:
                    # The session removed the file while this content waited here: it is made again.
                    parent_path, _, name = path.rpartition(b"/")
                    parent = await self._resolve(parent_path) or await self._make_directories(parent_path)
                    if parent is None or parent.children is None or name in parent.children:
                        return 0
                    node = self.overlay.create(parent, name, stat.S_IFREG | 0o644)
                return self.overlay.adopt_stage(node, stage, base) if node.is_regular else 0
            case Meta(path=path, mode=mode, mtime_ns=mtime_ns, atime_ns=atime_ns):
                node = await self._resolve(path)
                if node is None:
                    return 0
                await self.fs.setattr(node, mode=mode, mtime_ns=mtime_ns, atime_ns=atime_ns)
                return 1
        return 0
