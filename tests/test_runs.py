"""Batch runs from the mount: the ``.run`` control file, ``.runs/`` and ``baifs run``."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mounting import Mount, baifs_run, needs_fuse, run_status, wait_done, wait_for
from support import signed_request

from baifs.fs import scratch

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(120)]


def test_a_run_sees_what_was_written_before_it_and_its_files_show_at_once(mount: Mount) -> None:
    m = mount.start("--write-back", "600", "--dir-cache-time", "60", "--attr-timeout", "60")
    (m.path / "input.txt").write_text("written just before\n")
    (m.path / "old.txt").write_text("old content\n")
    assert sorted(os.listdir(m.path)) == ["input.txt", "old.txt"]
    assert (m.path / "old.txt").read_text() == "old content\n"
    with pytest.raises(FileNotFoundError):
        (m.path / "made.txt").stat()
    result = baifs_run(m, "cat input.txt; echo made by the run > made.txt; echo newer and longer > old.txt")
    assert result.returncode == 0, result
    assert result.stdout == b"written just before\n"
    assert "made.txt" in os.listdir(m.path)
    assert (m.path / "made.txt").read_text() == "made by the run\n"
    assert (m.path / "old.txt").read_text() == "newer and longer\n"


@pytest.mark.parametrize(
    ("command", "build", "code"), [("true", "", 0), ("exit 3", "", 3), ("echo never", "false", 127)]
)
def test_exit_codes_come_through_every_way(mount: Mount, command: str, build: str, code: int) -> None:
    m = mount.start()
    result = baifs_run(m, command, build=build)
    assert result.returncode == code, result
    final = run_status(m, "latest")
    assert final["state"] == "finished" and final["exit_code"] == code
    assert (m.path / ".runs/latest/exit_code").read_text() == f"{code}\n"
    assert json.loads((m.path / ".run").read_text())["latest"]["exit_code"] == code
    assert b"never" not in result.stdout


def test_stderr_is_kept_apart_from_stdout(mount: Mount) -> None:
    m = mount.start()
    result = baifs_run(m, "echo out1; echo err1 >&2; sleep 0.2; echo out2; echo err2 >&2")
    assert result.stdout == b"out1\nout2\n"
    assert result.stderr == b"err1\nerr2\n"
    run = m.path / ".runs/latest"
    assert (run / "stdout").read_bytes() == b"out1\nout2\n"
    assert (run / "stderr").read_bytes() == b"err1\nerr2\n"
    assert sorted((run / "output").read_bytes().splitlines()) == [b"err1", b"err2", b"out1", b"out2"]
    assert (run / "command").read_text().startswith("clean = ")


def test_output_is_readable_while_the_run_goes(mount: Mount) -> None:
    m = mount.start()
    (m.path / ".run").write_text("for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.5; done\n")
    seen_running = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = run_status(m, 1)
        output = (m.path / ".runs/1/output").read_text()
        if current["state"] == "running" and "line 2" in output:
            seen_running.append(output)
        if current["state"] == "finished":
            break
        time.sleep(0.2)
    assert seen_running, "no output was visible before the run ended"
    assert (m.path / ".runs/1/output").read_text() == "".join(f"line {i}\n" for i in range(1, 11))


def test_tail_f_follows_a_run(mount: Mount) -> None:
    m = mount.start()
    # GNU tail polls a FUSE file once a second: the run lasts long enough to be caught going.
    (m.path / ".run").write_text("for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; sleep 0.5; done\n")
    tail = subprocess.Popen(
        ["tail", "-f", "-n", "+1", str(m.path / ".runs/1/output")], stdout=subprocess.PIPE
    )
    try:
        first = tail.stdout.readline()  # type: ignore[union-attr]
        assert first == b"tick 1\n"
        assert run_status(m, 1)["state"] == "running"
    finally:
        tail.kill()
        tail.wait()


def test_runs_written_back_to_back_both_run_in_order(mount: Mount) -> None:
    m = mount.start()
    for index in (1, 2, 3):
        (m.path / ".run").write_text(f"echo run {index} >> order.txt; sleep 0.3\n")
    finals = [wait_done(m, number) for number in (1, 2, 3)]
    assert [f["exit_code"] for f in finals] == [0, 0, 0]
    assert (
        finals[0]["ended_at"] <= finals[1]["started_at"] <= finals[1]["ended_at"] <= finals[2]["started_at"]
    )
    assert (m.path / "order.txt").read_text() == "run 1\nrun 2\nrun 3\n"
    assert sorted(os.listdir(m.path / ".runs")) == ["1", "2", "3", "latest"]


def test_structured_requests_set_all_three_steps(mount: Mount) -> None:
    m = mount.start()
    (m.path / "Makefile").write_text("app:\n\tprintf '#!/bin/sh\\necho built app\\n' > app && chmod +x app\n")
    (m.path / ".run").write_bytes(b'clean = "rm -f app"\nbuild = "make"\nexec = "./app"\n')
    final = wait_done(m, 1)
    assert final["exit_code"] == 0 and final["steps"] == {
        "clean": "rm -f app",
        "build": "make",
        "exec": "./app",
        "cwd": "",
    }
    assert (m.path / ".runs/1/stdout").read_text().endswith("built app\n")


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [(b"   \n", "empty"), (b'exec = "x"\nflags = 1\n', "unknown key"), (b"exec = 3\n", "must be strings")],
)
def test_invalid_requests_fail_at_write_or_close_with_the_reason_readable(
    mount: Mount, request_bytes: bytes, reason: str
) -> None:
    m = mount.start()
    descriptor = os.open(m.path / ".run", os.O_WRONLY | os.O_TRUNC)
    with pytest.raises(OSError) as raised:
        try:
            os.write(descriptor, request_bytes)  # what can never become valid fails here
        finally:
            os.close(descriptor)  # the rest here
    assert raised.value.errno == errno.EINVAL
    assert reason in json.loads((m.path / ".run").read_text())["last_rejected"]
    assert os.listdir(m.path / ".runs") == []
    result = subprocess.run(
        [sys.executable, "-m", "baifs", "run", str(m.path), "--", "   "], env=m.env, capture_output=True
    )
    assert result.returncode == 255 and b"refused the run" in result.stderr


def test_ctrl_c_interrupts_the_command_in_the_session(mount: Mount) -> None:
    m = mount.start()
    argv = [sys.executable, "-m", "baifs", "run", str(m.path), "--", "sleep 60; echo not interrupted"]
    runner = subprocess.Popen(argv, env=m.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (m.path / ".runs/1").exists() or run_status(m, 1)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def going() -> bool:
        """The run is the mount's current one (an interrupt goes to it) and its supervisor's loop beats."""
        run_id, slot = run_status(m, 1)["run_id"], m.status()["slot"]
        if not run_id or slot["run"] != run_id:
            return False
        return (m.work / os.fsdecode(scratch.heartbeat(scratch.box_of(run_id)))).exists()

    wait_for(going, 20, "the session to run the command")
    interrupted_at = time.monotonic()
    runner.send_signal(signal.SIGINT)
    assert runner.wait(15) == 130
    assert time.monotonic() - interrupted_at < 5
    final = wait_done(m, 1)
    assert final["state"] == "finished" and final["exit_code"] == 130, final  # as the CLI returns
    assert b"not interrupted" not in runner.stdout.read()  # type: ignore[union-attr]


def test_runs_survive_a_remount(mount: Mount) -> None:
    m = mount.start()
    assert baifs_run(m, "echo kept").returncode == 0
    m.unmount()
    m.start("--keep-runs", "2")
    assert (m.path / ".runs/1/stdout").read_text() == "kept\n"
    for _ in range(2):
        assert baifs_run(m, "true").returncode == 0
    assert sorted(os.listdir(m.path / ".runs")) == ["2", "3", "latest"]


def test_a_session_that_dies_during_a_run_fails_it_with_the_cause(mount: Mount) -> None:
    m = mount.start()
    (m.path / ".run").write_text("sleep 30\n")
    deadline = time.monotonic() + 10
    while run_status(m, 1)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    signed_request(m.server, "DELETE", f"/session/{m.session_id}").raise_for_status()
    final = wait_done(m, 1, timeout=40)
    assert final["state"] == "failed"
    assert "session" in final["error"].lower()


def test_reserved_names_are_refused(mount: Mount) -> None:
    m = mount.start()
    for call in (
        lambda: (m.path / ".runs/mine").mkdir(),
        lambda: (m.path / ".baifs-status").write_text("x"),
        lambda: os.unlink(m.path / ".run"),
        lambda: os.rename(m.path / ".runs", m.path / "elsewhere"),
    ):
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno in (errno.EPERM, errno.EACCES)
