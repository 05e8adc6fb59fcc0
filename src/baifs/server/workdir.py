"""A session's ``/home/work`` on the local disk: confinement and file transfer.

Owns every file-system access the server makes on behalf of a request, and
the rule that keeps them inside the session's work directory:

- a requested path is normalised as ``/home/work/<path>`` (relative names and
  absolute names under ``/home/work`` both work, like the agent's);
- a path that normalises outside, or whose resolution through symlinks leaves
  the work directory, raises `PermissionError` before anything is read or
  written; the last component of a download is archived as itself (a symlink
  stays a symlink and is never followed);
- archives are built in memory and refused above 1 MiB, before the content
  of an oversized file is read.

The behaviours mirror the agent's (reference §2.4, §4.2, §5): uploads create
missing parents and overwrite in place; listings are one level, symlinks not
followed; tar members are named by the path's base name.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import stat
import tarfile
from pathlib import Path

from ..api.listing import entry_json

CONTAINER_WORK_DIR = "/home/work"
MAX_ARCHIVE_BYTES = 1_048_576
TAR_TRAILER_BYTES = 1024


class ArchiveTooLarge(ValueError):
    def __init__(self) -> None:
        super().__init__("Too large archive file exceeding 1 MiB")


def traceback_text(error: OSError) -> str:
    """The stderr of the agent's list script when it fails."""
    return (
        "Traceback (most recent call last):\n"
        '  File "<string>", line 1, in <module>\n'
        f"{type(error).__name__}: [Errno {error.errno}] {error.strerror}: {error.filename!r}\n"
    )


class WorkDir:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def container_path(self, requested: str) -> str:
        """``/home/work/<requested>``, normalised; PermissionError if it leaves."""
        joined = posixpath.normpath(posixpath.join(CONTAINER_WORK_DIR, requested or "."))
        if joined != CONTAINER_WORK_DIR and not joined.startswith(CONTAINER_WORK_DIR + "/"):
            raise PermissionError(f"Not allowed to access files outside {CONTAINER_WORK_DIR}")
        return joined

    def host_path(self, container_path: str) -> Path:
        relative = container_path[len(CONTAINER_WORK_DIR) :].lstrip("/")
        return self.root / relative if relative else self.root

    def _check_inside(self, host: Path, *, follow_last: bool) -> None:
        target = (
            os.path.realpath(host) if follow_last else os.path.join(os.path.realpath(host.parent), host.name)
        )
        if host == self.root:
            return
        if target != str(self.root) and not target.startswith(str(self.root) + os.sep):
            raise PermissionError(f"Not allowed to access files outside {CONTAINER_WORK_DIR}")

    def resolve(self, requested: str, *, follow_last: bool = True) -> tuple[str, Path]:
        container = self.container_path(requested)
        host = self.host_path(container)
        self._check_inside(host, follow_last=follow_last)
        return container, host

    def upload_target(self, filename: str, *, absolute_names: bool) -> Path:
        """Where an uploaded part is written (the agent's rule for its version)."""
        if absolute_names:
            if not filename.startswith(CONTAINER_WORK_DIR + "/"):
                raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}")
            filename = filename[len(CONTAINER_WORK_DIR) + 1 :]
        if filename.startswith("/"):
            raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}")
        target = Path(os.path.realpath(self.root / filename))
        if target == self.root or not str(target).startswith(str(self.root) + os.sep):
            raise PermissionError(f"Not allowed to upload files outside {CONTAINER_WORK_DIR}")
        return target

    def write_upload(self, filename: str, data: bytes, *, absolute_names: bool = False) -> None:
        target = self.upload_target(filename, absolute_names=absolute_names)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def listing(self, requested: str) -> dict[str, str]:
        """The list response body; errors of the scan are reported, not raised."""
        container, host = self.resolve(requested)
        try:
            with os.scandir(host) as scan:
                files = [entry_json(entry.name, entry.stat(follow_symlinks=False)) for entry in scan]
        except OSError as error:
            error.filename = container
            return {"files": "", "errors": traceback_text(error), "abspath": container}
        return {"files": json.dumps(files) + "\n", "errors": "", "abspath": container}

    def archive(self, requested: str) -> bytes:
        """A tar of the path (a directory recursively), symlinks kept as links."""
        container, host = self.resolve(requested, follow_last=False)
        try:
            host.lstat()
        except FileNotFoundError:
            raise RuntimeError(f"Could not download the archive to: {container}") from None
        arcname = posixpath.basename(container)
        buffer = io.BytesIO()
        budget = MAX_ARCHIVE_BYTES - TAR_TRAILER_BYTES
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for path, name in _walk(host, arcname):
                info = archive.gettarinfo(str(path), arcname=name)
                info.mtime = int(info.mtime)
                info.uname = info.gname = ""
                if info.isfile() and archive.offset + 512 + info.size > budget:
                    raise ArchiveTooLarge()
                if info.isfile():
                    with open(path, "rb") as content:
                        archive.addfile(info, content)
                else:
                    archive.addfile(info)
                if archive.offset > budget:
                    raise ArchiveTooLarge()
            end = archive.offset
        return buffer.getvalue()[: end + TAR_TRAILER_BYTES]

    def single(self, requested: str) -> bytes:
        container, host = self.resolve(requested, follow_last=False)
        if not host.is_symlink() and host.is_dir():
            raise ValueError(f"Expected a single-file archive but found multiple files from {container}")
        data = self.archive(requested)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            member = archive.next()
            content = archive.extractfile(member) if member is not None else None
            if content is None:
                raise ValueError(f"Expected a single-file archive from {container}")
            return content.read()


def _walk(host: Path, arcname: str) -> list[tuple[Path, str]]:
    """Paths of an archive in tar order, never following symlinks."""
    found = [(host, arcname)]
    if stat.S_ISDIR(host.lstat().st_mode):
        for directory, subdirs, files in os.walk(host, followlinks=False):
            relative = os.path.relpath(directory, host)
            prefix = arcname if relative == "." else posixpath.join(arcname, relative)
            subdirs.sort()
            for name in sorted(subdirs + files):
                found.append((Path(directory) / name, posixpath.join(prefix, name)))
    return found
