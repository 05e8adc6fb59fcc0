"""A session's ``/home/work`` on the local disk: confinement and file transfer.

Owns every file-system access the server makes on behalf of a request, and
the rule that keeps them inside the session:

- a requested path is normalised as ``/home/work/<path>`` (relative names and
  absolute names under ``/home/work`` both work, like the agent's); one that
  normalises outside raises `PermissionError` before anything is touched;
- every open goes through `beneath.Beneath`, relative to a descriptor of the
  directory it must stay in, so neither a symlink nor a run swapping a
  directory for one while the request goes on can lead it outside; the last
  component of a download is archived as itself (a symlink stays a symlink);
- archives are built in memory and refused above 1 MiB, before the content
  of an oversized file is read.

Virtual folders (`VFolder`) are mounted inside ``/home/work`` for runs. As on
a real agent (reference §12), listings and downloads go through the
container's view and see a folder's content, while uploads are written to
the scratch directory *underneath* the mount point: the request succeeds and
the file is invisible to runs, listings and downloads.

The behaviours mirror the agent's (reference §2.4, §4.2, §5): uploads create
missing parents (mode 0755) and overwrite in place (new files 0644, as the
agent's umask makes them), as the server's own uid; listings are one level,
symlinks not followed; tar members are named by the path's base name.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..api.listing import entry_json
from .beneath import Beneath, EscapeError

CONTAINER_WORK_DIR = "/home/work"
MAX_ARCHIVE_BYTES = 1_048_576
TAR_TRAILER_BYTES = 1024


class ArchiveTooLarge(ValueError):
    def __init__(self) -> None:
        super().__init__("Too large archive file exceeding 1 MiB")


@dataclass(frozen=True)
class VFolder:
    """A virtual folder: ``host_dir`` mounted at ``/home/work/<mount_path>`` in every run."""

    name: str
    host_dir: Path
    mount_path: str

    @classmethod
    def parse(cls, text: str) -> VFolder:
        """``NAME=HOSTDIR[:MOUNTPATH]``; MOUNTPATH is relative to /home/work (default: NAME)."""
        name, equals, rest = text.partition("=")
        host, _, mount = rest.partition(":")
        if not equals or not name or not host:
            raise ValueError(f"a virtual folder is NAME=HOSTDIR[:MOUNTPATH], not {text!r}")
        mount = posixpath.normpath(mount or name).lstrip("/")
        if mount.startswith("home/work/"):
            mount = mount[len("home/work/") :]
        if mount in ("", ".") or mount.startswith(".."):
            raise ValueError(f"the mount path of folder {name!r} must be inside /home/work")
        return cls(name, Path(host).resolve(), mount)

    @property
    def container_path(self) -> str:
        return f"{CONTAINER_WORK_DIR}/{self.mount_path}"


def traceback_text(error: OSError) -> str:
    """The stderr of the agent's list script when it fails."""
    return (
        "Traceback (most recent call last):\n"
        '  File "<string>", line 1, in <module>\n'
        f"{type(error).__name__}: [Errno {error.errno}] {error.strerror}: {error.filename!r}\n"
    )


class WorkDir:
    def __init__(self, root: Path, vfolders: tuple[VFolder, ...] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.scratch = Beneath(str(self.root))
        self.vfolders = vfolders
        self._folders = {folder.mount_path: Beneath(str(folder.host_dir)) for folder in vfolders}
        for folder in vfolders:  # mount points exist from the start, as the container runtime makes them
            self.scratch.make_directories(folder.mount_path)

    def container_path(self, requested: str) -> str:
        """``/home/work/<requested>``, normalised; PermissionError if it leaves."""
        joined = posixpath.normpath(posixpath.join(CONTAINER_WORK_DIR, requested or "."))
        if joined != CONTAINER_WORK_DIR and not joined.startswith(CONTAINER_WORK_DIR + "/"):
            raise PermissionError(f"Not allowed to access files outside {CONTAINER_WORK_DIR}")
        return joined

    def _seen(self, container: str) -> tuple[Beneath, str]:
        """Where the container sees a path: a folder mounted over it, or the scratch directory."""
        relative = container[len(CONTAINER_WORK_DIR) :].lstrip("/")
        for mount_path, folder in self._folders.items():
            if relative == mount_path or relative.startswith(mount_path + "/"):
                return folder, relative[len(mount_path) :].lstrip("/")
        return self.scratch, relative

    def upload_target(self, filename: str, *, absolute_names: bool) -> str:
        """The path an uploaded part is written to, relative to the scratch directory (the agent's rule)."""
        if absolute_names:
            if not filename.startswith(CONTAINER_WORK_DIR + "/"):
                raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}")
            filename = filename[len(CONTAINER_WORK_DIR) + 1 :]
        if filename.startswith("/"):
            raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}")
        relative = self.container_path(filename)[len(CONTAINER_WORK_DIR) :].lstrip("/")
        if not relative:
            raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}")
        return relative

    def write_upload(self, filename: str, data: bytes, *, absolute_names: bool = False) -> None:
        """Write an uploaded file into the scratch directory (under a folder's mount point, too)."""
        relative = self.upload_target(filename, absolute_names=absolute_names)
        try:
            self.scratch.make_parents(relative)
            descriptor = self.scratch.open(relative, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except EscapeError:
            # The agents' words (>= 24.03.7) when the host-side resolve() leaves the scratch
            # directory, as an absolute symlink in the path makes it.
            raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}") from None
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)

    def listing(self, requested: str) -> dict[str, str]:
        """The list response body; errors of the scan are reported, not raised."""
        container = self.container_path(requested)
        tree, relative = self._seen(container)
        try:
            descriptor = tree.open(relative, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(descriptor) as scan:
                    files = [entry_json(entry.name, entry.stat(follow_symlinks=False)) for entry in scan]
            finally:
                os.close(descriptor)
        except PermissionError:
            raise
        except OSError as error:
            error.filename = container
            return {"files": "", "errors": traceback_text(error), "abspath": container}
        return {"files": json.dumps(files) + "\n", "errors": "", "abspath": container}

    def archive(self, requested: str) -> bytes:
        """A tar of the path (a directory recursively), symlinks kept as links."""
        container = self.container_path(requested)
        tree, relative = self._seen(container)
        buffer = io.BytesIO()
        budget = MAX_ARCHIVE_BYTES - TAR_TRAILER_BYTES
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, read in self._members(tree, relative, posixpath.basename(container), container):
                if info.isfile() and archive.offset + 512 + info.size > budget:
                    raise ArchiveTooLarge()
                if info.isfile():
                    archive.addfile(info, io.BytesIO(read()))
                else:
                    archive.addfile(info)
                if archive.offset > budget:
                    raise ArchiveTooLarge()
            end = archive.offset
        return buffer.getvalue()[: end + TAR_TRAILER_BYTES]

    def _members(
        self, tree: Beneath, relative: str, arcname: str, container: str
    ) -> Iterator[tuple[tarfile.TarInfo, Reader]]:
        """The tar members of a path in tar order, read through descriptors, never following symlinks."""
        if not relative:  # the root of a tree (the work directory, or a folder's mount point)
            top = tree.open("", os.O_RDONLY | os.O_DIRECTORY)
            yield _member(arcname, os.fstat(top), top, None)
            yield from _children(top, arcname)
            return
        with _entry(tree, relative, container) as (parent, name, info):
            if stat.S_ISDIR(info.st_mode):
                top = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
                )
                yield _member(arcname, os.fstat(top), top, None)
                yield from _children(top, arcname)
            else:
                yield _member(arcname, info, parent, name)

    def single(self, requested: str) -> bytes:
        container = self.container_path(requested)
        tree, relative = self._seen(container)
        if not relative:
            raise ValueError(f"Expected a single-file archive but found multiple files from {container}")
        with _entry(tree, relative, container) as (parent, name, info):
            if stat.S_ISDIR(info.st_mode):
                raise ValueError(f"Expected a single-file archive but found multiple files from {container}")
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"Expected a single-file archive from {container}")
            if info.st_size > MAX_ARCHIVE_BYTES - 512 - TAR_TRAILER_BYTES:
                raise ArchiveTooLarge()
            return _read_file(parent, name, info.st_size)


Reader = Callable[[], bytes]


@contextmanager
def _entry(tree: Beneath, relative: str, container: str) -> Iterator[tuple[int, str, os.stat_result]]:
    """A descriptor of the path's parent, its name there and what it is (not followed); the agent's
    error when it does not exist."""
    parent, name = tree.parent(relative)
    try:
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise RuntimeError(f"Could not download the archive to: {container}") from None
        yield parent, name, info
    finally:
        os.close(parent)


def _read_file(dir_fd: int, name: str, size: int) -> bytes:
    """The ``size`` bytes of a file, opened without following a symlink; OSError if it shrank."""
    descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(size)
    if len(data) != size:
        raise OSError(errno.EIO, "the file changed while it was read", name)
    return data


def _member(
    arcname: str, info: os.stat_result, dir_fd: int, name: str | None
) -> tuple[tarfile.TarInfo, Reader]:
    """A tar header for one object, and how to read its content (regular files)."""
    member = tarfile.TarInfo(arcname)
    member.mode = stat.S_IMODE(info.st_mode)
    member.uid, member.gid = info.st_uid, info.st_gid
    member.mtime = int(info.st_mtime)
    member.uname = member.gname = ""
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(info.st_mode):
        member.type = tarfile.SYMTYPE
        assert name is not None
        member.linkname = os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISREG(info.st_mode):
        member.type = tarfile.REGTYPE
        member.size = info.st_size
    else:
        member.type = tarfile.FIFOTYPE if stat.S_ISFIFO(info.st_mode) else tarfile.CHRTYPE
    if name is None or not member.isfile():
        return member, lambda: b""
    return member, lambda: _read_file(dir_fd, name, member.size)


def _children(top: int, arcname: str) -> Iterator[tuple[tarfile.TarInfo, Reader]]:
    """The objects below an open directory, sorted, without following symlinks; closes ``top``."""
    try:
        for directory, subdirs, files, dir_fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            relative = os.path.normpath(directory)
            prefix = arcname if relative == "." else posixpath.join(arcname, relative)
            subdirs.sort()
            for name in sorted(subdirs + files):
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                yield _member(posixpath.join(prefix, name), info, dir_fd, name)
    finally:
        os.close(top)
