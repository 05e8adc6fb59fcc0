"""Mounting, unmounting, crashing and failing: nothing written is ever lost, every failure is explained."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mount, baifs, baifs_environment, force_unmount, mount_for, needs_fuse, wait_for
from support import LocalServer, signed_request

from baifs.processes import running

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]


def write_pending(m: Mount, count: int = 30) -> dict[str, bytes]:
    written = {}
    for index in range(count):
        name = f"pending/f{index:02d}.txt"
        data = f"file {index}\n".encode() * (index + 1)
        (m.path / name).parent.mkdir(exist_ok=True)
        (m.path / name).write_bytes(data)
        written[name] = data
    os.rename(m.path / "pending/f00.txt", m.path / "renamed.txt")
    written["renamed.txt"] = written.pop("pending/f00.txt")
    return written


def assert_on_session(m: Mount, written: dict[str, bytes]) -> None:
    for name, data in written.items():
        assert (m.work / name).read_bytes() == data, name


def test_baifs_mount_daemonizes_and_umount_uploads_everything_first(mount: Mount) -> None:
    mount.path.mkdir()
    started = baifs("mount", mount.session_id, str(mount.path), "--write-back", "600", env=mount.env)
    assert "mounted session" in started.stderr
    assert os.path.ismount(mount.path)
    pid = json.loads((mount.path / ".baifs-status").read_text())["pid"]
    written = write_pending(mount)
    status = baifs("status", str(mount.path), env=mount.env).stdout
    assert "30 upload(s)" in status and "pending" in status, status
    finished = baifs("umount", str(mount.path), env=mount.env)
    assert "30 file(s)" in finished.stdout + finished.stderr, finished
    assert not os.path.ismount(mount.path)
    assert not running(pid)  # exited; reaping it is init's business (a container's may never)
    assert_on_session(mount, written)


def test_plain_fusermount_u_loses_nothing(mount: Mount) -> None:
    m = mount.start("--write-back", "600")
    written = write_pending(m)
    m.unmount()
    assert_on_session(m, written)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_flushes_then_unmounts(mount: Mount, signal_number: int) -> None:
    m = mount.start("--write-back", "600")
    written = write_pending(m)
    assert m.process is not None
    m.process.send_signal(signal_number)
    assert m.process.wait(60) == 0
    assert not os.path.ismount(m.path)
    assert_on_session(m, written)


def test_kill_9_with_uploads_pending_then_remount_recovers(mount: Mount) -> None:
    m = mount.start("--write-back", "600")
    written = write_pending(m)
    (m.path / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    written["big.bin"] = (m.path / "big.bin").read_bytes()
    os.chmod(m.path / "renamed.txt", 0o600)
    m.kill()
    assert not (m.work / "renamed.txt").exists()
    m.start()
    wait_for(
        lambda: m.status()["recovered_changes"] > 0 and not m.status()["pending"]["uploads"], what="recovery"
    )
    m.sync()
    assert_on_session(m, written)
    assert os.stat(m.work / "renamed.txt").st_mode & 0o777 == 0o600
    assert "recovered" in m.log_text()
    assert (m.path / "renamed.txt").read_bytes() == written["renamed.txt"]


def test_a_terminated_session_keeps_writes_pending_and_says_so(mount: Mount) -> None:
    m = mount.start("--write-back", "600")
    (m.path / "precious.txt").write_text("do not lose me\n")
    signed_request(m.server, "DELETE", f"/session/{m.session_id}").raise_for_status()
    with pytest.raises(OSError) as raised:
        m.sync()
    assert raised.value.errno == errno.EIO
    status = m.status()
    assert status["pending"]["uploads"] == 1
    assert "No such session" in json.dumps(status["session_api"]["last_errors"])
    text = baifs("status", str(m.path), env=m.env).stdout
    assert "1 upload(s)" in text and "No such session" in text
    staged = list((m.home / "state").rglob("staging/*"))
    assert any(path.read_bytes() == b"do not lose me\n" for path in staged)


def test_full_local_disk_fails_the_write_not_the_mount(mount: Mount, small_disk: Path) -> None:
    mount.env["XDG_STATE_HOME"] = str(small_disk)
    m = mount.start()
    with pytest.raises(OSError) as raised:
        (m.path / "huge.bin").write_bytes(b"x" * 4 * 1024 * 1024)
    assert raised.value.errno == errno.ENOSPC
    (m.path / "huge.bin").unlink()
    (m.path / "after.txt").write_text("still works\n")
    m.sync()
    assert (m.work / "after.txt").read_text() == "still works\n"
    assert not (m.work / "huge.bin").exists()
    m.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_mount_fails_fast_with_a_clear_message(server: LocalServer, tmp_path: Path, mount: Mount) -> None:
    mount.path.mkdir()
    env = mount.env
    cases = [
        ({"BACKEND_SECRET_KEY": "wrong"}, [mount.session_id], "rejected the access key"),
        ({}, ["no-such-session"], "no session 'no-such-session'"),
        (
            {"BACKEND_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
            [mount.session_id],
            "cannot reach the endpoint",
        ),
        (
            {"BACKEND_ENDPOINT": f"{server.endpoint}/api/v1"},
            ["--create", "python:3.11", mount.session_id],
            "does not answer like a Backend.AI manager",
        ),
    ]
    for change, session, message in cases:
        started = time.monotonic()
        result = baifs("mount", *session, str(mount.path), env={**env, **change}, check=False, timeout=60)
        assert result.returncode == 1, result
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "wrong" not in result.stderr
        assert time.monotonic() - started < 20
        assert not os.path.ismount(mount.path)
    result = baifs("mount", mount.session_id, str(tmp_path / "missing"), env=env, check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    (mount.path / "occupied").write_text("x")
    result = baifs("mount", mount.session_id, str(mount.path), env=env, check=False)
    assert result.returncode == 1 and "not empty" in result.stderr


def test_mount_local_starts_the_embedded_session(tmp_path: Path, server: LocalServer) -> None:
    home = tmp_path / "home"
    env = baifs_environment(server, home)
    for key in ("BACKEND_ENDPOINT", "BACKEND_ACCESS_KEY", "BACKEND_SECRET_KEY"):
        env.pop(key)
    mountpoint = tmp_path / "local"
    mountpoint.mkdir()
    record = home / "data/baifs/local/serve.json"
    try:
        baifs("mount", "--local", str(mountpoint), env=env)
        (mountpoint / "hello.txt").write_text("local\n")
        baifs("umount", str(mountpoint), env=env)
        sessions = list((home / "data/baifs/local/sessions").glob("*/work/hello.txt"))
        assert [path.read_text() for path in sessions] == ["local\n"]
        baifs("mount", "--local", str(mountpoint), env=env)
        assert (mountpoint / "hello.txt").read_text() == "local\n"
        baifs("umount", str(mountpoint), env=env)
    finally:
        force_unmount(mountpoint)
        if record.exists():
            os.kill(json.loads(record.read_text())["pid"], signal.SIGTERM)


def test_sighup_reopens_the_log_and_sigusr1_toggles_debug_without_unmounting(mount: Mount) -> None:
    m = mount.start("--log-level", "info")
    assert m.process is not None
    rotated = m.log.with_name(m.log.name + ".old")
    m.log.rename(rotated)
    m.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: m.log.exists() and "log file reopened" in m.log.read_text(), 10, "the log to be reopened"
    )
    assert os.path.ismount(m.path) and m.alive
    m.process.send_signal(signal.SIGUSR1)
    wait_for(lambda: "logging at debug now" in m.log.read_text(), 10, "debug logging")
    baifs("run", str(m.path), "--", "true", env=m.env)
    assert "DEBUG baifs.api.batch" in m.log.read_text()
    m.process.send_signal(signal.SIGUSR1)
    wait_for(lambda: "logging at info now" in m.log.read_text(), 10, "info logging again")


def test_umount_with_nothing_pending_is_quick_and_a_dead_mount_is_forced(mount: Mount) -> None:
    m = mount.start()
    (m.path / "a.txt").write_text("a\n")
    m.sync()
    started = time.monotonic()
    baifs("umount", str(m.path), env=m.env)
    assert time.monotonic() - started < 2.5  # a fresh interpreter, fusermount3 and the daemon's exit
    assert m.process is not None and m.process.wait(10) == 0
    m.process = None
    m.start("--write-back", "600")
    (m.path / "pending.txt").write_text("kept\n")
    assert m.process is not None
    m.process.kill()
    m.process.wait(10)
    m.process = None
    dead = baifs("umount", str(m.path), env=m.env, check=False)
    assert dead.returncode == 1 and "--force" in dead.stderr and "Traceback" not in dead.stderr
    forced = baifs("umount", "--force", str(m.path), env=m.env)
    assert "next mount" in forced.stderr and not os.path.ismount(m.path)
    m.start()
    m.sync()
    assert (m.work / "pending.txt").read_text() == "kept\n"


def test_ctrl_c_during_umount_answers_at_once_and_the_uploads_go_on(
    server_factory: Callable[..., LocalServer], tmp_path: Path
) -> None:
    slow = server_factory(latency_ms=400)
    m = mount_for(slow, tmp_path)
    try:
        m.start("--write-back", "600")
        for index in range(2000):
            (m.path / f"f{index:04d}").write_text(f"{index}\n")
        umount = subprocess.Popen(
            [sys.executable, "-m", "baifs", "umount", str(m.path)],
            env=m.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        said: list[str] = []

        def read_stderr() -> None:
            for line in umount.stderr:  # type: ignore[union-attr]
                said.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        # Ctrl-C once umount waits for the flush (its first progress line is out), not while it starts.
        wait_for(
            lambda: any("/2000 files, " in line for line in said), 30, "umount to show the flush's progress"
        )
        umount.send_signal(signal.SIGINT)
        started = time.monotonic()
        umount.wait(15)
        reader.join(15)
        err = "".join(said)
        assert time.monotonic() - started < 2 and umount.returncode == 130, err
        assert "interrupted" in err and "still mounted" in err and "Traceback" not in err
        assert "/2000 files, " in err and "/s" in err, err  # not a terminal: plain progress lines
        assert os.path.ismount(m.path)
        wait_for(lambda: not m.status()["pending"]["uploads"], 120, "the uploads to go on")
        assert (m.work / "f1999").read_text() == "1999\n"
    finally:
        m.stop()


def _state_directory(m: Mount) -> Path:
    (directory,) = [path.parent for path in (m.home / "state").rglob("mounts/*/session.json")]
    return directory


@pytest.mark.parametrize("spelling", ["http://localhost:{port}", "http://127.0.0.1:{port}/"])
def test_pending_changes_are_found_by_the_session_however_the_endpoint_is_spelt(
    mount: Mount, spelling: str
) -> None:
    m = mount.start("--write-back", "600")
    (m.path / "pending.txt").write_text("written before the crash\n")
    m.kill()
    port = m.server.endpoint.rsplit(":", 1)[1].strip("/")
    m.env["BACKEND_ENDPOINT"] = spelling.format(port=port)
    m.start()
    assert m.status()["recovered_changes"] == 1, m.log_text()[-2000:]
    m.sync()
    assert (m.work / "pending.txt").read_text() == "written before the crash\n"


def test_the_state_an_older_baifs_keyed_by_endpoint_is_taken_over(mount: Mount) -> None:
    m = mount.start("--write-back", "600")
    (m.path / "pending.txt").write_text("written by the older version\n")
    m.kill()
    state = _state_directory(m)
    identity = json.loads((state / "session.json").read_text())
    older = hashlib.sha256(f"{identity['endpoint']}\0{identity['session_id']}".encode()).hexdigest()[:16]
    state.rename(state.parent / older)  # where baifs before this change kept it
    m.start()
    assert m.status()["recovered_changes"] == 1
    m.sync()
    assert (m.work / "pending.txt").read_text() == "written by the older version\n"
    assert [path.name for path in state.parent.iterdir()] == [state.name]


def test_a_journal_older_than_the_sessions_file_keeps_both(mount: Mount) -> None:
    (mount.work / "notes.txt").write_text("first\n")
    m = mount.start("--write-back", "600")
    (m.path / "notes.txt").write_text("edited here\n")
    m.kill()
    (m.work / "notes.txt").write_text("edited in the session after the crash\n")
    m.start()
    assert (m.path / "notes.txt").read_text() == "edited in the session after the crash\n"
    (copy,) = m.status()["conflict_copies"]
    assert copy.startswith("notes.baifs-conflict-") and copy.endswith(".txt"), copy
    m.sync()
    assert (m.work / "notes.txt").read_text() == "edited in the session after the crash\n"
    assert (m.work / copy).read_text() == "edited here\n"
    assert "conflict" in baifs("status", str(m.path), env=m.env).stdout
