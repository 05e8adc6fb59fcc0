"""Recovery: rebuilding what an earlier mount of the session had not pushed.

At mount time the journal (`journal`) holds the overlay as it was after the
last flush (the ``state`` record) and the operations made after it. Both are
replayed onto a fresh tree built from the session's listings:

1. every remote object the state mentions is found by its remote path first,
   before anything moves (an object a crashed flush had moved aside into
   ``.baifs-tmp`` is found where the journal's ``script`` record says);
2. the objects that must be elsewhere are detached, doomed paths removed,
   then everything is attached where the state says, shallowest first, with
   its mode, set mtime, staged content or symlink target;
3. the later operations go through the normal `Filesystem` methods.

Replay never overwrites blindly what the session changed since: content
recorded with the session's version it started from (``base``, size and
mtime) is put back only while the session's file is still that version.
Otherwise both are kept: the session's file keeps its name, and this
machine's content becomes a new file beside it,
``NAME.baifs-conflict-YYYYMMDD-HHMMSS-HOST.EXT``, logged and counted in
``baifs status`` ("conflict copies").

Replay is idempotent in effect: a crashed flush may have done part of its
work already, so an object found at its destination is taken as moved, a
new object found already created is adopted, and an operation whose source
is gone is skipped (and logged). Staging files no record refers to are
deleted; the session's leftover scratch directories are noted for removal.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Collection
from typing import Any

from ..api.errors import BaifsError, RemotePathError
from .filesystem import RENAME_EXCHANGE, Filesystem, FSError
from .flush import REMOTE_TMP, remote_name
from .journal import decode_path
from .model import Node, join, same_mtime

log = logging.getLogger(__name__)


async def recover(fs: Filesystem) -> int:
    """Replay the journal an earlier mount left; returns the number of changes recovered."""
    contents = fs.journal.read()
    recovered = 0
    if not contents.empty:
        parked = {
            decode_path(origin): decode_path(where)
            for record in contents.operations
            if record["op"] == "script"
            for origin, where in record.get("moves", [])
        }
        if contents.state is not None:
            recovered += await _restore_state(fs, contents.state, parked)
        for record in contents.operations:
            try:
                recovered += await _replay(fs, record)
            except (FSError, BaifsError, OSError) as error:
                log.warning("recovery: skipped %s (%s)", record.get("op"), error)
    in_use = {node.stage for node in fs.namespace.walk(fs.namespace.root) if node.stage}
    for orphan in fs.store.stages() - in_use:
        fs.store.discard_stage(orphan)
    await _note_leftover_scratch(fs)
    await fs.sync.checkpoint()
    return recovered


async def _resolve(fs: Filesystem, path: bytes) -> Node | None:
    """The node at a path of the local view, listing directories as needed."""
    node = fs.namespace.root
    for name in path.split(b"/") if path else []:
        try:
            node = await fs.lookup(node, name)
        except FSError:
            return None
    return node


async def _remote_object(fs: Filesystem, remote_path: bytes) -> Node | None:
    """A detached node for a remote object the view does not show (a parked one)."""
    parent, _, name = remote_path.rpartition(b"/")
    try:
        entries = await fs.fetcher.aliases.list_dir(parent)
    except (RemotePathError, BaifsError):
        return None
    for entry in entries:
        if entry.name.encode("utf-8", "surrogateescape") == name:
            node = fs.namespace.new_node(name, entry.mode, origin=remote_path)
            node.take_remote_attributes(entry)
            return node
    return None


async def _restore_state(fs: Filesystem, state: dict[str, Any], parked: dict[bytes, bytes]) -> int:
    namespace = fs.namespace
    records = state.get("nodes", [])
    #: directories other records are inside: made again when the session does not have them
    #: (removed there, or made by an upload that never landed).
    needed = {
        path[:index]
        for record in records
        for path in [decode_path(record["path"])]
        for index in range(len(path))
        if path[index : index + 1] == b"/"
    }
    found: dict[int, Node] = {}
    for index, record in enumerate(records):
        if record["origin"] is None:
            continue
        origin, path = decode_path(record["origin"]), decode_path(record["path"])
        node = await _resolve(fs, origin)
        if node is None and origin in parked:
            node = await _remote_object(fs, parked[origin])
        if node is None and origin != path:
            node = await _resolve(fs, path)  # the crashed flush moved it already
        if node is None:
            log.warning("recovery: %r is no longer in the session", remote_name(origin))
            continue
        found[index] = node
    for node in found.values():
        if node.attached:
            namespace.unhook(node)
    for path_text, mode in state.get("doomed", []):
        path = decode_path(path_text)
        node = namespace.resolve(path)
        if node is not None and node.parent is not None and node.origin == path:
            namespace.detach(node)
        namespace.doomed[path] = mode
    for index, record in enumerate(records):
        path = decode_path(record["path"])
        parent_path, _, name = path.rpartition(b"/")
        parent = await _resolve(fs, parent_path)
        if parent is None and (record["origin"] is None or record.get("stage") is not None):
            parent = await _make_directories(fs, parent_path)  # its content must go somewhere
        if parent is None or parent.children is None:
            log.warning("recovery: no directory for %r", remote_name(path))
            continue
        await fs.ensure_listed(parent)
        occupant = parent.children.get(name)
        node = found.get(index)
        if node is None and (record["origin"] is None or record.get("stage") is not None or path in needed):
            # New, or content (or a directory holding what is pending) whose remote object is
            # not there (gone, or an upload that never landed): it is made again.
            kind = record["mode"] & 0o170000
            if occupant is not None and occupant.origin is not None and (occupant.mode & 0o170000) == kind:
                node = occupant  # a crashed flush created it already
            else:
                node = namespace.new_node(name, record["mode"], origin=None)
        if node is None:
            continue
        if occupant is not None and occupant is not node:
            namespace.remove(occupant)
        node.name = name
        namespace.attach(parent, node)
        _apply_attributes(fs, node, record)
    return len(records) + len(state.get("doomed", []))


async def _make_directories(fs: Filesystem, path: bytes) -> Node | None:
    """The directory at ``path``, with the ones on its way the session does not have made
    again (they were removed there, or made by an upload that never landed)."""
    node = fs.namespace.root
    for name in path.split(b"/") if path else []:
        if node.children is None:
            return None
        await fs.ensure_listed(node)
        child = node.children.get(name)
        if child is None:
            child = fs.namespace.add_local(node, name, stat.S_IFDIR | 0o755)
        node = child
    return node


def _apply_attributes(fs: Filesystem, node: Node, record: dict[str, Any]) -> None:
    node.mode = record["mode"]
    if record.get("mtime_ns") is not None:
        node.mtime_ns = int(record["mtime_ns"])
        node.mtime_dirty = True
    if record.get("atime_ns") is not None:
        node.atime_ns = int(record["atime_ns"])
        node.atime_dirty = True
    if record.get("target") is not None:
        node.target = decode_path(record["target"])
        node.size = len(node.target)
    if record.get("stage") is not None and node.is_regular:
        _adopt_stage(fs, node, record["stage"], record.get("base"))
    elif node.is_regular and node.origin is None and node.stage is None:
        _adopt_stage(fs, node, fs.store.new_stage())
    fs.namespace.refresh_pending(node)


def _adopt_stage(fs: Filesystem, node: Node, stage: str, base: list[int] | None = None) -> int:
    """Give a node the content a journal record names; 1 if it was still there.

    When the session's file is no longer the version the change started
    from (``base``), the content goes to a conflict copy beside it instead.
    """
    staged_file = fs.store.stage_path(stage)
    if not staged_file.exists():
        return 0  # uploaded and retired into the cache before the journal was checkpointed
    if base is not None and node.origin is not None and not node.dirty:
        size, mtime_ns = base
        if node.remote_size != size or not same_mtime(mtime_ns, node.remote_mtime_ns):
            return _keep_both(fs, node, stage)
    node.stage = stage
    node.size = staged_file.stat().st_size
    node.content_version += 1
    node.dirty = True
    fs.namespace.refresh_pending(node)
    return 1


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


def _keep_both(fs: Filesystem, node: Node, stage: str) -> int:
    """The session changed a file after this machine's change to it was recorded: keep both."""
    parent = node.parent
    assert parent is not None and parent.children is not None
    name = conflict_name(node.name, parent.children, time.time(), socket.gethostname())
    copy = fs.namespace.add_local(parent, name, stat.S_IFREG | stat.S_IMODE(node.mode))
    copy.stage = stage
    copy.size = fs.store.stage_path(stage).stat().st_size
    fs.sync.stats.conflict_copies.append(os.fsdecode(copy.path))
    log.warning(
        "recovery: %s changed in the session after this machine's change to it was recorded; the "
        "session's version keeps the name, this machine's is %s",
        os.fsdecode(node.path),
        os.fsdecode(copy.path),
    )
    return 1


async def _replay(fs: Filesystem, record: dict[str, Any]) -> int:
    op = record["op"]
    if op == "script":
        return 0
    if op == "rename":
        old, new = decode_path(record["old"]), decode_path(record["new"])
        node = await _resolve(fs, old)
        parent = await _resolve(fs, new.rpartition(b"/")[0])
        if node is None or node.parent is None or parent is None:
            return 0
        flags = RENAME_EXCHANGE if record.get("exchange") else 0
        await fs.rename(node.parent, node.name, parent, new.rpartition(b"/")[2], flags)
        return 1
    path = decode_path(record["path"])
    parent_path, _, name = path.rpartition(b"/")
    node = await _resolve(fs, path)
    if op == "remove":
        if node is None or node.parent is None:
            return 0
        fs.remove_tree(node)
        return 1
    if op == "create":
        parent = await _resolve(fs, parent_path)
        if parent is None or parent.children is None:
            return 0
        created = node is None
        if node is None:
            node = fs.namespace.add_local(parent, name, int(record["mode"]))
            if "target" in record:
                node.target = decode_path(record["target"])
                node.size = len(node.target)
        staged = _adopt_stage(fs, node, record["stage"]) if "stage" in record and node.is_regular else 0
        return int(created) or staged
    if node is None:
        return 0
    if op == "stage" and node.is_regular:
        return _adopt_stage(fs, node, record["stage"], record.get("base"))
    if op == "meta":
        await fs.setattr(
            node,
            mode=record.get("mode"),
            mtime_ns=record.get("mtime_ns"),
            atime_ns=record.get("atime_ns"),
        )
        return 1
    return 0


async def _note_leftover_scratch(fs: Filesystem) -> None:
    try:
        entries = await fs.session.list_dir(remote_name(REMOTE_TMP))
    except RemotePathError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
        return
    fs.sync.leftover_tmp.update(
        join(REMOTE_TMP, entry.name.encode("utf-8", "surrogateescape")) for entry in entries
    )
