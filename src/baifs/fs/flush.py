"""Flush plans: what the overlay needs in the session, as uploads and one script, and how to commit it.

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

Committing is step by step and records only what the session confirmed
(`commit_uploads` once uploads are verified, `commit_script` with the
script's report): a change whose step did not happen, or whose outcome is
unknown, stays pending exactly as it was. Changes made in the mount while the
flush went are kept: commits follow each node wherever it went meanwhile.
"""

from __future__ import annotations

import secrets
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from ..api.client import MAX_UPLOAD_BYTES
from ..api.listing import RemoteEntry
from .content import ContentStore
from .model import Namespace, Node, depth, is_ancestor_or_self, join
from .profile import SessionProfile
from .shell import ShellScript, StepResults

REMOTE_TMP = b".baifs-tmp"
#: Longer scripts travel as a file with the uploads instead of on the command line.
INLINE_SCRIPT_MAX = 96 * 1024
SCRIPT_SUFFIX = b".sh"
REPORT_NAME = b"report"
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


def remote_name(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


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
        return join(REMOTE_TMP, self.token)

    def staged(self, name: bytes) -> bytes:
        """Where uploaded content waits for the script: flat in ``.baifs-tmp``, named by the token."""
        return self.tmp + b"." + name

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
            return self.staged(SCRIPT_SUFFIX[1:])
        return None

    @property
    def uses_tmp(self) -> bool:
        """Whether anything of this flush goes through its directory in the session."""
        return bool(self.moves) or any(not u.direct for u in self.uploads) or self.script_file is not None

    @property
    def report_file(self) -> bytes:
        return join(self.tmp, REPORT_NAME)

    def uploaded(self, node: Node) -> bool:
        return any(upload.node is node for upload in self.uploads)


def _new_content(node: Node) -> bool:
    return node.is_regular and node.dirty and node.stage is not None


def _fresh(node: Node) -> bool:
    """A moved file with new content: its old remote object is not worth moving, only removing."""
    return _new_content(node) and node.moved


def _old_mode(node: Node) -> int:
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
            doomed[node.origin] = _old_mode(node)
    return doomed


def plan_uploads(namespace: Namespace, scope: Collection[Node], profile: SessionProfile) -> FlushPlan:
    """A plan of only those uploads among ``scope`` that need no script."""
    flush_plan = FlushPlan(secrets.token_hex(6).encode(), profile=profile)
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
    flush_plan = FlushPlan(secrets.token_hex(6).encode(), litter=list(litter), profile=profile)
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
            upload.target = flush_plan.staged(f"u{len(flush_plan.uploads)}".encode())
            if node.size > MAX_UPLOAD_BYTES:
                count = -(-node.size // MAX_UPLOAD_BYTES)
                upload.parts = [upload.target + f".{index:06d}".encode() for index in range(count)]
        flush_plan.uploads.append(upload)

    script_paths = sources | targets
    implied = {c.node for c in flush_plan.creations}
    for node in nodes:
        if node.moved and not _fresh(node):
            assert node.origin is not None
            parked = join(flush_plan.tmp, f"m{len(flush_plan.moves)}".encode())
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
            f"remove directory {remote_name(path)}",
            needs=word,
            keeps=f'! {{ {real_dir} && [ -z "$(ls -A -- {word})" ]; }}',
        )
    return shell.step(f"rm -f -- {word}", f"remove {remote_name(path)}", needs=word, keeps=real_dir)


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
                f"move {remote_name(path)} aside",
                needs=source,
            )
    for upload in flush_plan.uploads:
        if upload.parts and not profile.copy_placement(upload.path):
            parts = shell.word(upload.target) + ".*"
            assembled = shell.word(upload.target)
            upload.assemble_step = shell.step(
                f"cat -- {parts} > {assembled} && rm -f -- {parts}", f"assemble {remote_name(upload.path)}"
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
            move.place_step = place(move.parked, move.path, f"move to {remote_name(move.path)}", True)

        placements.append((move.path, place_move))

    def copy_into_place(upload: Upload, index: int) -> int:
        """Copy staged content beside the target, then rename it over: atomic, and the runner's own."""
        target = shell.word(upload.path)
        parent = upload.path.rpartition(b"/")[0]
        beside = shell.word(join(parent, b".baifs-" + flush_plan.token + f"-u{index}".encode()))
        sources = shell.word(upload.target) + (".*" if upload.parts else "")
        command = (
            f"if [ -d {target} ] && [ ! -L {target} ]; then echo 'a directory is in the way' >&2; false; "
            f"elif {made_parent(upload.path)}cat -- {sources} > {beside} && mv -f -- {beside} {target}; then true; "
            f"else rm -f -- {beside}; false; fi"
        )
        return shell.step(command, f"place {remote_name(upload.path)}")

    for index, upload in enumerate(flush_plan.uploads):
        if not upload.direct:

            def place_upload(upload: Upload = upload, index: int = index) -> None:
                if profile.copy_placement(upload.path):
                    upload.place_step = copy_into_place(upload, index)
                else:
                    upload.place_step = place(
                        upload.target, upload.path, f"place {remote_name(upload.path)}", False
                    )

            placements.append((upload.path, place_upload))
    for creation in flush_plan.creations:
        if not creation.explicit:
            continue

        def create(creation: Creation = creation) -> None:
            target = shell.word(creation.path)
            if creation.node.is_dir:
                creation.step = shell.step(
                    f"mkdir -p -- {target}", f"create directory {remote_name(creation.path)}"
                )
            elif creation.node.is_fifo:
                # Repeatable: a FIFO an earlier, unconfirmed attempt made is kept.
                mode = stat.S_IMODE(creation.remote_mode)
                creation.step = shell.step(
                    f"[ -p {target} ] || mkfifo -m {mode:04o} -- {target}",
                    f"create FIFO {remote_name(creation.path)}",
                )
            else:
                # Repeatable: a link an earlier, unconfirmed attempt made is replaced.
                link = shell.word(creation.node.target or b"")
                creation.step = shell.step(
                    f"{{ [ ! -L {target} ] || rm -f -- {target}; }} && ln -s -- {link} {target}",
                    f"create symlink {remote_name(creation.path)}",
                )

        placements.append((creation.path, create))
    for _, add in sorted(placements, key=lambda item: depth(item[0])):
        add()
    for change in flush_plan.chmods:
        change.step = shell.step(
            f"chmod {change.value:04o} -- {shell.word(change.path)}",
            f"chmod {remote_name(change.path)}",
            needs=shell.word(change.path),
        )
    for which, changes in (("m", flush_plan.touches), ("a", flush_plan.atimes)):
        for change in sorted(changes, key=lambda c: -depth(c.path)):
            seconds, nanoseconds = divmod(change.value, 1_000_000_000)
            target = shell.word(change.path)
            change.step = shell.step(
                f"touch -c -{which} -h -d @{seconds}.{nanoseconds:09d} -- {target}",
                f"set the {which}time of {remote_name(change.path)}",
                needs=target,
            )
    shell.raw(f'if [ "$failed" = 0 ]; then rm -rf -- {tmp} {tmp}.*; fi')
    if not profile.keeps_staging_dir:
        shell.raw(f"rmdir -- {shell.word(REMOTE_TMP)} 2>/dev/null")
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


class Committer:
    """Records in the tree what the session confirmed of a plan (and nothing else)."""

    def __init__(self, namespace: Namespace, store: ContentStore) -> None:
        self.namespace = namespace
        self.store = store

    def commit_uploads(self, flush_plan: FlushPlan, listings: dict[str, list[RemoteEntry]]) -> None:
        """The plan's uploads are on the session: direct ones are the nodes' remote objects now."""
        by_path = {
            join(
                parent.encode("utf-8", "surrogateescape"), entry.name.encode("utf-8", "surrogateescape")
            ): entry
            for parent, entries in listings.items()
            for entry in entries
        }
        for path in flush_plan.overwrites:
            self.namespace.doomed.pop(path, None)
        for creation in sorted(flush_plan.creations, key=lambda c: depth(c.path)):
            if not creation.explicit:
                self._settle_creation(creation, StepResults())
        for upload in flush_plan.uploads:
            if upload.direct:
                self._settle_upload(upload, by_path.get(upload.target), replaced_gone=False)

    def commit_script(self, flush_plan: FlushPlan, steps: StepResults, report: FlushReport) -> None:
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
            replaced_gone = upload.replaces is not None and was_removed(upload.replaces)
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
        report.refused = {steps.descriptions[step]: steps.words.get(step, "") for step in sorted(steps.failed)}
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
            node.origin = creation.path
            node.remote_mode = creation.remote_mode
            if node.is_symlink:
                node.remote_size = len(node.target or b"")
            if node.is_dir and node.listed_at is None:
                node.listed_at = time.monotonic()  # made here: its content is what the mount knows
        else:
            self.namespace.doomed[creation.path] = creation.remote_mode
        self.namespace.refresh_pending(node)

    def _settle_upload(self, upload: Upload, entry: RemoteEntry | None, *, replaced_gone: bool) -> None:
        """The uploaded copy is the node's remote object now, wherever the node went meanwhile."""
        node = upload.node
        namespace = self.namespace
        if upload.replaces is not None and node.origin == upload.replaces and not replaced_gone:
            # Its old object goes too (this flush's script removes it, or a later one).
            namespace.doomed.setdefault(upload.replaces, _old_mode(node))
        if not node.attached:
            namespace.doomed[upload.path] = upload.remote_mode  # deleted while it was uploaded
            return
        node.origin = upload.path
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

    def commit_placed(self, placed: list[Upload], listings: dict[bytes, list[RemoteEntry]]) -> None:
        """Listings of where the script placed files: their remote (size, mtime), now known."""
        for upload in placed:
            node = upload.node
            parent, _, name = upload.path.rpartition(b"/")
            entry = next(
                (e for e in listings.get(parent, []) if e.name.encode("utf-8", "surrogateescape") == name),
                None,
            )
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
