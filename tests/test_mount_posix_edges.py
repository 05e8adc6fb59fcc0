"""POSIX edge cases through a real mount, each compared with the same calls on a local directory.

Every case is a function of a root directory that makes what it needs,
performs its calls and returns what it observed: errno names, and
relations (same inode as before, time moved) rather than raw numbers. It
runs on a local directory (ext4 or tmpfs: the reference) and on a directory
of a baifs mount, and both must observe the same. What only the mount can
show (the session's disk after a flush, inode numbers after a listing is
taken again) is checked after that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mounting import Mount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]

LIBC = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
#: Times set to the nanosecond (a float of seconds cannot hold them exactly).
EXACT = (1_234_567_890_123_456_789, 1_300_000_000_000_000_001)
#: Coarse kernel clocks tick every few milliseconds (4 ms at HZ=250, 10 ms at HZ=100): wait longer
#: than one tick between two changes, or both get the same timestamp.
TICK = 0.02


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime_nsec: int, mtime_nsec: int) -> None:
    """utimensat(2) with UTIME_NOW / UTIME_OMIT in the nanosecond fields (os.utime cannot say them)."""
    times = (Timespec * 2)(Timespec(0, atime_nsec), Timespec(0, mtime_nsec))
    if LIBC.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


def exchange(one: Path, other: Path) -> None:
    if LIBC.renameat2(AT_FDCWD, os.fsencode(one), AT_FDCWD, os.fsencode(other), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(one))


def outcome(call: Callable[[], object]) -> str:
    """'ok', or the name of the errno the call failed with."""
    try:
        result = call()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error.errno))
    if isinstance(result, int) and not isinstance(result, bool):
        os.close(result)  # an os.open that succeeded
    elif hasattr(result, "close"):
        result.close()
    return "ok"


def edge_errors(root: Path) -> dict[str, str]:
    (root / "d/sub").mkdir(parents=True)
    (root / "d/sub/f").write_text("x")
    (root / "empty").mkdir()
    (root / "file").write_text("x")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("nowhere", root / "dangling")
    long = "n" * 256
    calls: dict[str, Callable[[], object]] = {
        "create a long name": lambda: open(root / long, "w"),
        "mkdir a long name": lambda: os.mkdir(root / long),
        "symlink at a long name": lambda: os.symlink("x", root / long),
        "symlink to a long name": lambda: os.symlink(long, root / "to-long"),
        "rename to a long name": lambda: os.rename(root / "file", root / long),
        "rename from a long name": lambda: os.rename(root / long, root / "x"),
        "stat a long name": lambda: os.stat(root / long),
        "stat through a long name": lambda: os.stat(root / long / "x"),
        "unlink a long name": lambda: os.unlink(root / long),
        "stat through a file": lambda: os.stat(root / "file/x"),
        "create through a file": lambda: open(root / "file/x", "w"),
        "mkdir through a file": lambda: os.mkdir(root / "file/x"),
        "rename through a file": lambda: os.rename(root / "file/x", root / "y"),
        "open a symlink loop": lambda: open(root / "loop1"),
        "stat a symlink loop": lambda: os.stat(root / "loop1"),
        "O_CREAT|O_EXCL on a dangling symlink": lambda: os.open(
            root / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY
        ),
        "open a directory for writing": lambda: os.open(root / "d", os.O_WRONLY),
        "truncate a directory": lambda: os.truncate(root / "d", 0),
        "rmdir .": lambda: os.rmdir(f"{root}/d/."),  # a Path would drop the "."
        "rename a directory into its subtree": lambda: os.rename(root / "d", root / "d/sub/x"),
        "rename over a non-empty directory": lambda: os.rename(root / "empty", root / "d"),
        "unlink a directory": lambda: os.unlink(root / "d"),
        "rmdir a file": lambda: os.rmdir(root / "file"),
        "mkdir over a symlink": lambda: os.mkdir(root / "dangling"),
        "exchange with a missing name": lambda: exchange(root / "file", root / "missing"),
    }
    return {name: outcome(call) for name, call in calls.items()}


def special_bits(root: Path) -> list[str]:
    (root / "f").write_text("x")
    (root / "d").mkdir()
    seen = []
    for path, mode in (
        (root / "f", 0o4755),
        (root / "f", 0o2750),
        (root / "d", 0o1777),
        (root / "d", 0o3775),
    ):
        os.chmod(path, mode)
        seen.append(oct(stat.S_IMODE(os.stat(path).st_mode)))
    return seen


def link_counts(root: Path) -> list[Any]:
    directory = root / "d"
    directory.mkdir()
    seen: list[Any] = [os.stat(directory).st_nlink]
    (directory / "a").mkdir()
    (directory / "b").mkdir()
    (directory / "file").write_text("x")
    seen.append(os.stat(directory).st_nlink)
    os.rmdir(directory / "a")
    seen.append(os.stat(directory).st_nlink)
    (root / "e").mkdir()
    os.rename(directory / "b", root / "e/b")
    seen += [os.stat(directory).st_nlink, os.stat(root / "e").st_nlink, os.stat(directory / "file").st_nlink]
    with open(directory / "file") as handle:
        os.unlink(directory / "file")
        seen.append(os.fstat(handle.fileno()).st_nlink)
    return seen


def times(root: Path) -> list[Any]:
    seen: list[Any] = []
    target = root / "f"
    target.write_text("x")
    os.utime(target, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    info = os.stat(target)
    seen.append((info.st_atime_ns, info.st_mtime_ns))
    before = time.time_ns() - 50_000_000  # the kernel's coarse clock may lag a little
    utimensat(target, UTIME_OMIT, UTIME_NOW)
    info = os.stat(target)
    seen.append(("atime kept", info.st_atime_ns == 1_600_000_000_123_456_789))
    seen.append(("mtime now", info.st_mtime_ns >= before))
    utimensat(target, UTIME_NOW, UTIME_OMIT)
    after = os.stat(target)
    seen.append(("atime now", after.st_atime_ns >= before))
    seen.append(("mtime kept", after.st_mtime_ns == info.st_mtime_ns))

    changes: dict[str, Callable[[], object]] = {
        "write": lambda: target.write_text("longer content"),
        "chmod": lambda: os.chmod(target, 0o600),
        "rename": lambda: os.rename(target, root / "g"),
        "utime": lambda: os.utime(root / "g", ns=(1, 2)),
        "truncate": lambda: os.truncate(root / "g", 3),
    }
    for name, change in changes.items():
        path = root / "g" if (root / "g").exists() else target
        ctime = os.stat(path).st_ctime_ns
        time.sleep(TICK)  # outlasts one tick of the coarse clock that stamps ctime
        change()
        path = root / "g" if (root / "g").exists() else target
        seen.append((f"ctime moves on {name}", os.stat(path).st_ctime_ns > ctime))
    os.utime(root / "g", ns=EXACT)
    seen.append((os.stat(root / "g").st_atime_ns, os.stat(root / "g").st_mtime_ns))

    directory = root / "dir"
    directory.mkdir()
    (directory / "old").write_text("x")
    (directory / "gone").mkdir()
    entries: dict[str, Callable[[], object]] = {
        "create": lambda: (directory / "new").write_text("x"),
        "mkdir": lambda: (directory / "sub").mkdir(),
        "symlink": lambda: os.symlink("x", directory / "link"),
        "rename in it": lambda: os.rename(directory / "new", directory / "renamed"),
        "rename out of it": lambda: os.rename(directory / "renamed", root / "moved-out"),
        "unlink": lambda: os.unlink(directory / "old"),
        "rmdir": lambda: os.rmdir(directory / "gone"),
    }
    for name, change in entries.items():
        before_dir = os.stat(directory)
        time.sleep(TICK)  # outlasts one tick of the coarse clock that stamps the times
        change()
        after_dir = os.stat(directory)
        seen.append(
            (
                f"directory times move on {name}",
                after_dir.st_mtime_ns > before_dir.st_mtime_ns,
                after_dir.st_ctime_ns > before_dir.st_ctime_ns,
            )
        )
    return seen


def inode_identity(root: Path) -> list[Any]:
    (root / "d/in").mkdir(parents=True)
    for name in ("f", "g", "a", "b"):
        (root / name).write_text(name)
    (root / "d/in/deep").write_text("deep")
    number = {name: os.stat(root / name).st_ino for name in ("f", "g", "d", "a", "b")}
    deep = os.stat(root / "d/in/deep").st_ino
    os.rename(root / "f", root / "f2")
    seen: list[Any] = [os.stat(root / "f2").st_ino == number["f"]]
    os.rename(root / "f2", root / "d/f3")
    seen.append(os.stat(root / "d/f3").st_ino == number["f"])
    os.rename(root / "g", root / "d/f3")  # over an existing name
    seen.append(os.stat(root / "d/f3").st_ino == number["g"])
    os.rename(root / "d", root / "d2")
    seen += [os.stat(root / "d2").st_ino == number["d"], os.stat(root / "d2/in/deep").st_ino == deep]
    exchange(root / "a", root / "b")
    seen += [
        os.stat(root / "a").st_ino == number["b"],
        os.stat(root / "b").st_ino == number["a"],
        (root / "a").read_text(),
        (root / "b").read_text(),
    ]
    exchange(root / "a", root / "d2")  # a file and a directory swap too
    seen += [(root / "a").is_dir(), (root / "d2").read_text(), os.stat(root / "a").st_ino == number["d"]]
    return seen


def fifos(root: Path) -> list[Any]:
    os.mkfifo(root / "p", 0o640)
    os.mknod(root / "q", stat.S_IFIFO | 0o600)
    seen: list[Any] = [
        stat.S_ISFIFO(os.stat(root / "p").st_mode),
        oct(stat.S_IMODE(os.stat(root / "p").st_mode)),
    ]
    os.rename(root / "p", root / "p2")
    seen.append(stat.S_ISFIFO(os.lstat(root / "p2").st_mode))
    os.chmod(root / "p2", 0o604)
    seen.append(oct(stat.S_IMODE(os.stat(root / "p2").st_mode)))
    os.unlink(root / "q")
    seen.append(sorted(os.listdir(root)))
    return seen


def compare(mount: Mount, tmp_path: Path, case: Callable[[Path], Any], *extra: str) -> tuple[Mount, Path]:
    reference = tmp_path / "reference"
    reference.mkdir()
    m = mount.start(*extra)
    mounted = m.path / "case"
    mounted.mkdir()
    expected, actual = case(reference), case(mounted)
    assert actual == expected
    return m, mounted


def test_edge_case_errors_are_the_local_ones(mount: Mount, tmp_path: Path) -> None:
    compare(mount, tmp_path, edge_errors)


def test_chmod_keeps_setuid_setgid_and_sticky_bits(mount: Mount, tmp_path: Path) -> None:
    m, _ = compare(mount, tmp_path, special_bits)
    m.sync()
    assert oct(stat.S_IMODE(os.stat(m.work / "case/f").st_mode)) == "0o2750"
    assert oct(stat.S_IMODE(os.stat(m.work / "case/d").st_mode)) == "0o3775"


def test_link_counts(mount: Mount, tmp_path: Path) -> None:
    (mount.work / "remote/x").mkdir(parents=True)
    (mount.work / "remote/y").mkdir()
    (mount.work / "remote/z").write_text("z")
    m, _ = compare(mount, tmp_path, link_counts)
    os.listdir(m.path / "remote")
    assert os.stat(m.path / "remote").st_nlink == 4, "2 plus the subdirectories, once listed"
    m.sync()
    assert os.stat(m.work / "case/d").st_nlink == 2
    assert os.stat(m.work / "case/e").st_nlink == 3


def test_times(mount: Mount, tmp_path: Path) -> None:
    m, mounted = compare(mount, tmp_path, times, "--attr-timeout", "0.1", "--dir-cache-time", "0.2")
    m.sync()
    stored = os.stat(m.work / "case/g")
    assert (stored.st_atime_ns, stored.st_mtime_ns) == EXACT, "the session stores both times, to the ns"
    time.sleep(0.3)  # past the attribute timeout (--attr-timeout 0.1): the kernel asks the mount again
    assert (os.stat(mounted / "g").st_atime_ns, os.stat(mounted / "g").st_mtime_ns) == EXACT


def test_inode_numbers_survive_renames_flushes_and_listings(mount: Mount, tmp_path: Path) -> None:
    m, mounted = compare(mount, tmp_path, inode_identity, "--dir-cache-time", "0.3")
    numbers = {path: os.stat(path).st_ino for path in mounted.rglob("*")}
    m.sync()
    time.sleep(0.6)  # past the listing TTL (--dir-cache-time 0.3): every directory is listed again
    os.listdir(mounted)
    assert {path: os.stat(path).st_ino for path in mounted.rglob("*")} == numbers
    assert (m.work / "case/b").read_text() == "a" and (m.work / "case/d2").read_text() == "b"
    assert (m.work / "case/a/in/deep").read_text() == "deep"


def test_fifos_are_made_in_the_session(mount: Mount, tmp_path: Path) -> None:
    m, mounted = compare(mount, tmp_path, fifos, "--dir-cache-time", "0.5")
    m.sync()
    made = os.lstat(m.work / "case/p2")
    assert stat.S_ISFIFO(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o604
    assert not (m.work / "case/q").exists()
    os.mkfifo(m.work / "case/remote-fifo", 0o620)
    time.sleep(1)  # past the listing TTL (--dir-cache-time 0.5)
    assert stat.S_ISFIFO(os.stat(mounted / "remote-fifo").st_mode)
    with pytest.raises(OSError) as refused:
        os.mknod(mounted / "socket", stat.S_IFSOCK | 0o600)
    assert refused.value.errno == errno.EPERM, "a socket needs a process in the session bound to it"
    # Opened here, a FIFO of the mount is a pipe on this machine (the kernel's, as on NFS).
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(mounted / 'p2')!r}, 'w').write('through')"])
    assert (mounted / "p2").read_text() == "through"
    assert writer.wait(10) == 0


def as_user(uid: int, code: str) -> str:
    """Run Python ``code`` as another user (no supplementary groups); its printed result."""
    finished = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.strip()


PROBE = """
import errno, os, sys
def outcome(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return "ok"
"""


@contextmanager
def traversable(path: Path) -> Iterator[None]:
    """Let every user through the directories above ``path`` (pytest makes its base 0700)."""
    changed = []
    for directory in path.parents:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXOTH)
            changed.append((directory, mode))
    try:
        yield
    finally:
        for directory, mode in changed:
            os.chmod(directory, mode)


def test_permissions_for_other_users_and_chown(mount: Mount) -> None:
    m = mount.start("--allow-other", "--uid", "1000", "--gid", "1000")
    with traversable(m.path):
        check_permissions(m)


def check_permissions(m: Mount) -> None:
    for name, mode in (("mine-rw", 0o644), ("mine-ro", 0o444), ("private", 0o600)):
        (m.path / name).write_text(name)
        os.chmod(m.path / name, mode)
    (m.path / "shared").mkdir(mode=0o755)
    path = str(m.path)
    owner = as_user(
        1000,
        PROBE
        + f"""
print(outcome(lambda: open({path!r} + "/mine-rw", "a").close()),
      outcome(lambda: os.open({path!r} + "/mine-ro", os.O_WRONLY | os.O_TRUNC)),
      outcome(lambda: os.chown({path!r} + "/mine-rw", 2000, 2000)),
      outcome(lambda: os.chmod({path!r} + "/mine-ro", 0o644)))
""",
    )
    assert owner.split() == ["ok", "EACCES", "EPERM", "ok"]
    other = as_user(
        2000,
        PROBE
        + f"""
print(outcome(lambda: open({path!r} + "/mine-rw").read()),
      outcome(lambda: open({path!r} + "/mine-rw", "a").close()),
      outcome(lambda: open({path!r} + "/private").read()),
      outcome(lambda: open({path!r} + "/shared/new", "w").close()),
      outcome(lambda: os.chmod({path!r} + "/mine-rw", 0o666)))
""",
    )
    assert other.split() == ["ok", "EACCES", "EACCES", "EACCES", "EPERM"]
    # chown (by root) is kept for the mount's life: the session's API cannot store an owner.
    os.chown(m.path / "private", 2000, 2000)
    assert (os.stat(m.path / "private").st_uid, os.stat(m.path / "private").st_gid) == (2000, 2000)
    assert as_user(2000, PROBE + f"print(outcome(lambda: open({path!r} + '/private').read()))") == "ok"
    m.sync()
    assert (m.work / "private").read_text() == "private"
