"""POSIX operations through a real mount, checked on the session's disk on the server."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest
from mounting import Mount, delta, needs_fuse, tree

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]


def test_writes_are_visible_at_once_and_on_the_session_after_sync(mount: Mount) -> None:
    m = mount.start()
    (m.path / "hello.txt").write_text("hello\n")
    (m.path / "dir" / "sub").mkdir(parents=True)
    (m.path / "dir" / "sub" / "deep.bin").write_bytes(bytes(range(256)) * 100)
    assert (m.path / "hello.txt").read_text() == "hello\n"
    assert sorted(os.listdir(m.path / "dir")) == ["sub"]
    assert not (m.work / "hello.txt").exists(), "uploaded before the write-back delay"
    m.sync()
    assert (m.work / "hello.txt").read_text() == "hello\n"
    assert (m.work / "dir/sub/deep.bin").read_bytes() == bytes(range(256)) * 100
    assert m.status()["pending"] == {
        "uploads": 0,
        "upload_bytes": 0,
        "namespace_changes": 0,
        "paths": [],
        "more_paths": 0,
    }


def test_write_back_uploads_without_being_asked(mount: Mount) -> None:
    m = mount.start("--write-back", "0.3")
    (m.path / "later.txt").write_text("soon\n")
    deadline = time.monotonic() + 15
    while not (m.work / "later.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (m.work / "later.txt").read_text() == "soon\n"


def test_namespace_changes_reach_the_session(mount: Mount) -> None:
    (mount.work / "keep").mkdir(parents=True)
    (mount.work / "keep/old.txt").write_text("old\n")
    (mount.work / "gone").mkdir()
    (mount.work / "gone/x").write_text("x")
    (mount.work / "victim.txt").write_text("replace me")
    (mount.work / "script.sh").write_text("#!/bin/sh\necho hi\n")
    m = mount.start()
    os.rename(m.path / "keep", m.path / "kept")
    os.rename(m.path / "kept/old.txt", m.path / "kept/new.txt")
    (m.path / "fresh.txt").write_text("fresh\n")
    os.rename(m.path / "fresh.txt", m.path / "victim.txt")
    os.chmod(m.path / "script.sh", 0o750)
    (m.path / "gone/x").unlink()
    os.rmdir(m.path / "gone")
    os.symlink("kept/new.txt", m.path / "link")
    os.truncate(m.path / "kept/new.txt", 2)
    os.utime(m.path / "script.sh", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.mkdir(m.path / "private", 0o700)
    expected = tree(m.path, modes=True)
    m.sync()
    assert tree(m.work, modes=True) == expected
    assert os.readlink(m.work / "link") == "kept/new.txt"
    assert os.stat(m.work / "script.sh").st_mtime_ns == 1_600_000_000_123_456_789
    assert not (m.work / ".baifs-tmp").exists()


def test_errors_are_the_posix_ones(mount: Mount) -> None:
    m = mount.start()
    (m.path / "d").mkdir()
    (m.path / "d/f").write_text("f")
    (m.path / "file").write_text("x")
    cases = [
        (errno.ENOTEMPTY, lambda: os.rmdir(m.path / "d")),
        (errno.EEXIST, lambda: os.mkdir(m.path / "d")),
        (errno.EISDIR, lambda: os.unlink(m.path / "d")),
        (errno.ENOTDIR, lambda: os.rmdir(m.path / "file")),
        (errno.ENOTDIR, lambda: os.listdir(m.path / "file")),
        (errno.ENOENT, lambda: os.stat(m.path / "missing")),
        (errno.ENAMETOOLONG, lambda: (m.path / ("n" * 256)).write_text("x")),
        (errno.EISDIR, lambda: os.rename(m.path / "file", m.path / "d")),
        (errno.ENOTDIR, lambda: os.rename(m.path / "d", m.path / "file")),
        (errno.EINVAL, lambda: os.rename(m.path / "d", m.path / "d/inside")),
        (errno.EPERM, lambda: os.link(m.path / "file", m.path / "hard")),
        (errno.EPERM, lambda: (m.path / ".baifs-tmp").mkdir()),
        (errno.EXDEV, lambda: os.rename(m.path / "file", m.path.parent / "outside")),
    ]
    for expected, call in cases:
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == expected, (expected, raised.value)
    with pytest.raises(OSError) as raised:
        os.setxattr(m.path / "file", "system.posix_acl_access", b"\x02\x00\x00\x00")
    assert raised.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    with pytest.raises(OSError) as raised:
        os.getxattr(m.path / "file", "user.comment")
    assert raised.value.errno in (errno.ENOTSUP, errno.ENODATA)
    with pytest.raises(OSError) as raised:
        os.listxattr(m.path / "file")
    assert raised.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)


NAMES = [
    b"with space.txt",
    b"quote'double\"",
    b"$(touch pwned)",
    b"`touch pwned2`",
    b"new\nline",
    b"-leading-dash",
    b"n" * 255,
    b"bytes-\xff\xfe-not-utf8",
    b"percent%20and\\backslash",
]


def test_hostile_names_survive_create_rename_delete(mount: Mount) -> None:
    m = mount.start()
    root = os.fsencode(m.path)
    for index, name in enumerate(NAMES):
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(b"content %d\n" % index)
    os.mkdir(os.path.join(root, b"dir \xff $(x)"))
    m.sync()
    work = os.fsencode(m.work)
    assert sorted(os.listdir(work)) == sorted([*NAMES, b"dir \xff $(x)"])
    for name in NAMES:
        os.rename(os.path.join(root, name), os.path.join(root, b"dir \xff $(x)", b"moved-" + name[:240]))
    os.unlink(os.path.join(root, b"dir \xff $(x)", b"moved-" + NAMES[0]))
    m.sync()
    moved = sorted(os.listdir(os.path.join(work, b"dir \xff $(x)")))
    assert moved == sorted(b"moved-" + name[:240] for name in NAMES[1:])
    assert os.listdir(work) == [b"dir \xff $(x)"]
    for index, name in enumerate(NAMES[1:], start=1):
        with open(os.path.join(work, b"dir \xff $(x)", b"moved-" + name[:240]), "rb") as handle:
            assert handle.read() == b"content %d\n" % index
    assert not any(b"pwned" in entry for entry in os.listdir(work)), "a name reached a shell unquoted"


def test_remote_changes_appear_after_the_listing_ttl(mount: Mount) -> None:
    m = mount.start("--dir-cache-time", "0.5", "--attr-timeout", "0.2")
    assert os.listdir(m.path) == [], "an empty session lists nothing (the control files are not listed)"
    (m.work / "made-remotely.txt").write_text("from the session\n")
    time.sleep(1.0)  # outlasts the listing TTL (--dir-cache-time 0.5) and attribute timeout (0.2)
    assert "made-remotely.txt" in os.listdir(m.path)
    assert (m.path / "made-remotely.txt").read_text() == "from the session\n"
    (m.work / "made-remotely.txt").unlink()
    time.sleep(1.0)  # outlasts the listing TTL (--dir-cache-time 0.5) and attribute timeout (0.2)
    assert not (m.path / "made-remotely.txt").exists()


def test_ownership_and_modes(mount: Mount) -> None:
    (mount.work / "f").write_text("x")
    os.chmod(mount.work / "f", 0o4755)
    m = mount.start("--uid", "1234", "--gid", "2345", "--umask", "077")
    info = os.stat(m.path / "f")
    assert (info.st_uid, info.st_gid) == (1234, 2345)
    assert stat.S_IMODE(info.st_mode) == 0o4700


@pytest.mark.timeout(300)
def test_large_files_go_up_in_parts_and_come_back_in_ranges(mount: Mount) -> None:
    m = mount.start()
    small_big = os.urandom(5 * 1024 * 1024)
    big = os.urandom(1024 * 1024) * 50
    (m.path / "five.bin").write_bytes(small_big)
    (m.path / "fifty.bin").write_bytes(big)
    before = m.counters()
    m.sync()
    spent = delta(before, m.counters())
    assert (m.work / "five.bin").read_bytes() == small_big
    assert (m.work / "fifty.bin").read_bytes() == big
    assert spent.get("upload", 0) == 3, spent  # 51 + 6 parts of < 1 MiB, 20 to a request
    assert spent.get("batch_runs", 0) == 1, spent  # one script assembles both
    m.unmount()

    m.start()
    before = m.counters()
    with open(m.path / "fifty.bin", "rb") as handle:
        head = handle.read(1024)
    spent = delta(before, m.counters())
    assert head == big[:1024]
    assert spent.get("download", 0) == 0 and spent.get("batch_runs", 0) == 1, spent
    assert sum(spent.values()) - spent.get("batch_runs", 0) <= 4, spent
    assert (m.path / "fifty.bin").read_bytes() == big
    assert (m.path / "five.bin").read_bytes() == small_big
