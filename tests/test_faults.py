"""The mount under faults: nothing the network, the server, the session or the disk does ends it.

Each test mounts a fresh session of its own `baifs serve` through the fault
proxy (`faultproxy.py`), injects one kind of trouble (5xx answers, resets
before and after the server acted, stalls, the server killed and back, a
full disk, the session deleted) and checks that the daemon lives, that what
it knows keeps working, that every wait is bounded, and that nothing written
is lost once the trouble is gone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import Mount, baifs, baifs_environment, create_session, force_unmount, needs_fuse, wait_for
from support import FaultProxy, LocalServer, signed_request, start_proxy, start_server

from baifs.fs import scratch

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(240)]


@dataclass
class Faulty:
    server: LocalServer
    proxy: FaultProxy
    mount: Mount


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[Faulty]:
    """A server of the test's own, the fault proxy in front, and a mount (not started) through it."""
    server = start_server(tmp_path / "server")
    proxy = start_proxy(tmp_path / "proxy", server)
    home = tmp_path / "home"
    home.mkdir()
    env = baifs_environment(server, home, proxy.endpoint)
    mount = Mount(tmp_path / "mnt", server, create_session(server), home, env)
    try:
        yield Faulty(server, proxy, mount)
    finally:
        mount.stop()
        proxy.stop()
        server.stop()


def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    """How long a call took, and what it raised."""
    started = time.monotonic()
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the caller asserts on it
        return time.monotonic() - started, error
    return time.monotonic() - started, None


def in_background(call: Callable[[], object]) -> threading.Thread:
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    return worker


def write_back_failures(m: Mount) -> int:
    """Write-back's failed attempts so far, as its log says them.

    The status document's ``flushes.failures`` counts only flushes that failed once under way,
    not those that failed before (concluding an earlier run, say): the log has every one.
    """
    return m.log_text().count("write-back failed")


def write_back_failed(m: Mount, unreachable: bool = False) -> Callable[[], bool]:
    """Made before a trouble: whether write-back has failed since (and the remote is known away)."""
    before = write_back_failures(m)

    def failed() -> bool:
        return write_back_failures(m) > before and not (unreachable and m.status()["remote"]["reachable"])

    return failed


def write_back_took(m: Mount) -> Callable[[], bool]:
    """Made right after changes: whether a write-back attempt that started after them has ended.

    The first attempt to end may have been under way already when they were made: it counts only
    if nothing is pending after it; otherwise the second one, which started after it, took them.
    """

    def ended(status: dict) -> int:
        return status["flushes"]["completed"] + write_back_failures(m)

    before = ended(m.status())

    def took() -> bool:
        status = m.status()
        count, pending = ended(status) - before, status["pending"]
        return count >= 2 or (count >= 1 and not pending["uploads"] and not pending["namespace_changes"])

    return took


def serving_its_inbox(m: Mount) -> bool:
    """Whether run 1 holds the slot, its inbox open, and its supervisor's loop beats in the session."""
    run_id = json.loads((m.path / ".runs" / "1" / "status").read_text())["run_id"]
    slot = m.status()["slot"]
    if not run_id or slot["run"] != run_id or not slot["inbox"]:
        return False
    return (m.work / os.fsdecode(scratch.heartbeat(scratch.box_of(run_id)))).exists()


def quietly(call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            call()
        except OSError:
            pass

    return run


# -- 1. a flush that fails after its retries ---------------------------------


@pytest.mark.parametrize("through", ["proxy", "direct"])
def test_write_back_while_the_server_is_down_keeps_the_daemon(faulty: Faulty, through: str) -> None:
    m = faulty.mount
    if through == "direct":  # connections refused, not answered 502 by a proxy
        m.env["BACKEND_ENDPOINT"] = faulty.server.endpoint
    m.start("--write-back", "0.3")
    (m.path / "d").mkdir()
    m.sync()
    os.listdir(m.path / "d")
    failed = write_back_failed(m, unreachable=True)
    faulty.server.kill()
    (m.path / "d" / "f").write_text("x\n")
    wait_for(failed, 60, "write-back to fail against the server down")
    assert m.alive, m.log_text()
    assert (m.path / "d" / "f").read_text() == "x\n"
    status = m.status()
    assert status["pending"]["uploads"] == 1 and not status["remote"]["reachable"]
    faulty.server.restart()
    m.sync()
    assert (m.work / "d" / "f").read_text() == "x\n"
    assert "ExceptionGroup" not in m.log_text()


def test_verification_listings_failing_for_a_while_lose_nothing(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "0.3")
    os.listdir(m.path)
    failed = write_back_failed(m)
    faulty.proxy.set({"endpoint": "list", "fault": "status", "status": 502})
    for index in range(5):
        (m.path / f"f{index}").write_text(f"{index}\n")
    wait_for(
        lambda: failed() and faulty.proxy.state()["injected"].get("list:status", 0) > 0,
        60,
        "write-back to fail on the failing listings",
    )
    assert m.alive and m.status()["pending"]["uploads"] == 5
    faulty.proxy.clear()
    m.sync()
    assert sorted(p.name for p in m.work.iterdir()) == [f"f{index}" for index in range(5)]


def test_the_server_killed_mid_flush_and_back_loses_nothing(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "0.3")
    os.listdir(m.path)
    faulty.proxy.set({"endpoint": "upload", "fault": "delay", "seconds": 0.3})
    data = os.urandom(30 * 1024 * 1024)
    (m.path / "big.bin").write_bytes(data)
    for index in range(40):
        (m.path / f"small{index}").write_text(str(index))
    wait_for(lambda: m.status()["flush"].get("bytes_done", 0) > 0, 30, "write-back to get going")
    failed = write_back_failed(m, unreachable=True)
    faulty.server.kill()
    wait_for(failed, 60, "the flush to fail against the server killed")
    assert m.alive, m.log_text()
    faulty.server.restart()
    faulty.proxy.clear()
    m.sync()
    assert (m.work / "big.bin").read_bytes() == data
    assert all((m.work / f"small{index}").read_text() == str(index) for index in range(40))
    assert not (m.work / ".baifs-tmp").exists() or not any((m.work / ".baifs-tmp").iterdir())


def test_a_rate_of_failing_requests_loses_nothing(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "0.3")
    os.listdir(m.path)
    faulty.proxy.set(
        {"endpoint": "*", "fault": "status", "status": 503, "rate": 0.2},
        {"endpoint": "*", "fault": "reset_before", "rate": 0.2},
        {"endpoint": "*", "fault": "reset_after", "rate": 0.2},
        seed=7,
    )
    expected: dict[str, bytes] = {}
    for index in range(150):
        name = f"dir{index % 6}/file{index}"
        (m.path / name).parent.mkdir(exist_ok=True)
        (m.path / name).write_bytes(os.urandom(1000 + index))
        expected[name] = (m.path / name).read_bytes()
    wait_for(write_back_took(m), 60, "write-back to meet the faults")
    os.rename(m.path / "dir0", m.path / "moved")
    expected = {name.replace("dir0/", "moved/"): data for name, data in expected.items()}
    os.unlink(m.path / "dir1" / "file1")
    del expected["dir1/file1"]
    os.chmod(m.path / "dir2" / "file2", 0o600)
    (m.path / "dir2" / "file5").write_bytes(b"rewritten")
    expected["dir2/file5"] = b"rewritten"
    wait_for(write_back_took(m), 60, "write-back to take the changes through the faults")
    assert m.alive, m.log_text()
    faulty.proxy.clear()
    m.sync()
    for name, data in expected.items():
        assert (m.work / name).read_bytes() == data, name
    assert not (m.work / "dir0").exists() and not (m.work / "dir1" / "file1").exists()
    assert (m.work / "dir2" / "file2").stat().st_mode & 0o777 == 0o600
    state = faulty.proxy.state()
    assert sum(state["injected"].values()) >= 3, state


# -- 2. a lost answer to an execute --------------------------------------------


def test_a_lost_answer_to_a_flush_run_is_followed_and_the_session_stays_usable(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "600")
    (m.path / "a").write_text("a\n")
    m.sync()
    faulty.proxy.set({"endpoint": "execute", "fault": "reset_after", "count": 1})
    os.rename(m.path / "a", m.path / "b")
    m.sync()
    assert (m.work / "b").read_text() == "a\n" and not (m.work / "a").exists()
    assert faulty.proxy.state()["injected"] == {"execute:reset_after": 1}
    started = time.monotonic()
    result = baifs("run", str(m.path), "--", "echo", "still usable", env=m.env, timeout=60)
    assert "still usable" in result.stdout and time.monotonic() - started < 15


def test_a_lost_answer_to_a_users_run_says_so_and_the_next_run_works(faulty: Faulty) -> None:
    m = faulty.mount.start()
    faulty.proxy.set({"endpoint": "execute", "fault": "reset_after", "count": 1})
    lost = baifs("run", str(m.path), "--", "echo", "once", env=m.env, check=False, timeout=60)
    assert lost.returncode == 255 and "lost" in lost.stderr and "Traceback" not in lost.stderr
    result = baifs("run", str(m.path), "--", "echo", "twice", env=m.env, timeout=60)
    assert result.stdout == "twice\n"


def test_an_unresolved_flush_survives_a_crash_and_the_next_mount_concludes_its_run(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "600")
    (m.path / "a").write_text("a\n")
    m.sync()
    faulty.proxy.set({"endpoint": "execute", "fault": "reset_after"})
    os.rename(m.path / "a", m.path / "b")
    with pytest.raises(OSError):
        m.sync()
    marker = next((m.home / "state").rglob("current-run"))
    run_id = marker.read_text().strip()
    assert len(run_id) == 32
    m.kill()
    faulty.proxy.clear()
    m.start()
    m.sync()
    assert (m.work / "b").read_text() == "a\n" and not (m.work / "a").exists()
    wait_for(lambda: not marker.exists(), 20, "the run the crashed mount left to be concluded")
    # The marker goes just before the line is logged: wait for the line too.
    wait_for(lambda: f"run {run_id}: concluded" in m.log_text(), 10, "the conclusion to be logged")
    assert baifs("run", str(m.path), "--", "true", env=m.env, timeout=60).returncode == 0


# -- 3. a full local disk --------------------------------------------------------


def test_a_full_disk_fails_calls_not_the_daemon_nor_the_session(faulty: Faulty, small_disk: Path) -> None:
    m = faulty.mount
    m.env["XDG_STATE_HOME"] = str(small_disk)
    m.start("--write-back", "0.3")
    (m.path / "keep.txt").write_text("kept\n")
    m.sync()
    failed = write_back_failed(m)
    with pytest.raises(OSError) as raised:
        (m.path / "huge.bin").write_bytes(b"x" * 8 * 1024 * 1024)
    assert raised.value.errno == errno.ENOSPC
    refused = baifs("run", str(m.path), "--", "true", env=m.env, check=False, timeout=60)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    # Write-back meets the full disk (the run marker) and lives.
    wait_for(failed, 60, "write-back to fail on the full disk")
    assert m.alive, m.log_text()
    (m.path / "huge.bin").unlink()
    os.rename(m.path / "keep.txt", m.path / "renamed.txt")
    m.sync()
    assert (m.work / "renamed.txt").read_text() == "kept\n" and not (m.work / "huge.bin").exists()
    assert baifs("run", str(m.path), "--", "true", env=m.env, timeout=60).returncode == 0
    m.unmount()
    m.start()
    assert baifs("run", str(m.path), "--", "true", env=m.env, timeout=60).returncode == 0
    assert "concluding run  " not in m.log_text() and "continuation requires" not in m.log_text()


# -- 4. a session deleted while mounted ------------------------------------------


def test_a_deleted_session_keeps_the_mount_and_the_changes_for_salvage(
    faulty: Faulty, tmp_path: Path
) -> None:
    m = faulty.mount.start("--write-back", "600")
    (m.path / "cached.txt").write_text("read me later\n")
    m.sync()
    (m.path / "sub").mkdir()
    (m.path / "sub" / "precious.txt").write_text("do not lose me\n")
    os.chmod(m.path / "sub" / "precious.txt", 0o600)
    signed_request(m.server, "DELETE", f"/session/{m.session_id}").raise_for_status()
    duration, error = timed(m.sync)
    assert isinstance(error, OSError) and error.errno == errno.EIO and duration < 30
    run = baifs("run", str(m.path), "--", "true", env=m.env, check=False, timeout=60)
    assert run.returncode == 255 and "terminated" in run.stderr and "Traceback" not in run.stderr
    assert m.alive
    assert (m.path / "cached.txt").read_text() == "read me later\n"
    assert "terminated" in m.status()["remote"]["terminated"]
    assert "TERMINATED" in baifs("status", str(m.path), env=m.env).stdout
    assert "session terminated" in m.log_text().replace("is terminated", "session terminated")
    m.unmount()

    listed = baifs("salvage", "list", env=m.env).stdout
    assert m.session_id in listed
    rescued = tmp_path / "rescued"
    baifs("salvage", "export", m.session_id, str(rescued), env=m.env)
    assert (rescued / "sub" / "precious.txt").read_text() == "do not lose me\n"
    assert (rescued / "sub" / "precious.txt").stat().st_mode & 0o777 == 0o600
    assert json.loads((rescued / ".baifs-salvage.json").read_text())["files"] == 1

    replacement = create_session(m.server)
    baifs("salvage", "replay", m.session_id, replacement, env=m.env, timeout=120)
    assert (m.server.work_dir(replacement) / "sub" / "precious.txt").read_text() == "do not lose me\n"
    assert "no state" in baifs("salvage", "list", env=m.env).stdout


def test_a_new_session_of_the_same_name_hears_of_the_earlier_ones_changes(faulty: Faulty) -> None:
    m = faulty.mount
    name = "same-name-session"
    m.path.mkdir()
    baifs("mount", "--create", "python:3.11", name, str(m.path), "--write-back", "600", env=m.env)
    try:
        (m.path / "unsent.txt").write_text("x\n")
        signed_request(m.server, "DELETE", f"/session/{name}").raise_for_status()
        baifs("umount", str(m.path), env=m.env, check=False)
        force_unmount(m.path)
        started = baifs("mount", "--create", "python:3.11", name, str(m.path), env=m.env)
        assert "earlier session named same-name-session" in started.stderr
    finally:
        force_unmount(m.path)


# -- 5. rm of a file whose upload is queued ---------------------------------------


def test_removing_files_whose_uploads_are_queued(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "0.2")
    faulty.proxy.set({"endpoint": "upload", "fault": "delay", "seconds": 1.5})
    for index in range(120):
        (m.path / f"q{index:03d}").write_bytes(b"q" * 2000)
    wait_for(lambda: m.status()["flush"].get("files_total", 0) > 0, 20, "the flush to start")
    for index in range(120):
        os.unlink(m.path / f"q{index:03d}")
    faulty.proxy.clear()
    m.sync()
    assert m.alive and "FileNotFoundError" not in m.log_text()
    assert not [p for p in m.work.iterdir() if p.name.startswith("q")]
    assert not list((m.home / "state").rglob("staging/*"))


# -- 6. unmount while a flush goes -------------------------------------------------


def test_unmount_during_a_flush_keeps_a_deletion_made_just_before(faulty: Faulty) -> None:
    (faulty.mount.work / "old.txt").write_text("old\n")
    m = faulty.mount.start("--write-back", "0.2")
    assert (m.path / "old.txt").read_text() == "old\n"
    faulty.proxy.set({"endpoint": "upload", "fault": "delay", "seconds": 2})
    (m.path / "new.txt").write_text("new\n")
    (m.path / "old.txt").unlink()
    os.utime(m.path / "new.txt", ns=(10**18, 10**18))
    wait_for(lambda: m.status()["flush"].get("files_total", 0) > 0, 20, "the flush to start")
    m.unmount()
    assert (m.work / "new.txt").read_text() == "new\n"
    assert not (m.work / "old.txt").exists()
    assert (m.work / "new.txt").stat().st_mtime_ns == 10**18


# -- 7. and 8. coherent reads --------------------------------------------------------


def test_a_large_file_reads_back_right_after_write_fsync_close_rename(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "600")
    data = os.urandom(2_500_000)
    descriptor = os.open(m.path / "tmp_pack_x", os.O_WRONLY | os.O_CREAT, 0o444)
    os.write(descriptor, data)
    os.fsync(descriptor)
    os.close(descriptor)
    os.rename(m.path / "tmp_pack_x", m.path / "pack-1.pack")
    assert (m.path / "pack-1.pack").read_bytes() == data
    m.sync()
    assert (m.work / "pack-1.pack").read_bytes() == data


def test_an_open_descriptor_follows_the_session_and_tail_f_shows_new_lines(faulty: Faulty) -> None:
    (faulty.mount.work / "log.txt").write_text("one\n")
    m = faulty.mount.start("--dir-cache-time", "1", "--attr-timeout", "0.5")
    with open(m.path / "log.txt", "rb") as handle:
        assert handle.read() == b"one\n"
        with open(m.work / "log.txt", "a") as appender:
            appender.write("two\n")
        wait_for(lambda: os.fstat(handle.fileno()).st_size == 8, 10, "the new size")
        assert os.pread(handle.fileno(), 100, 0) == b"one\ntwo\n"
    tail = subprocess.Popen(["tail", "-f", str(m.path / "log.txt")], stdout=subprocess.PIPE)
    try:
        lines: list[bytes] = []
        reader = in_background(lambda: lines.extend(iter(tail.stdout.readline, b"")))  # type: ignore[union-attr]
        for word in ("three", "four"):
            with open(m.work / "log.txt", "a") as appender:
                appender.write(word + "\n")
            wait_for(lambda word=word: word.encode() + b"\n" in lines, 10, f"tail -f to show {word}")
    finally:
        tail.kill()
        tail.wait()
        reader.join(5)


# -- 9. the rest: runs at unmount, create retried, a frozen remote, offline work --------


def test_a_rename_left_for_the_final_flush_lands(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "600")
    (m.path / "a").write_text("a\n")
    m.sync()
    os.rename(m.path / "a", m.path / "z")
    assert m.unmount() == 0, "the daemon did not exit cleanly after its final flush"
    assert (m.work / "z").read_text() == "a\n" and not (m.work / "a").exists()
    assert "Nursery is closed" not in m.log_text() and "Traceback" not in m.log_text()


def test_mount_create_retries_a_failed_request(faulty: Faulty) -> None:
    m = faulty.mount
    m.path.mkdir()
    faulty.proxy.set(
        {"endpoint": "create", "fault": "status", "status": 503, "count": 1},
        {"endpoint": "info", "fault": "reset_before", "count": 1},
    )
    try:
        baifs("mount", "--create", "python:3.11", "created-under-faults", str(m.path), env=m.env)
        assert os.path.ismount(m.path)
    finally:
        force_unmount(m.path)


def test_a_frozen_remote_bounds_every_call_and_what_is_known_keeps_working(faulty: Faulty) -> None:
    work = faulty.mount.work
    (work / "listed").mkdir()
    (work / "listed" / "uncached.txt").write_text("never read\n")
    (work / "unlisted").mkdir()
    m = faulty.mount.start("--write-back", "600", "--dir-cache-time", "1")
    os.listdir(m.path / "listed")
    (m.path / "listed" / "mine.txt").write_text("mine\n")
    faulty.proxy.set({"endpoint": "*", "fault": "stall"})
    time.sleep(1.5)  # outlasts the listing TTL (--dir-cache-time 1): every listing is stale now
    results: dict[str, tuple[float, BaseException | None]] = {}

    def attempt(name: str, call: Callable[[], object]) -> threading.Thread:
        return in_background(lambda: results.__setitem__(name, timed(call)))

    def fsync_new() -> None:
        descriptor = os.open(m.path / "listed" / "fsynced.txt", os.O_WRONLY | os.O_CREAT)
        try:
            os.write(descriptor, b"x")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    workers = [
        attempt("ls", lambda: os.listdir(m.path / "unlisted")),
        attempt("cat", lambda: (m.path / "listed" / "uncached.txt").read_bytes()),
        attempt("fsync", fsync_new),
        attempt("stat", lambda: os.stat(m.path / "listed" / "mine.txt")),
        attempt("create", lambda: (m.path / "listed" / "offline.txt").write_text("offline\n")),
    ]
    for worker in workers:
        worker.join(40)
    for name in ("ls", "cat", "fsync"):
        duration, error = results[name]
        assert isinstance(error, OSError) and error.errno in (errno.EIO, errno.EAGAIN), (name, error)
        assert duration < 30, (name, duration)
    for name in ("stat", "create"):
        duration, error = results[name]
        assert error is None and duration < 10, (name, results[name])
    assert m.alive
    faulty.proxy.clear()
    m.sync()
    assert (m.work / "listed" / "offline.txt").read_text() == "offline\n"
    assert (m.work / "listed" / "fsynced.txt").read_text() == "x"


def test_with_the_server_down_a_stale_listing_still_serves_create_and_stat(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "600", "--dir-cache-time", "1")
    (m.path / "d").mkdir()
    (m.path / "d" / "written.txt").write_text("written\n")
    m.sync()
    faulty.server.kill()
    time.sleep(1.5)  # outlasts the listing TTL (--dir-cache-time 1): the listing of d is stale now
    duration, error = timed(lambda: os.stat(m.path / "d" / "written.txt"))
    assert error is None and duration < 10
    duration, error = timed(lambda: (m.path / "d" / "created.txt").write_text("made offline\n"))
    assert error is None and duration < 10
    faulty.server.restart()
    m.sync()
    assert (m.work / "d" / "created.txt").read_text() == "made offline\n"


# -- 5. the inbox of the mount's own run ---------------------------------------


def test_faults_between_the_mount_and_its_runs_supervisor_lose_nothing(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "0.3")
    (m.path / "keep").mkdir()
    for index in range(10):
        (m.path / "keep" / f"f{index}").write_text(f"{index}\n")
    m.sync()
    argv = ["run", str(m.path), "--", "echo begin; sleep 25; echo done"]
    runner = in_background(lambda: baifs(*argv, env=m.env, timeout=120))
    wait_for(lambda: (m.path / ".runs" / "1").exists(), 20, "the run to start")
    wait_for(lambda: serving_its_inbox(m), 20, "the run's supervisor to serve its inbox")
    faulty.proxy.set(
        *(
            {
                "endpoint": endpoint,
                "fault": fault,
                "rate": 0.25,
                **({"status": 503} if fault == "status" else {}),
            }
            for endpoint in ("upload", "list", "download")
            for fault in ("status", "reset_before", "reset_after")
        ),
        seed=11,
    )
    os.rename(m.path / "keep", m.path / "kept")
    os.unlink(m.path / "kept" / "f3")
    (m.path / "kept" / "sub").mkdir()
    big = os.urandom(2 * 1024 * 1024 + 3)
    (m.path / "kept" / "sub" / "big.bin").write_bytes(big)
    wait_for(write_back_took(m), 60, "write-back to take the changes through the faults and the inbox")
    assert m.alive, m.log_text()
    faulty.proxy.clear()
    m.sync()
    assert json.loads((m.path / ".runs" / "1" / "status").read_text())["state"] == "running"
    assert not (m.work / "keep").exists() and not (m.work / "kept" / "f3").exists()
    assert (m.work / "kept" / "sub" / "big.bin").read_bytes() == big
    assert sorted(os.listdir(m.work / "kept")) == sorted([f"f{i}" for i in range(10) if i != 3] + ["sub"])
    runner.join(60)
    assert (m.path / ".runs" / "1" / "output").read_text() == "begin\ndone\n"
    assert sum(faulty.proxy.state()["injected"].values()) >= 3


@pytest.mark.parametrize("action", ["sync", "ranged read"])
def test_what_comes_while_a_run_flushes_before_it_goes_through_the_runs_inbox(
    faulty: Faulty, action: str
) -> None:
    """A run takes the slot, flushes what is pending, and only then opens its inbox. A script
    asked for in between (a sync's flush, a ranged read of a large file) waited for the slot
    until the run ended, and failed with EAGAIN after 20 s."""
    m = faulty.mount.start("--write-back", "600", "--dir-cache-time", "600")
    big = os.urandom(3 * 1024 * 1024 + 5)
    (m.work / "big.bin").write_bytes(big)
    os.listdir(m.path)  # known: what follows needs no listing
    (m.path / "pending.txt").write_text("for the run's flush\n")
    faulty.proxy.set({"endpoint": "upload", "fault": "delay", "seconds": 3, "count": 1})
    argv = ["run", str(m.path), "--", "echo begin; while [ ! -e stop ]; do sleep 0.2; done; echo done"]
    runner = in_background(lambda: baifs(*argv, env=m.env, timeout=120))
    wait_for(lambda: faulty.proxy.state()["injected"], 20, "the run's flush to upload")
    assert not m.status()["slot"]["inbox"]  # the run holds the slot; its inbox is not open yet
    if action == "sync":
        (m.path / "made-meanwhile").mkdir()
        waited, error = timed(m.sync)
        assert (m.work / "made-meanwhile").is_dir() and (m.work / "pending.txt").exists()
    else:
        waited, error = timed(lambda: assert_equal((m.path / "big.bin").read_bytes(), big))
    assert error is None and waited < 15, (waited, error, m.log_text()[-2000:])
    assert json.loads((m.path / ".runs" / "1" / "status").read_text())["state"] == "running"
    (m.work / "stop").touch()
    runner.join(60)
    assert (m.path / ".runs" / "1" / "output").read_text() == "begin\ndone\n"


def assert_equal(got: bytes, expected: bytes) -> None:
    assert got == expected, (len(got), len(expected))


def test_discovery_through_failing_uploads_and_a_lost_run_answer_gets_there(faulty: Faulty) -> None:
    faulty.proxy.set(
        {"endpoint": "upload", "fault": "status", "status": 503, "count": 5},
        {"endpoint": "execute", "fault": "reset_after", "count": 1},
    )
    m = faulty.mount.start(timeout=60)
    profile = m.status()["profile"]
    assert profile["source"] == "discovered" and profile["uploads_owned"] is True, m.log_text()
    assert m.alive
    (m.path / "after.txt").write_text("x\n")
    m.sync()
    assert (m.work / "after.txt").read_text() == "x\n"
    assert not any(name.startswith(".baifs-probe") for name in os.listdir(m.work)), os.listdir(m.work)
    assert sum(faulty.proxy.state()["injected"].values()) >= 2


def test_the_flush_before_a_run_is_tried_again_while_the_session_answers(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "600")  # everything waits for the runs' barrier flushes
    os.listdir(m.path)
    for number in range(3):
        (m.path / f"round{number}").mkdir()
        for index in range(8):
            (m.path / f"round{number}" / f"f{index}.txt").write_text(f"{number}.{index}\n")
        # More failures in a row than one request's retries: the first flush fails as a whole.
        faulty.proxy.set({"endpoint": "upload", "fault": "status", "status": 503, "count": 6})
        command = f"cat round{number}/f*.txt | wc -l; exit {number + 3}"
        result = subprocess.run(
            [sys.executable, "-m", "baifs", "run", str(m.path), "--", command],
            env=m.env,
            capture_output=True,
            timeout=180,
        )
        assert result.returncode == number + 3, (result, m.log_text()[-3000:])
        assert result.stdout.split() == [b"8"], result
        assert faulty.proxy.state()["injected"] == {"upload:status": 6 * (number + 1)}
    assert m.log_text().count("the flush before a run failed") == 3
    assert m.alive and m.status()["pending"]["uploads"] == 0


def test_directories_an_unconfirmed_upload_made_go_when_the_tree_is_removed_here(faulty: Faulty) -> None:
    m = faulty.mount.start("--write-back", "2")
    os.listdir(m.path)
    # One upload request lands at every attempt and loses every answer: the flush fails,
    # and the mount cannot know what is in the session (files, and the directories they made).
    faulty.proxy.set({"endpoint": "upload", "fault": "reset_after", "count": 4})
    (m.path / "tree" / "gone" / "deep").mkdir(parents=True)
    (m.path / "tree" / "gone" / "deep" / "f.txt").write_text("uploaded, never confirmed\n")
    (m.path / "tree" / "moved" / "sub").mkdir(parents=True)
    (m.path / "tree" / "moved" / "sub" / "g.txt").write_text("also\n")
    wait_for(lambda: faulty.proxy.state()["injected"].get("upload:reset_after") == 4, what="the lost answers")
    wait_for(lambda: "write-back failed" in m.log_text(), what="the flush to fail")
    shutil.rmtree(m.path / "tree" / "gone")  # within write-back's backoff: still unconfirmed
    os.rename(m.path / "tree" / "moved", m.path / "tree" / "there")
    assert (m.work / "tree" / "gone" / "deep" / "f.txt").exists()
    m.sync()
    assert m.unmount() == 0
    remaining = sorted(str(p.relative_to(m.work / "tree")) for p in (m.work / "tree").rglob("*"))
    assert remaining == ["there", "there/sub", "there/sub/g.txt"], remaining
