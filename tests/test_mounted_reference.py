"""The reference scenarios' operations through a real FUSE mount: kernel, daemon and session together.

The vocabulary of `ops` (write, append, truncate, mkdir, unlink, rmdir,
rename, exchange, chmod, symlink, utime, flush, fsync), carried out by the
very system calls `ops.OsDriver` makes on the reference directory, here on a
real ``baifs mount`` of a `baifs serve` session (rclone's ``vfstest`` runs
one suite against its VFS and a real mount the same way). Every call must
meet the error the reference met; then the mount must show the reference
tree, and after a flush the session must hold it, explicit mtimes included.

Crashes, faults and other writers are the other tiers' (the same scenarios
against `MountCore` over HTTP and in memory), and the mounted fault tests'.
"""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mounting import Mount, needs_fuse
from ops import PATHS, OsDriver, Reference, differences, local_operation_st, reference_settings, snapshot

from baifs import controlfiles

EXAMPLES = [
    [("mkdir", "a"), ("write", "a/b", (66, 17)), ("rename", "a", "d"), ("write", "d/e", (67, 1_100_000))],
    [
        ("write", "a", (65, 3000)),
        ("flush",),
        ("rename", "a", "b"),
        ("write", "a", (68, 1)),
        ("exchange", "a", "b"),
    ],
    [("mkdir", "d"), ("symlink", "d/a", "../b"), ("utime", "d", 1_500_000_000), ("chmod", "d", 0o700)],
    [("write", PATHS[3], (69, 40)), ("fsync", PATHS[3]), ("truncate", PATHS[3], 5), ("rmdir", PATHS[3])],
]
_examples = itertools.count()


class MountDriver(OsDriver):
    """`OsDriver` on a mount: ``flush`` asks the mount to flush, ``fsync`` syncs the file."""

    def __init__(self, root: Path, mountpoint: Path) -> None:
        super().__init__(root)
        self.mountpoint = mountpoint

    def do_flush(self) -> None:
        os.setxattr(self.mountpoint, controlfiles.FLUSH_XATTR, b"1")

    def do_fsync(self, relative: str) -> None:
        if stat.S_ISLNK(os.lstat(self.path(relative)).st_mode):
            return
        descriptor = os.open(self.path(relative), os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def through_the_mount(m: Mount, tmp: Path, operations: list[tuple]) -> None:
    name = f"example-{next(_examples)}"
    (m.path / name).mkdir()
    (tmp / name).mkdir()
    reference, driver = Reference(tmp / name), MountDriver(m.path / name, m.path)
    for step, op in enumerate(operations):
        kind = op[0]
        if kind != "flush" and reference.crosses_symlink(op[1]):
            continue
        if kind in ("rename", "exchange") and reference.crosses_symlink(op[2]):
            continue
        expected, actual = reference.apply(op), driver.apply(op)
        assert (expected == 0) == (actual == 0), (
            f"step {step} {op}: reference errno {expected}, mount {actual}"
        )
        if expected:
            assert actual == expected, f"step {step} {op}: errno {actual}, expected {expected}"
    wanted = snapshot(tmp / name)
    assert not differences(wanted, snapshot(m.path / name)), "through the mount"
    m.sync()
    assert not differences(wanted, snapshot(m.work / name)), "the session after a flush"
    assert not m.status()["pending"]["paths"]
    for relative, mtime_ns in reference.explicit_mtime.items():
        assert os.lstat(m.work / name / relative).st_mtime_ns == mtime_ns, relative


@pytest.fixture
def started(mount: Mount) -> Mount:
    return mount.start()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(300)
@pytest.mark.parametrize("operations", EXAMPLES, ids=range(len(EXAMPLES)))
def test_the_vocabulary_through_a_real_mount(started: Mount, tmp_path: Path, operations: list[tuple]) -> None:
    through_the_mount(started, tmp_path, operations)


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(600)
@reference_settings("BAIFS_MOUNTED_EXAMPLES", 30)
@given(operations=st.lists(local_operation_st, min_size=1, max_size=20))
def test_random_sequences_through_a_real_mount(
    started: Mount, tmp_path: Path, operations: list[tuple]
) -> None:
    through_the_mount(started, tmp_path, operations)
