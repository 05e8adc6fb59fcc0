"""Another writer in the session: a terminal, a job or a run changes /home/work while the mount works.

The mount's rule until the conflict design: what either side wrote is never
lost without a word. A removal here removes only what the mount removed; a
change here inside something the session removed is put back; the session's
change to a file open here is what the file shows and what a local append
extends. Every test changes the session's disk directly (as a terminal in the
session would) and checks both sides through the real mount and server.
"""

from __future__ import annotations

import os
import shutil

import pytest
from mounting import Mount, needs_fuse, wait_for

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(120)]


def test_rmdir_of_a_directory_the_session_just_filled_keeps_what_the_session_put_there(mount: Mount) -> None:
    m = mount.start()
    (m.path / "d").mkdir()
    m.sync()
    assert os.listdir(m.path / "d") == []  # listed: empty, as far as the mount knows
    (m.work / "d" / "precious.txt").write_text("made in the session\n")
    os.rmdir(m.path / "d")  # the listing is fresh: the kernel and the mount see an empty directory
    m.sync()

    assert (m.work / "d" / "precious.txt").read_text() == "made in the session\n"
    status = m.status()
    assert status["flushes"]["kept_in_session"] == 1
    assert status["pending"]["namespace_changes"] == 0
    assert "remove directory d: not done" in m.log_text()
    # The directory shows again, with what the session put in it.
    wait_for(lambda: (m.path / "d" / "precious.txt").exists(), what="the kept directory to show again")
    assert (m.path / "d" / "precious.txt").read_text() == "made in the session\n"


def test_rm_of_a_file_the_session_made_a_directory_keeps_the_directory(mount: Mount) -> None:
    m = mount.start()
    (m.path / "x").write_text("a file\n")
    m.sync()
    assert (m.path / "x").is_file()
    (m.work / "x").unlink()
    (m.work / "x").mkdir()
    (m.work / "x" / "inner.txt").write_text("inside\n")
    os.unlink(m.path / "x")  # the mount still knows x as a file
    m.sync()

    assert (m.work / "x" / "inner.txt").read_text() == "inside\n"
    assert m.status()["flushes"]["kept_in_session"] == 1
    wait_for(lambda: (m.path / "x").is_dir(), what="the session's directory to show")


def test_rm_r_removes_what_the_mount_saw_and_keeps_what_it_did_not(mount: Mount) -> None:
    m = mount.start()
    (m.path / "tree" / "sub").mkdir(parents=True)
    (m.path / "tree" / "a.txt").write_text("a\n")
    (m.path / "tree" / "sub" / "b.txt").write_text("b\n")
    m.sync()
    assert sorted(os.listdir(m.path / "tree" / "sub")) == ["b.txt"]
    (m.work / "tree" / "sub" / "late.txt").write_text("late\n")
    shutil.rmtree(m.path / "tree")
    m.sync()

    assert sorted(p.name for p in (m.work / "tree").rglob("*")) == ["late.txt", "sub"]
    assert not (m.work / "tree" / "a.txt").exists()
    assert m.status()["flushes"]["kept_in_session"] == 2  # tree/sub, then tree


def test_an_rmdir_replayed_after_a_crash_keeps_a_file_made_after_the_crash(mount: Mount) -> None:
    m = mount.start("--write-back", "600")
    (m.path / "d").mkdir()
    m.sync()
    assert os.listdir(m.path / "d") == []
    os.rmdir(m.path / "d")
    wait_for(lambda: m.status()["pending"]["namespace_changes"] == 1, what="the rmdir to be pending")
    m.kill()
    (m.work / "d" / "after-the-crash.txt").write_text("new\n")

    m.start()
    m.sync()
    assert (m.work / "d" / "after-the-crash.txt").read_text() == "new\n"
    assert m.status()["flushes"]["kept_in_session"] == 1


def test_a_directory_removed_in_the_session_is_made_again_with_the_changes_inside(mount: Mount) -> None:
    m = mount.start("--dir-cache-time", "0.5", "--write-back", "600")
    (m.path / "out").mkdir()
    (m.path / "out" / "train.log").write_text("line 1\n")
    (m.path / "out" / "clean.txt").write_text("uploaded, then removed in the session\n")
    m.sync()
    with open(m.path / "out" / "train.log", "a") as log:  # exec 3>>out/train.log
        (m.path / "out" / "new.txt").write_text("waits in the write-back window\n")
        shutil.rmtree(m.work / "out")  # rm -rf out, in the session

        def noticed() -> bool:
            os.listdir(m.path / "out")
            return m.status()["pending"]["namespace_changes"] >= 1  # out is to be made again

        wait_for(noticed, what="the mount to see out removed")
        log.write("line 2\n")
    assert (m.path / "out" / "train.log").read_text() == "line 1\nline 2\n"
    m.sync()

    assert (m.work / "out" / "train.log").read_text() == "line 1\nline 2\n"
    assert (m.work / "out" / "new.txt").read_text() == "waits in the write-back window\n"
    assert not (m.work / "out" / "clean.txt").exists()  # unchanged here: the session's removal stands
    assert sorted(os.listdir(m.path / "out")) == ["new.txt", "train.log"]
    assert m.status()["pending"] == {**m.status()["pending"], "uploads": 0, "namespace_changes": 0}


def test_a_directory_the_session_replaced_by_a_file_keeps_both(mount: Mount) -> None:
    m = mount.start("--dir-cache-time", "0.5", "--write-back", "600")
    (m.path / "out").mkdir()
    m.sync()
    (m.path / "out" / "new.txt").write_text("made here\n")
    (m.work / "out").rmdir()
    (m.work / "out").write_text("the session's file\n")

    def noticed() -> bool:
        os.listdir(m.path)
        return m.status()["pending"]["namespace_changes"] >= 1

    wait_for(noticed, what="the mount to see out replaced")
    assert (m.path / "out" / "new.txt").read_text() == "made here\n"
    with pytest.raises(OSError):
        m.sync()
    assert (m.work / "out").read_text() == "the session's file\n"
    status = m.status()
    assert status["pending"]["uploads"] == 1, status


def test_a_file_open_for_appending_follows_what_a_run_appended(mount: Mount) -> None:
    m = mount.start("--dir-cache-time", "0.5", "--write-back", "600")
    (m.path / "log").write_text("mine\n")
    m.sync()
    with open(m.path / "log", "a") as log:  # exec 3>>log
        with open(m.work / "log", "a") as session_side:  # a run appends
            session_side.write("the run's line\n")
        wait_for(lambda: os.stat(m.path / "log").st_size == 20, what="the mount to see the run's line")
        assert (m.path / "log").read_text() == "mine\nthe run's line\n"
        log.write("local\n")
    m.sync()
    assert (m.work / "log").read_text() == "mine\nthe run's line\nlocal\n"


def test_a_file_open_for_writing_and_closed_unwritten_shows_the_sessions_change(mount: Mount) -> None:
    m = mount.start("--dir-cache-time", "0.5", "--write-back", "600")
    (m.path / "data").write_text("old version\n")
    m.sync()
    descriptor = os.open(m.path / "data", os.O_RDWR)
    try:
        (m.work / "data").write_text("new version\n")  # same size, changed in the session
        os.utime(m.work / "data", (1_000_000_000, 1_000_000_000))

        def seen() -> bool:
            return os.stat(m.path / "data").st_mtime == 1_000_000_000

        wait_for(seen, what="the mount to see the session's change")
        assert os.pread(descriptor, 100, 0) == b"new version\n"
    finally:
        os.close(descriptor)
    assert (m.path / "data").read_text() == "new version\n"
    (m.path / "other").write_text("x\n")
    m.sync()
    assert (m.work / "data").read_text() == "new version\n"
    assert m.status()["flushes"]["uploaded_files"] == 2  # data at first, then other: data never again


def test_a_same_size_rewrite_within_the_second_never_tears_a_read(mount: Mount) -> None:
    size = 5_000_000
    old, new = b"o" * size, b"n" * size
    second = 1_700_000_000
    (mount.work / "big.bin").write_bytes(old)
    os.utime(mount.work / "big.bin", ns=(second * 10**9 + 100_000_000,) * 2)
    m = mount.start("--dir-cache-time", "600")  # the listing stays trusted: only the content check can tell
    descriptor = os.open(m.path / "big.bin", os.O_RDONLY)
    try:
        assert os.pread(descriptor, 1000, 0) == b"o" * 1000  # its first chunk is cached now
        (m.work / "big.bin").write_bytes(new)  # rewritten in place: same size, same second
        os.utime(m.work / "big.bin", ns=(second * 10**9 + 600_000_000,) * 2)
        try:
            whole = os.pread(descriptor, size, 0)  # one read
        except OSError:
            whole = b""  # refusing is fine; mixing is not
    finally:
        os.close(descriptor)
    assert len(set(whole)) <= 1, (
        f"one read returned {whole.count(b'o')} old and {whole.count(b'n')} new bytes"
    )
    with open(m.path / "big.bin", "rb") as again:
        assert again.read() == new
