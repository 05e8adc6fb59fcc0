"""The overlay's one owner: every change to the local view of the session goes through `Overlay`.

The view is a tree of `model.Node` objects: what listings revealed of the
session, plus the changes made here and not pushed yet (`model` says how a
node's pending changes follow from its fields). `Overlay` is the only code
that changes it:

- *local changes* (`create`, `stage`, `content_changed`, `remove`,
  `rename`, `exchange`, `set_meta`, `localize`): each is written to the
  journal first (`changes`), then the tree changes, so a full disk fails the
  operation before anything shows; each wakes write-back (`changed`,
  `last_change`);
- *what the session showed* (`merge_listing`, `vanished`): a listing is
  folded in without undoing what is pending, and an object the session
  removed while it holds local changes is made again with them;
- *the staging life cycle*: content written here lives in a staging file
  until the session has it, then becomes the cached copy (`retire_stage`),
  or goes when its file does (`discard_stages`);
- *what a flush confirmed* (`confirm_uploads`, `confirm_script`,
  `confirm_placed`, `uncertain_uploads`): only what the session confirmed is
  recorded, wherever the nodes went while the flush was under way;
- *recovery's placing* of a checkpoint's nodes on a fresh tree (`adopt_remote`,
  `take_out`, `doom`, `make_directory`, `place`, `adopt_stage`), and the
  checkpoint itself (`checkpoint`).

Callers check and resolve (`filesystem` the POSIX rules, `recovery` the
journal's paths); the overlay changes. Concurrency: one trio thread, and no
method that changes the tree awaits, so a change is never seen half done
(only `save_checkpoint` awaits, for the disk). Kernel bookkeeping (lookup
and open counts) is its owners', and a symlink's target read from the
session is cached on its node by the reader.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from .changes import Change, Checkpoint, Create, Meta, PendingNode, Remove, Rename, ScriptMoves, Stage
from .content import ContentStore
from .flush import DEFAULT_FILE_MODE, Creation, FlushPlan, FlushReport, Move, Upload, old_file_mode
from .journal import Journal
from .model import LISTING_EXPIRED, Entry, Namespace, Node, depth, is_ancestor_or_self, join, same_mtime
from .shell import StepResults

log = logging.getLogger(__name__)


def content_base(node: Node) -> tuple[int, int] | None:
    """The session's version a local content change starts from, as last seen: (size, mtime_ns).

    Recovery compares it with the session's file before it puts the content
    back: a file the session changed since is not overwritten blindly.
    """
    if node.origin is None or node.remote_size < 0 or node.remote_mtime_ns < 0:
        return None
    return (node.remote_size, node.remote_mtime_ns)


def conflict_name(name: bytes, taken: Collection[bytes], when: float, host: str) -> bytes:
    """``NAME.baifs-conflict-YYYYMMDD-HHMMSS-HOST.EXT`` (before the extension, as Syncthing
    names its copies), with ``-N`` added while the name is taken."""
    stem, dot, extension = name.rpartition(b".")
    if not stem:  # no extension, or a dot file: the mark goes at the end
        stem, dot, extension = name, b"", b""
    mark = f".baifs-conflict-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}-{host}".encode()
    candidate = stem + mark + dot + extension
    number = 1
    while candidate in taken:
        number += 1
        candidate = stem + mark + f"-{number}".encode() + dot + extension
    return candidate


class Overlay:
    def __init__(self, namespace: Namespace, journal: Journal, store: ContentStore) -> None:
        self.namespace = namespace
        self.journal = journal
        self.store = store
        #: set by every local change; write-back takes it (`take_change`).
        self.changed = trio.Event()
        self.last_change = 0.0
        #: files recovery kept beside a file the session changed meanwhile.
        self.conflict_copies: list[str] = []
        #: recovery replays records the journal already holds: they are not written again.
        self._replaying = False

    def note_change(self) -> None:
        """Something is pending that write-back should push (a change, or changes recovered)."""
        self.last_change = time.monotonic()
        self.changed.set()

    def take_change(self) -> None:
        """Write-back is about to flush what is pending now: later changes set `changed` again."""
        self.changed = trio.Event()

    # -- local changes: the journal first, then the tree --------------------------

    def _record(self, change: Change, node: Node | None = None) -> None:
        """Write ``change`` to the journal, unless it is being replayed from there, or is about a
        node out of the tree (unlinked while open: its path names another object now)."""
        if not self._replaying and (node is None or node.attached):
            self.journal.record(change)

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Recovery replays the journal's records: the checkpoint after it records the outcome."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def create(
        self, parent: Node, name: bytes, mode: int, *, stage: str | None = None, target: bytes | None = None
    ) -> Node:
        """A new object (a full disk fails here, before the tree changes; its staging file goes)."""
        try:
            self._record(Create(join(parent.path, name), mode, stage, target))
        except BaseException:
            if stage is not None:
                self.store.discard_stage(stage)
            raise
        node = self.namespace.add_local(parent, name, mode)
        node.stage = stage
        if target is not None:
            node.target, node.size = target, len(target)
        parent.entries_changed(node.ctime_ns)
        self.note_change()
        return node

    def stage(self, node: Node, stage: str) -> None:
        """A regular file gets a staging copy that writes go to (the journal names it first)."""
        try:
            self._record(Stage(node.path, stage, content_base(node)), node)
        except OSError:
            self.store.discard_stage(stage)
            raise
        node.stage = stage

    def writing(self, node: Node) -> None:
        """The staging file of ``node`` is about to be written. A clean node's file was the session's
        content (kept while its remote mtime is unknown), which no record names any more: the journal
        names it as local content first, or a crash would lose what is written now."""
        if node.stage is not None and not node.dirty:
            self._record(Stage(node.path, node.stage, content_base(node)), node)

    def content_changed(self, node: Node, size: int) -> None:
        """The staging file of ``node`` was written or cut to ``size`` bytes."""
        node.size = size
        node.mtime_ns = node.ctime_ns = time.time_ns()
        node.content_version += 1
        node.dirty = True
        node.mtime_dirty = False
        if node.attached:
            self.namespace.pending.add(node)
            self.note_change()

    def refilled(self, node: Node) -> None:
        """The staging copy of a file open for writing holds the session's content again."""
        node.stage_stale = False

    def remove(self, node: Node) -> None:
        """A node (and what is below it) leaves the view; its remote objects are doomed."""
        self._record(Remove(node.path))
        if node.parent is not None:
            node.parent.entries_changed(time.time_ns())
        self._drop_subtree(node)
        self.note_change()

    def rename(self, node: Node, new_parent: Node, new_name: bytes) -> None:
        """Move ``node``; what was at the new name (checked by the caller) leaves the view."""
        assert new_parent.children is not None and node.parent is not None
        self._record(Rename(node.path, join(new_parent.path, new_name)))
        target = new_parent.children.get(new_name)
        if target is not None:
            self._drop_subtree(target)
        now = time.time_ns()
        node.parent.entries_changed(now)
        new_parent.entries_changed(now)
        node.ctime_ns = now
        self.namespace.rename(node, new_parent, new_name)
        self.note_change()

    def exchange(self, node: Node, other: Node) -> None:
        """RENAME_EXCHANGE: both names stay, their objects (and inode numbers) swap places."""
        self._record(Rename(node.path, other.path, exchange=True))
        now = time.time_ns()
        for each in (node, other):
            each.ctime_ns = now
            assert each.parent is not None
            each.parent.entries_changed(now)
        self.namespace.exchange(node, other)
        self.note_change()

    def set_meta(
        self,
        node: Node,
        *,
        mode: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """chmod, utimensat and chown. The session stores the mode and times (the journal keeps
        them until it does); the owner is kept for the mount's life only."""
        mode = None if mode is None else stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        stored = any(value is not None for value in (mode, mtime_ns, atime_ns))
        if stored:
            self._record(Meta(node.path, mode, mtime_ns, atime_ns), node)
        if mode is not None:
            node.mode = mode
        if mtime_ns is not None:
            node.mtime_ns, node.mtime_dirty = mtime_ns, True
        if atime_ns is not None:
            node.atime_ns, node.atime_dirty = atime_ns, True
        if owner is not None:
            node.owner = owner
        if stored or owner is not None:
            node.ctime_ns = time.time_ns()
        if stored:
            self.namespace.refresh_pending(node)
            self.note_change()

    def localize(self, node: Node, stage: str) -> None:
        """A moved remote file whose content is cached becomes local content (``stage`` holds a copy):
        its old remote object is doomed, so a new file can be uploaded over its old name."""
        if node.origin is None or node.stage is not None or not node.attached:  # changed meanwhile
            self.store.discard_stage(stage)
            return
        try:
            self._record(Stage(node.path, stage))
        except OSError:
            self.store.discard_stage(stage)
            raise
        self.namespace.doomed[node.origin] = node.remote_mode if node.remote_mode >= 0 else node.mode
        node.origin = None
        node.remote_mode = -1
        node.stage, node.dirty = stage, True
        self.namespace.refresh_pending(node)

    async def make_durable(self) -> None:
        """Everything recorded so far is on the disk (an application's fsync asks for it)."""
        await self.journal.sync()

    def forgotten(self, node: Node) -> None:
        """The kernel let go of ``node``: a node out of the tree and unused is forgotten."""
        self.namespace.release_if_unused(node)

    def note_script(self, flush_plan: FlushPlan) -> None:
        """The objects a flush's script is about to move aside, before it runs."""
        self._record(ScriptMoves(tuple((move.origin, move.parked) for move in flush_plan.moves)))

    def _drop_subtree(self, node: Node) -> None:
        """Remove a subtree from the tree (dooming its remote objects) with its local content."""
        gone = list(self.namespace.walk(node))
        self.namespace.remove(node)
        self.discard_stages(gone)
        for each in gone:
            if each.origin is not None:
                self.store.forget(each.origin)

    # -- the staging life cycle ------------------------------------------------------

    def discard_stages(self, nodes: list[Node]) -> None:
        """Local content of nodes that left the tree, unless a descriptor still uses it."""
        for node in nodes:
            if node.stage is not None and node.open_count == 0:
                self.store.discard_stage(node.stage)
                node.stage = None

    def forget_unused_stages(self) -> None:
        """Staging files no node of the tree refers to (a crash left them) are deleted."""
        in_use = {node.stage for node in self.namespace.walk(self.namespace.root) if node.stage}
        for orphan in self.store.stages() - in_use:
            self.store.discard_stage(orphan)

    def released(self, node: Node) -> None:
        """The last descriptor of ``node`` closed: its staging copy goes, or becomes the cached
        copy once the session has it; a node out of the tree and the kernel is forgotten."""
        if node.stage is not None and node.open_count == 0:
            if not node.attached or node.stage_stale:
                self.store.discard_stage(node.stage)  # gone, or older than the session's content
                node.stage, node.stage_stale = None, False
            elif not node.dirty and node.origin is not None:
                self.retire_stage(node)
        self.namespace.release_if_unused(node)

    # -- what the session showed -------------------------------------------------------

    def merge_listing(self, directory: Node, entries: list[Entry], hidden: set[bytes]) -> list[Node]:
        """Fold a listing of ``directory`` into the tree; the nodes it took out (their kernel entries go)."""
        merged = self.namespace.merge_listing(directory, entries, hidden)
        directory.listed_at = time.monotonic()
        for stage in merged.stale:
            self.store.discard_stage(stage)
        self.discard_stages(merged.removed)
        for child in (directory.children or {}).values():
            if (
                child.stage is not None
                and not child.dirty
                and child.open_count == 0
                and child.origin is not None
            ):
                self.retire_stage(child)  # its mtime is known now
        return merged.removed

    def vanished(self, nodes: list[Node]) -> list[Node]:
        """Remote objects something in the session removed behind our back; the nodes taken out."""
        gone = []
        for node in nodes:
            if node.parent is None or not node.attached or node.origin is None:
                continue
            node.parent.listed_at = LISTING_EXPIRED
            gone += self.namespace.lose_remote(node)
        self.discard_stages(gone)
        return gone

    # -- what a flush confirmed --------------------------------------------------------

    def confirm_uploads(self, flush_plan: FlushPlan, listings: dict[bytes, list[Entry]]) -> None:
        """The plan's uploads are on the session: direct ones are the nodes' remote objects now."""
        by_path = {
            join(parent, entry.name): entry for parent, entries in listings.items() for entry in entries
        }
        for path in flush_plan.overwrites:
            self.namespace.doomed.pop(path, None)
        for creation in sorted(flush_plan.creations, key=lambda c: depth(c.path)):
            if not creation.explicit:
                self._settle_creation(creation, StepResults())
        for upload in flush_plan.uploads:
            if upload.direct:
                # An old object another upload of this flush overwrote in place is gone: it is that
                # upload's node's now, and must not be doomed again.
                overwritten = upload.replaces in flush_plan.overwrites
                self._settle_upload(upload, by_path.get(upload.target), replaced_gone=overwritten)

    def confirm_script(self, flush_plan: FlushPlan, steps: StepResults, report: FlushReport) -> None:
        """Record the script's confirmed steps; a step not confirmed leaves its change pending."""
        namespace = self.namespace
        removed = [
            path for path, step in flush_plan.removal_steps.items() if steps.done(step) or step in steps.gone
        ]
        for path, step in flush_plan.removal_steps.items():
            if step in steps.kept:
                # The session's object stays (the next listing shows it), and the user is told.
                namespace.doomed.pop(path, None)
                report.kept.append(
                    f"{steps.descriptions[step]}: not done, the session holds something there "
                    "the mount never saw; it is kept"
                )

        def was_removed(path: bytes) -> bool:
            return any(is_ancestor_or_self(gone, path) for gone in removed)

        for path in removed:
            for gone in [d for d in namespace.doomed if is_ancestor_or_self(path, d)]:
                del namespace.doomed[gone]
        # Deepest origins first, as phase 1 moved them: a directory's move then
        # relocates only what was still inside it.
        for move in sorted(flush_plan.moves, key=lambda m: -depth(m.origin)):
            self._settle_move(move, steps, report)
        for creation in sorted(flush_plan.creations, key=lambda c: depth(c.path)):
            if creation.explicit:
                self._settle_creation(creation, steps)
        for upload in flush_plan.uploads:
            if upload.direct:
                continue
            replaced_gone = upload.replaces is not None and (
                was_removed(upload.replaces) or upload.replaces in flush_plan.overwrites
            )
            if steps.done(upload.assemble_step) and steps.done(upload.place_step):
                self._settle_upload(upload, None, replaced_gone=replaced_gone)
            elif replaced_gone:
                assert upload.replaces is not None
                self._lose_origin(upload.node, upload.replaces)
        for change in flush_plan.chmods:
            if steps.done(change.step):
                change.node.remote_mode = stat.S_IFMT(change.node.mode) | change.value
            elif change.step in steps.gone:
                report.vanished.append(change.node)
            namespace.refresh_pending(change.node)
        for change in flush_plan.touches:
            node = change.node
            if steps.done(change.step):
                if node.mtime_dirty and node.mtime_ns == change.value:
                    node.mtime_dirty = False
                if node.remote_mtime_ns >= 0:
                    node.remote_mtime_ns = change.value
            elif change.step in steps.gone:
                report.vanished.append(node)
            namespace.refresh_pending(node)
        for change in flush_plan.atimes:
            node = change.node
            if steps.done(change.step) and node.atime_dirty and node.atime_ns == change.value:
                node.atime_dirty = False
            elif change.step in steps.gone:
                report.vanished.append(node)
            namespace.refresh_pending(node)
        if steps.maybe:
            self._uncertain_steps(flush_plan, steps)
        report.refused = {
            steps.descriptions[step]: steps.words.get(step, "") for step in sorted(steps.failed)
        }
        if steps.failed or not steps.complete:
            report.left_tmp = flush_plan.uses_tmp

    def _lose_origin(self, node: Node, origin: bytes) -> None:
        """The node's old remote object was removed but its new content not placed: it is new again."""
        if node.origin == origin:
            node.origin = None
            node.remote_mode = -1
            self.namespace.refresh_pending(node)

    def _settle_move(self, move: Move, steps: StepResults, report: FlushReport) -> None:
        node = move.node
        namespace = self.namespace
        if move.park_step in steps.gone:
            report.vanished.append(node)
            return
        if not steps.done(move.park_step):
            return
        landed = move.path if steps.done(move.place_step) else move.parked

        def relocated(path: bytes) -> bytes:
            return landed + path[len(move.origin) :] if is_ancestor_or_self(move.origin, path) else path

        self.store.rename(move.origin, landed)
        # Nodes inside the moved object (some may have moved elsewhere meanwhile)
        # and removals decided meanwhile now refer to where the object landed.
        for other in {*namespace.walk(node), *namespace.pending}:
            if other.origin is not None:
                other.origin = relocated(other.origin)
        namespace.doomed = {relocated(path): mode for path, mode in namespace.doomed.items()}
        namespace.refresh_pending(node)

    def _settle_creation(self, creation: Creation, steps: StepResults) -> None:
        node = creation.node
        if (creation.explicit and not steps.done(creation.step)) or node.origin is not None:
            return
        if node.attached:
            node.origin, node.maybe_at = creation.path, None
            node.remote_mode = creation.remote_mode
            if node.is_symlink:
                node.remote_size = len(node.target or b"")
            if node.is_dir and node.listed_at is None:
                node.listed_at = time.monotonic()  # made here: its content is what the mount knows
        else:
            self.namespace.doomed[creation.path] = creation.remote_mode
        self.namespace.refresh_pending(node)
        for child in (node.children or {}).values():
            # A remote object moved into the new directory is where it belongs now, if its own
            # move was settled before the directory was (moves are settled first).
            self.namespace.refresh_pending(child)

    def _settle_upload(self, upload: Upload, entry: Entry | None, *, replaced_gone: bool) -> None:
        """The uploaded copy is the node's remote object now, wherever the node went meanwhile."""
        node = upload.node
        namespace = self.namespace
        if upload.replaces is not None and node.origin == upload.replaces and not replaced_gone:
            # Its old object goes too (this flush's script removes it, or a later one).
            namespace.doomed.setdefault(upload.replaces, old_file_mode(node))
        if not node.attached:
            namespace.doomed[upload.path] = upload.remote_mode  # deleted while it was uploaded
            return
        node.origin, node.maybe_at = upload.path, None
        if entry is not None and entry.size == upload.size:
            node.set_remote(entry)
        else:
            node.remote_size, node.remote_mtime_ns = upload.size, -1
            node.remote_mode = upload.remote_mode
        if node.content_version == upload.version and node.stage == upload.stage:
            node.dirty = False
            if node.write_count == 0:
                self.retire_stage(node)
        namespace.refresh_pending(node)

    def confirm_placed(self, placed: list[Upload], listings: dict[bytes, list[Entry]]) -> None:
        """Listings of where the script placed files: their remote (size, mtime), now known."""
        for upload in placed:
            node = upload.node
            parent, _, name = upload.path.rpartition(b"/")
            entry = next((e for e in listings.get(parent, []) if e.name == name), None)
            if (
                entry is None
                or entry.size != upload.size
                or node.origin != upload.path
                or node.remote_mtime_ns >= 0
            ):
                continue
            node.set_remote(entry)
            if node.stage is not None and not node.dirty and node.write_count == 0:
                self.retire_stage(node)

    def retire_stage(self, node: Node) -> None:
        """Clean local content is on the session: keep it as the cached copy.

        While the remote object's mtime is unknown (a file the script placed),
        the staging file stays the node's content: the cache could not tell
        that version from another, and reading it must not need the session.
        """
        assert node.stage is not None and node.origin is not None
        if node.remote_mtime_ns < 0:
            return
        if node.remote_size == node.size:
            self.store.adopt_stage(node.stage, node.origin, node.size, node.remote_mtime_ns)
        else:
            self.store.discard_stage(node.stage)
        node.stage = None

    def uncertain_uploads(self, flush_plan: FlushPlan) -> None:
        """Uploads that may have landed without being confirmed (a failed or cancelled flush).

        What they may have made is taken to be there, so that a removal or a
        move here reaches it (a removal is ``rm -f``/``rmdir`` of what is
        found, so taking too much costs nothing): the directories the
        uploads imply are recorded as made, and a new file's node takes the
        uploaded name as its remote object, still dirty. Where a node has
        left that name meanwhile, the name is doomed: otherwise a file
        deleted or renamed here could reappear.
        """
        for creation in sorted(flush_plan.creations, key=lambda c: depth(c.path)):
            if not creation.explicit:
                self._settle_creation(creation, StepResults())
        for upload in flush_plan.uploads:
            node = upload.node
            if not upload.direct or node.origin == upload.path:
                continue
            if not node.attached or node.path != upload.path:
                self.namespace.doomed.setdefault(upload.path, upload.remote_mode)
            elif node.origin is None:
                node.origin, node.remote_mode = upload.path, upload.remote_mode
                self.namespace.refresh_pending(node)

    def _uncertain_steps(self, flush_plan: FlushPlan, steps: StepResults) -> None:
        """A script's steps its report does not confirm may have happened all the same (its answer
        was lost). Where one made an object for a node that has left that name meanwhile (removed,
        renamed), the name is doomed, as for an upload that may have landed: otherwise an object
        deleted here could stay in the session. A node still there has it made again, which the
        steps allow (``mkdir -p``, a link replaced, a placement over it), and the name is doomed if
        the node leaves it first (`model.Node.maybe_at`)."""
        made = [(c.node, c.path, c.remote_mode, c.step) for c in flush_plan.creations if c.explicit]
        made += [
            (u.node, u.path, DEFAULT_FILE_MODE, u.place_step) for u in flush_plan.uploads if not u.direct
        ]
        for node, path, mode, step in made:
            if steps.done(step) or node.origin is not None:
                continue
            if node.attached and node.path == path:
                node.maybe_at = path  # doomed if the node leaves the name before it is made again
            else:
                self.namespace.doomed.setdefault(path, mode)

    # -- recovery's placing of a checkpoint --------------------------------------------

    def adopt_remote(self, path: bytes, entry: Entry) -> Node:
        """A detached node for a remote object the view does not show (one a script parked)."""
        node = self.namespace.new_node(entry.name, entry.mode, origin=path)
        node.take_remote_attributes(entry)
        return node

    def take_out(self, node: Node) -> None:
        """Unhook a node found for a checkpoint record before nodes are placed where they belong;
        until `restored`, listings leave its remote object to it (no second node for it)."""
        if node.attached:
            self.namespace.unhook(node)
        if node.origin is not None:
            self.namespace.restoring.add(node.origin)

    def restored(self) -> None:
        """Every checkpoint record is placed: listings show every remote object again."""
        self.namespace.restoring.clear()

    def attach_found(self, node: Node, parent: Node, name: bytes) -> None:
        """An object a crashed flush left aside goes where the journal's rename took it (what
        stands at that name goes, as the rename replaced it)."""
        assert parent.children is not None
        occupant = parent.children.get(name)
        if occupant is not None and occupant is not node:
            self._drop_subtree(occupant)
        node.name = name
        self.namespace.attach(parent, node)
        self.namespace.refresh_pending(node)

    def doom(self, path: bytes, mode: int) -> None:
        """A checkpoint's doomed remote path: whatever stands for it in the view goes."""
        node = self.namespace.resolve(path)
        if node is not None and node.parent is not None and node.origin == path:
            self.namespace.detach(node)
        self.namespace.doomed[path] = mode

    def make_directory(self, parent: Node, name: bytes) -> Node:
        """A directory on the way to recovered changes that the session does not have: made again."""
        return self.namespace.add_local(parent, name, stat.S_IFDIR | 0o755)

    def place(self, parent: Node, node: Node | None, record: PendingNode) -> Node:
        """Attach a checkpoint's node at its path (a new one when ``node`` is None) with what it records."""
        assert parent.children is not None
        name = record.path.rpartition(b"/")[2]
        occupant = parent.children.get(name)
        if node is None:
            node = self.namespace.new_node(name, record.mode, origin=None)
        if occupant is not None and occupant is not node:
            self.namespace.remove(occupant)
        if occupant is not node:
            node.name = name
            self.namespace.attach(parent, node)
        node.mode = record.mode
        if record.mtime_ns is not None:
            node.mtime_ns, node.mtime_dirty = record.mtime_ns, True
        if record.atime_ns is not None:
            node.atime_ns, node.atime_dirty = record.atime_ns, True
        if record.target is not None:
            node.target, node.size = record.target, len(record.target)
        if record.stage is not None and node.is_regular:
            self.adopt_stage(node, record.stage, record.base)
        elif node.is_regular and node.origin is None and node.stage is None:
            self.adopt_stage(node, self.store.new_stage())
        self.namespace.refresh_pending(node)
        return node

    def adopt_stage(self, node: Node, stage: str, base: tuple[int, int] | None = None) -> int:
        """Give a node the content a journal record names; 1 if it was still there.

        When the session's file is no longer the version the change started
        from (``base``), the content goes to a conflict copy beside it instead.
        """
        staged_file = self.store.stage_path(stage)
        if not staged_file.exists():
            return 0  # uploaded and retired into the cache before the journal was checkpointed
        if base is not None and node.origin is not None and not node.dirty:
            size, mtime_ns = base
            if node.remote_size != size or not same_mtime(mtime_ns, node.remote_mtime_ns):
                self._keep_both(node, stage)
                return 1
        node.stage = stage
        node.size = staged_file.stat().st_size
        node.content_version += 1
        node.dirty = True
        self.namespace.refresh_pending(node)
        return 1

    def _keep_both(self, node: Node, stage: str) -> None:
        """The session changed a file after this machine's change to it was recorded: keep both."""
        parent = node.parent
        assert parent is not None and parent.children is not None
        name = conflict_name(node.name, parent.children, time.time(), socket.gethostname())
        copy = self.namespace.add_local(parent, name, stat.S_IFREG | stat.S_IMODE(node.mode))
        copy.stage = stage
        copy.size = self.store.stage_path(stage).stat().st_size
        self.conflict_copies.append(os.fsdecode(copy.path))
        log.warning(
            "recovery: %s changed in the session after this machine's change to it was recorded; the "
            "session's version keeps the name, this machine's is %s",
            os.fsdecode(node.path),
            os.fsdecode(copy.path),
        )

    # -- the checkpoint ------------------------------------------------------------------

    def status(self, paths: int) -> dict[str, Any]:
        """What is pending, for ``baifs status``: counts, and the first ``paths`` paths."""
        namespace = self.namespace
        pending = [n for n in namespace.pending if n.attached]
        uploads = [n for n in pending if n.dirty and n.is_regular]
        return {
            "uploads": len(uploads),
            "upload_bytes": sum(n.size for n in uploads),
            "namespace_changes": len(namespace.doomed)
            + sum(1 for n in pending if not (n.dirty and n.is_regular)),
            "paths": sorted(os.fsdecode(n.path) for n in pending)[:paths],
            "more_paths": max(0, len(pending) - paths),
        }

    async def save_checkpoint(self) -> None:
        """Replace the journal by the overlay as it is now; a full disk keeps the older journal."""
        try:
            await self.journal.checkpoint(self.checkpoint())
        except OSError as error:
            log.warning("journal checkpoint failed (%s); the journal keeps the longer record", error)

    def checkpoint(self) -> Checkpoint:
        """The whole overlay as it is now, by path (pending nodes shallowest first)."""
        namespace = self.namespace
        nodes = tuple(
            PendingNode(
                node.path,
                node.origin,
                node.mode,
                node.stage if node.dirty else None,
                content_base(node) if node.dirty else None,
                node.mtime_ns if node.mtime_dirty else None,
                node.atime_ns if node.atime_dirty else None,
                node.target,
            )
            for node in sorted((n for n in namespace.pending if n.attached), key=lambda n: depth(n.path))
        )
        return Checkpoint(nodes, tuple(sorted(namespace.doomed.items())))
