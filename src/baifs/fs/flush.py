"""Flush plans: what the overlay needs in the session, as uploads and one script.

`plan` reads the pending changes into a `FlushPlan` without changing the
namespace: content to upload in batches of up to 20 files, and at most one
shell script (`script`) for everything an upload cannot do. The script works
in phases, so that any combination of renames, replacements and deletions
(swaps and cycles included) lands right:

1. every remote object that moves or disappears is taken out of the way,
   deepest first: moved ones into the flush's directory
   ``.baifs-tmp/<token>/``, doomed ones removed one by one, and only as the
   mount knew them (`_removal`: ``rmdir`` for a directory, ``rm -f`` for a
   file; what the session put there meanwhile is kept and reported);
2. large uploads are assembled from their parts;
3. placements, shallowest first: new directories, moved objects, uploads that
   could not go to their final name, new symlinks;
4. modes, then modification times (deepest first, so placing children does
   not disturb a directory's time afterwards);
5. the flush's directory is removed, unless a step failed (then it may still
   hold an object that was moved aside: its node points there, and a later
   flush moves it on).

An upload goes straight to its final name only when that name is plain
printable UTF-8 (no ``"``, ``\\``, ``%``), the file fits one upload, the
script does not touch the name or any of its ancestors, and the session's
profile allows it (`profile.SessionProfile.direct_upload`: not inside a
virtual folder; where uploads are foreign to the container user, only over
an existing file). Otherwise it is uploaded under a temporary name in
``.baifs-tmp`` (in parts when large) and the script moves (and assembles) it
into place, replacing the target atomically. Into a virtual folder (another
file system) or where uploads are foreign, the script instead copies it to a
temporary name beside the target and renames that over the target: a reader
in the session sees the old file or the new one, and the file belongs to the
container user. Content uploaded to ``.baifs-tmp`` is named
``<token>.<name>``, flat, so that runs can remove it even where uploads
belong to another user; what the script itself makes there goes into
``<token>/``.

Coalescing that falls out of the planning: a doomed remote regular file that
an upload replaces is not removed (the upload overwrites it in place); a new
directory that receives a direct upload needs no ``mkdir``; a moved file with
new content is uploaded at its new name and its old remote object removed.
A *scoped* plan (``fsync`` of one file, or write-back while a user's run
holds the session's execution slot) carries only uploads that need no script.

Planning is pure: `plan` and `plan_uploads` read the namespace and change
nothing; `script` only numbers the steps in the plan's objects. What the
session then confirms is recorded by the overlay (`overlay.Overlay.confirm_uploads`,
`confirm_script`), step by step.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from . import scratch
from .model import Namespace, Node, depth, is_ancestor_or_self
from .profile import SessionProfile
from .remote import MAX_UPLOAD_BYTES
from .shell import ShellScript

#: Longer scripts travel as a file with the uploads instead of on the command line.
INLINE_SCRIPT_MAX = 96 * 1024
#: Modes an upload or a ``mkdir`` gives new objects (the agent's umask 022).
DEFAULT_FILE_MODE = stat.S_IFREG | 0o644
DEFAULT_DIR_MODE = stat.S_IFDIR | 0o755
_UNSAFE_BYTES = frozenset(b'"\\%') | frozenset(range(0x20)) | {0x7F}


def upload_safe(path: bytes) -> bool:
    """Whether a name can travel as a multipart file name and land unchanged."""
    if any(byte in _UNSAFE_BYTES for byte in path):
        return False
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def shown(path: bytes) -> str:
    """A path as a step's description shows it to a person."""
    return os.fsdecode(path)


@dataclass
class Upload:
    node: Node
    path: bytes
    stage: str
    version: int
    size: int
    #: where the content is uploaded: ``path``, or a name in the flush's directory.
    target: bytes
    parts: list[bytes] = field(default_factory=list)
    #: the remote mode after the upload (an overwrite keeps the old file's mode).
    remote_mode: int = DEFAULT_FILE_MODE
    #: the node's old remote object (a moved file with new content), removed by this flush.
    replaces: bytes | None = None
    assemble_step: int | None = None
    place_step: int | None = None

    @property
    def direct(self) -> bool:
        return self.target == self.path


@dataclass
class Move:
    node: Node
    origin: bytes
    path: bytes
    #: where phase 1 puts the object, in the flush's directory.
    parked: bytes
    park_step: int | None = None
    place_step: int | None = None


@dataclass
class Creation:
    """A new directory or symlink; not ``explicit`` when an upload creates it implicitly."""

    node: Node
    path: bytes
    remote_mode: int
    explicit: bool = False
    step: int | None = None


@dataclass
class MetaChange:
    node: Node
    path: bytes
    value: int
    step: int | None = None


@dataclass
class FlushPlan:
    token: bytes
    uploads: list[Upload] = field(default_factory=list)
    #: remote paths the script removes (the outermost of nested ones).
    doomed: dict[bytes, int] = field(default_factory=dict)
    #: doomed regular files that uploads overwrite in place (so nothing removes them).
    overwrites: dict[bytes, int] = field(default_factory=dict)
    removal_steps: dict[bytes, int] = field(default_factory=dict)
    moves: list[Move] = field(default_factory=list)
    creations: list[Creation] = field(default_factory=list)
    chmods: list[MetaChange] = field(default_factory=list)
    touches: list[MetaChange] = field(default_factory=list)
    #: access times set here (utimensat): the session stores them too.
    atimes: list[MetaChange] = field(default_factory=list)
    #: leftover directories of earlier flushes and reads, removed by this script.
    litter: list[bytes] = field(default_factory=list)
    #: the script, when the plan needs one (rendered by `script`).
    shell: ShellScript | None = None
    profile: SessionProfile = field(default_factory=SessionProfile)

    @property
    def tmp(self) -> bytes:
        """The directory of what the script makes (parked objects, its report)."""
        return scratch.flush_dir(self.token)

    @property
    def needs_script(self) -> bool:
        return bool(
            self.doomed
            or self.moves
            or self.chmods
            or self.touches
            or self.atimes
            or any(c.explicit for c in self.creations)
            or any(not u.direct for u in self.uploads)
        )

    @property
    def empty(self) -> bool:
        return not (self.uploads or self.creations or self.needs_script or self.litter)

    @property
    def upload_bytes(self) -> int:
        return sum(upload.size for upload in self.uploads)

    @property
    def stages(self) -> list[str]:
        return [upload.stage for upload in self.uploads]

    @property
    def script_file(self) -> bytes | None:
        """Where the script is uploaded to run from (it then keeps its report beside it), or None.

        A script that moves objects runs from a file, so that its report
        survives a lost answer (the objects moved aside must be found); so
        does one too long for a command line (the runner passes it to
        ``/bin/sh -c``, and the kernel caps one argument at 128 KiB).
        """
        if self.shell is None:
            return None
        if self.moves or len(self.shell.render().encode()) > INLINE_SCRIPT_MAX:
            return scratch.flush_script(self.token)
        return None

    @property
    def uses_tmp(self) -> bool:
        """Whether anything of this flush goes through its directory in the session."""
        return bool(self.moves) or any(not u.direct for u in self.uploads) or self.script_file is not None

    @property
    def report_file(self) -> bytes:
        return scratch.flush_report(self.token)

    def uploaded(self, node: Node) -> bool:
        return any(upload.node is node for upload in self.uploads)


def _new_content(node: Node) -> bool:
    return node.is_regular and node.dirty and node.stage is not None


def _fresh(node: Node) -> bool:
    """A moved file with new content: its old remote object is not worth moving, only removing."""
    return _new_content(node) and node.moved


def old_file_mode(node: Node) -> int:
    return node.remote_mode if node.remote_mode >= 0 else DEFAULT_FILE_MODE


def _script_paths(namespace: Namespace, doomed: Collection[bytes]) -> tuple[set[bytes], set[bytes]]:
    """Remote paths a script will touch: (move origins and doomed paths, move targets)."""
    moved = [n for n in namespace.pending if n.attached and n.moved and not _fresh(n)]
    sources = {n.origin for n in moved if n.origin is not None} | set(doomed)
    return sources, {n.path for n in moved}


def _direct_ok(
    path: bytes, size: int, sources: set[bytes], targets: set[bytes], profile: SessionProfile, overwrite: bool
) -> bool:
    return (
        profile.direct_upload(path, overwrite=overwrite)
        and upload_safe(path)
        and size <= MAX_UPLOAD_BYTES
        and not any(is_ancestor_or_self(p, path) for p in sources)
        and not any(is_ancestor_or_self(p, path) for p in targets)
    )


def _overwritten(doomed: dict[bytes, int], path: bytes) -> int | None:
    """The mode of a doomed regular file at ``path``, which an upload there overwrites in place."""
    mode = doomed.get(path)
    return mode if mode is not None and stat.S_ISREG(mode) else None


def _new_upload(node: Node) -> Upload:
    assert node.stage is not None
    upload = Upload(node, node.path, node.stage, node.content_version, node.size, target=node.path)
    if _fresh(node):
        upload.replaces = node.origin
    elif node.origin is not None and node.remote_mode >= 0:
        upload.remote_mode = node.remote_mode
    return upload


def _upload_directly(
    flush_plan: FlushPlan, node: Node, doomed: dict[bytes, int], sources: set[bytes], targets: set[bytes]
) -> Upload | None:
    """The upload of ``node`` to its own name, if nothing the script does is in the way.

    A doomed regular file at that name is overwritten in place, so it is
    taken out of ``doomed`` (the plan's copy); new parent directories come
    with the upload.
    """
    path = node.path
    overwritten = _overwritten(doomed, path)
    overwrite = overwritten is not None or (node.origin == path and not _fresh(node))
    allowed = sources - ({path} if overwritten is not None else set())
    if not _direct_ok(path, node.size, allowed, targets, flush_plan.profile, overwrite):
        return None
    upload = _new_upload(node)
    if overwritten is not None:
        flush_plan.overwrites[path] = doomed.pop(path)
        upload.remote_mode = overwritten
    _note_implied_directories(flush_plan, node)
    return upload


def _note_implied_directories(flush_plan: FlushPlan, node: Node) -> None:
    """New ancestor directories of a direct upload are created by the upload itself."""
    ancestor = node.parent
    known = {c.node for c in flush_plan.creations}
    while ancestor is not None and ancestor.origin is None and ancestor not in known:
        flush_plan.creations.append(Creation(ancestor, ancestor.path, DEFAULT_DIR_MODE))
        known.add(ancestor)
        ancestor = ancestor.parent


def _planned_doomed(namespace: Namespace, nodes: Collection[Node]) -> dict[bytes, int]:
    """The remote paths this plan sees as doomed: the namespace's, and the old objects of fresh files."""
    doomed = dict(namespace.doomed)
    for node in nodes:
        if node.attached and _fresh(node):
            assert node.origin is not None
            doomed[node.origin] = old_file_mode(node)
    return doomed


def plan_uploads(namespace: Namespace, scope: Collection[Node], profile: SessionProfile) -> FlushPlan:
    """A plan of only those uploads among ``scope`` that need no script."""
    flush_plan = FlushPlan(scratch.new_token(), profile=profile)
    doomed = _planned_doomed(namespace, scope)
    sources, targets = _script_paths(namespace, doomed)
    for node in sorted(scope, key=lambda n: depth(n.path)):
        if node.attached and _new_content(node):
            upload = _upload_directly(flush_plan, node, doomed, sources, targets)
            if upload is not None:
                flush_plan.uploads.append(upload)
    return flush_plan


def plan(
    namespace: Namespace,
    profile: SessionProfile,
    *,
    defer: Collection[Node] = (),
    litter: Collection[bytes] = (),
) -> FlushPlan:
    """Read the whole overlay (but the nodes in ``defer``) into a plan; the namespace is not changed."""
    flush_plan = FlushPlan(scratch.new_token(), litter=list(litter), profile=profile)
    nodes = sorted(
        (n for n in namespace.pending if n.attached and n not in defer), key=lambda n: depth(n.path)
    )
    doomed = _planned_doomed(namespace, nodes)
    sources, targets = _script_paths(namespace, doomed)

    for node in filter(_new_content, nodes):
        upload = _upload_directly(flush_plan, node, doomed, sources, targets)
        if upload is None:
            upload = _new_upload(node)
            upload.remote_mode = DEFAULT_FILE_MODE  # placed: a new file replaces the old one
            upload.target = scratch.staged(flush_plan.token, f"u{len(flush_plan.uploads)}".encode())
            if node.size > MAX_UPLOAD_BYTES:
                count = -(-node.size // MAX_UPLOAD_BYTES)
                upload.parts = [upload.target + f".{index:06d}".encode() for index in range(count)]
        flush_plan.uploads.append(upload)

    script_paths = sources | targets
    implied = {c.node for c in flush_plan.creations}
    for node in nodes:
        if node.moved and not _fresh(node):
            assert node.origin is not None
            parked = scratch.parked(flush_plan.token, len(flush_plan.moves))
            flush_plan.moves.append(Move(node, node.origin, node.path, parked))
        elif node.origin is None and (node.is_dir or node.is_symlink or node.is_fifo):
            if (
                node.is_dir
                and node in implied
                and not any(is_ancestor_or_self(p, node.path) for p in script_paths)
            ):
                continue
            flush_plan.creations = [c for c in flush_plan.creations if c.node is not node]
            mode = DEFAULT_DIR_MODE if node.is_dir else node.mode
            flush_plan.creations.append(Creation(node, node.path, mode, explicit=True))

    expected = {u.node: u.remote_mode for u in flush_plan.uploads}
    expected.update((c.node, c.remote_mode) for c in flush_plan.creations)
    for node in nodes:
        remote_mode = expected.get(node, node.remote_mode)
        if not node.is_symlink and remote_mode >= 0 and stat.S_IMODE(node.mode) != stat.S_IMODE(remote_mode):
            flush_plan.chmods.append(MetaChange(node, node.path, stat.S_IMODE(node.mode)))
        if node.mtime_dirty:
            flush_plan.touches.append(MetaChange(node, node.path, node.mtime_ns))
        if node.atime_dirty:
            flush_plan.atimes.append(MetaChange(node, node.path, node.atime_ns))
    flush_plan.doomed = doomed
    if flush_plan.needs_script or flush_plan.litter:
        flush_plan.shell = script(flush_plan)
    return flush_plan


def _removal(shell: ShellScript, path: bytes, mode: int) -> int:
    """The step removing one doomed object, and only what the mount removed.

    A directory goes by ``rmdir`` (what the mount saw in it was removed by
    deeper steps) and is kept when it is not an empty directory any more: the
    session put something in it, or something else there. A file or link
    goes by ``rm -f``, kept when the session made a directory of it. A path
    already gone counts as removed.
    """
    word = shell.word(path)
    real_dir = f"[ -d {word} ] && [ ! -L {word} ]"
    if stat.S_ISDIR(mode):
        return shell.step(
            f"rmdir -- {word}",
            f"remove directory {shown(path)}",
            needs=word,
            keeps=f'! {{ {real_dir} && [ -z "$(ls -A -- {word})" ]; }}',
        )
    return shell.step(f"rm -f -- {word}", f"remove {shown(path)}", needs=word, keeps=real_dir)


def script(flush_plan: FlushPlan) -> ShellScript:
    """The one shell script of a flush (see the module docstring for the phases); numbers its steps."""
    shell = ShellScript()
    tmp = shell.word(flush_plan.tmp)
    profile = flush_plan.profile
    for path in flush_plan.litter:
        litter = shell.word(path)
        shell.raw(f"rm -rf -- {litter} {litter}.*")
    if flush_plan.moves:
        shell.raw(f"mkdir -p -- {tmp}")
    if flush_plan.moves:
        shell.report_to = shell.word(flush_plan.report_file)
    phase_one: list[tuple[bytes, Move | None]] = [(m.origin, m) for m in flush_plan.moves]
    phase_one += [(path, None) for path in flush_plan.doomed]
    for path, move in sorted(phase_one, key=lambda item: -depth(item[0])):
        source = shell.word(path)
        if move is None:
            flush_plan.removal_steps[path] = _removal(shell, path, flush_plan.doomed[path])
        else:
            move.park_step = shell.step(
                f"mv -f -- {source} {shell.word(move.parked)}",
                f"move {shown(path)} aside",
                needs=source,
            )
    for upload in flush_plan.uploads:
        if upload.parts and not profile.copy_placement(upload.path):
            parts = shell.word(upload.target) + ".*"
            assembled = shell.word(upload.target)
            upload.assemble_step = shell.step(
                f"cat -- {parts} > {assembled} && rm -f -- {parts}", f"assemble {shown(upload.path)}"
            )
    placements: list[tuple[bytes, Callable[[], None]]] = []

    def made_parent(target: bytes) -> str:
        """A placement's directory, made again if the session removed it meanwhile (as an
        upload makes the directories it needs): the local change inside it is kept."""
        parent = target.rpartition(b"/")[0]
        return f"mkdir -p -- {shell.word(parent)} && " if parent else ""

    def place(source: bytes, target: bytes, description: str, needs_source: bool) -> int:
        source_word, target_word = shell.word(source), shell.word(target)
        command = (
            f"if [ -d {target_word} ] && [ ! -L {target_word} ]; then "
            f"echo 'a directory is in the way' >&2; false; "
            f"else {made_parent(target)}mv -f -- {source_word} {target_word}; fi"
        )
        return shell.step(command, description, needs=source_word if needs_source else None)

    for move in flush_plan.moves:

        def place_move(move: Move = move) -> None:
            move.place_step = place(move.parked, move.path, f"move to {shown(move.path)}", True)

        placements.append((move.path, place_move))

    def copy_into_place(upload: Upload, index: int) -> int:
        """Copy staged content beside the target, then rename it over: atomic, and the runner's own."""
        target = shell.word(upload.path)
        beside = shell.word(scratch.beside(upload.path, flush_plan.token, index))
        sources = shell.word(upload.target) + (".*" if upload.parts else "")
        command = (
            f"if [ -d {target} ] && [ ! -L {target} ]; then echo 'a directory is in the way' >&2; false; "
            f"elif {made_parent(upload.path)}cat -- {sources} > {beside} && mv -f -- {beside} {target}; "
            "then true; "
            f"else rm -f -- {beside}; false; fi"
        )
        return shell.step(command, f"place {shown(upload.path)}")

    for index, upload in enumerate(flush_plan.uploads):
        if not upload.direct:

            def place_upload(upload: Upload = upload, index: int = index) -> None:
                if profile.copy_placement(upload.path):
                    upload.place_step = copy_into_place(upload, index)
                else:
                    upload.place_step = place(
                        upload.target, upload.path, f"place {shown(upload.path)}", False
                    )

            placements.append((upload.path, place_upload))
    for creation in flush_plan.creations:
        if not creation.explicit:
            continue

        def create(creation: Creation = creation) -> None:
            target = shell.word(creation.path)
            if creation.node.is_dir:
                creation.step = shell.step(
                    f"mkdir -p -- {target}", f"create directory {shown(creation.path)}"
                )
            elif creation.node.is_fifo:
                # Repeatable: a FIFO an earlier, unconfirmed attempt made is kept.
                mode = stat.S_IMODE(creation.remote_mode)
                creation.step = shell.step(
                    f"[ -p {target} ] || mkfifo -m {mode:04o} -- {target}",
                    f"create FIFO {shown(creation.path)}",
                )
            else:
                # Repeatable: a link an earlier, unconfirmed attempt made is replaced.
                link = shell.word(creation.node.target or b"")
                creation.step = shell.step(
                    f"{{ [ ! -L {target} ] || rm -f -- {target}; }} && ln -s -- {link} {target}",
                    f"create symlink {shown(creation.path)}",
                )

        placements.append((creation.path, create))
    for _, add in sorted(placements, key=lambda item: depth(item[0])):
        add()
    placed_by = {m.node: m.place_step for m in flush_plan.moves if m.place_step is not None}
    placed_by.update((u.node, u.place_step) for u in flush_plan.uploads if u.place_step is not None)
    placed_by.update((c.node, c.step) for c in flush_plan.creations if c.explicit and c.step is not None)

    def placing(node: Node) -> list[int]:
        """The steps that put ``node`` (or a directory above it) where a step on its path expects it:
        if one failed, what is at that path is not the mount's object."""
        steps: list[int] = []
        each: Node | None = node
        while each is not None:
            if each in placed_by:
                steps.append(placed_by[each])
            each = each.parent
        return steps

    for change in flush_plan.chmods:
        change.step = shell.step(
            f"chmod {change.value:04o} -- {shell.word(change.path)}",
            f"chmod {shown(change.path)}",
            needs=shell.word(change.path),
            after=placing(change.node),
        )
    for which, changes in (("m", flush_plan.touches), ("a", flush_plan.atimes)):
        for change in sorted(changes, key=lambda c: -depth(c.path)):
            seconds, nanoseconds = divmod(change.value, 1_000_000_000)
            target = shell.word(change.path)
            change.step = shell.step(
                f"touch -c -{which} -h -d @{seconds}.{nanoseconds:09d} -- {target}",
                f"set the {which}time of {shown(change.path)}",
                needs=target,
                after=placing(change.node),
            )
    shell.raw(f'if [ "$failed" = 0 ]; then rm -rf -- {tmp} {tmp}.*; fi')
    if not profile.keeps_staging_dir:
        shell.raw(f"rmdir -- {shell.word(scratch.ROOT)} 2>/dev/null")
    return shell


@dataclass
class FlushReport:
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    script_ran: bool = False
    #: changes the session refused: each failed step's description, and what the session said.
    refused: dict[str, str] = field(default_factory=dict)
    #: nodes whose remote object vanished (something in the session removed it).
    vanished: list[Node] = field(default_factory=list)
    #: removals not done because the session holds something there the mount never saw.
    kept: list[str] = field(default_factory=list)
    #: the flush's temporary directory may be left in the session.
    left_tmp: bool = False
    #: only uploads were attempted (the execution slot was busy); the rest waits.
    partial: bool = False
