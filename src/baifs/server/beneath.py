"""Opening paths beneath a directory so that no symlink, and no race, ever leads out of it.

Checking a path with ``realpath`` and then opening it by name is racy: a
run in the session can swap a directory for a symlink between the two. Every
file access of `baifs serve` on behalf of a request therefore resolves
relative to an open descriptor of the session's root, in the kernel:

- where the kernel has ``openat2`` (Linux 5.6), with ``RESOLVE_BENEATH`` and
  ``RESOLVE_NO_MAGICLINKS``: symlinks that stay beneath the root are
  followed, as the agent's own checks allow; an absolute one, or ``..`` that
  would climb out, fails with EXDEV, whenever it appears;
- elsewhere, component by component with ``O_NOFOLLOW``: no symlink is
  followed at all (stricter, never wrong).

`Beneath` is the one way in. Invariants: every descriptor it returns refers
to an object inside the root; a path that leaves the root raises
`EscapeError` (a `PermissionError`, which the server reports the way the
agent reports paths outside ``/home/work``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

SYS_OPENAT2 = 437  # x86_64, aarch64 and most others share this number
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08


class EscapeError(PermissionError):
    """A path that would lead out of the directory it must stay beneath."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int:
    how = _OpenHow(
        flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
    )
    descriptor = _libc.syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if descriptor < 0:
        code = ctypes.get_errno()
        if code == errno.EXDEV:
            raise EscapeError(code, "the path leads out of the session's work directory", path)
        raise OSError(code, os.strerror(code), path)
    return int(descriptor)


def _has_openat2() -> bool:
    try:
        os.close(_openat2(-100, ".", os.O_PATH | os.O_DIRECTORY, 0))  # AT_FDCWD
    except OSError as error:
        return error.errno != errno.ENOSYS
    return True


OPENAT2 = _has_openat2()


class Beneath:
    """Access to the files beneath one root directory (a session's work directory, a folder)."""

    def __init__(self, root: str, *, use_openat2: bool = OPENAT2) -> None:
        self.root = root
        self.use_openat2 = use_openat2

    @contextmanager
    def root_fd(self) -> Iterator[int]:
        descriptor = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield descriptor
        finally:
            os.close(descriptor)

    def open(self, relative: str, flags: int, mode: int = 0o644) -> int:
        """A descriptor of ``relative`` (``""`` is the root), opened with ``flags``."""
        parts = _parts(relative)
        with self.root_fd() as root:
            if not parts:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=root)
            if self.use_openat2:
                return _openat2(root, "/".join(parts), flags, mode)
            return self._walk(root, parts, flags, mode)

    def _walk(self, root: int, parts: list[str], flags: int, mode: int) -> int:
        """Component by component, never following a symlink."""
        current = os.dup(root)
        try:
            for part in parts[:-1]:
                following = _nofollow(current, part, os.O_PATH | os.O_DIRECTORY, 0)
                os.close(current)
                current = following
            return _nofollow(current, parts[-1], flags, mode)
        finally:
            os.close(current)

    def parent(self, relative: str) -> tuple[int, str]:
        """A descriptor of the parent directory of ``relative``, and the last name in it."""
        parts = _parts(relative)
        if not parts:
            raise EscapeError(errno.EPERM, "the work directory itself is not a file", relative)
        return self.open("/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY), parts[-1]

    def make_parents(self, relative: str) -> None:
        """Make the missing directories above ``relative`` (0755, as the agent does), beneath the root."""
        self.make_directories("/".join(_parts(relative)[:-1]))

    def make_directories(self, relative: str) -> None:
        """Make ``relative`` and the missing directories above it (0755), beneath the root."""
        parts = _parts(relative)
        for depth in range(1, len(parts) + 1):
            try:
                os.close(self.open("/".join(parts[:depth]), os.O_PATH | os.O_DIRECTORY))
                continue
            except FileNotFoundError:
                pass
            above = self.open("/".join(parts[: depth - 1]), os.O_PATH | os.O_DIRECTORY)
            try:
                os.mkdir(parts[depth - 1], 0o755, dir_fd=above)
            except FileExistsError:
                pass  # made meanwhile; the next open checks what it is
            finally:
                os.close(above)


def _parts(relative: str) -> list[str]:
    """The names of a relative path; ``.`` dropped, ``..`` refused (it could only climb)."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise EscapeError(errno.EPERM, "'..' is not allowed in a session path", relative)
    return parts


def _nofollow(dir_fd: int, name: str, flags: int, mode: int) -> int:
    """Open one name with ``O_NOFOLLOW``; a symlink there is refused (this mode follows none)."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            os.readlink(name, dir_fd=dir_fd)  # succeeds only on a symlink
        except OSError:
            raise error from None
        raise EscapeError(errno.EPERM, "a symlink is in the way", name) from None
