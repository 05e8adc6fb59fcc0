"""A long run the mount started holds the execution slot; the mount keeps working beside it.

Namespace changes, large writes and ranged reads need a script in the
session. While the mount's own run goes they go to its supervisor's inbox:
each finishes in seconds and is in the session before the run ends, and the
run's output and exit code are what they would have been.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mount, baifs, needs_fuse, wait_for

from baifs.fs import scratch

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]
RUN_SECONDS = 30
QUICK = 5.0


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def serving_its_inbox(m: Mount) -> bool:
    """Whether run 1 holds the slot, its inbox open, and its supervisor's loop beats in the session."""
    run_id = json.loads((m.path / ".runs" / "1" / "status").read_text())["run_id"]
    slot = m.status()["slot"]
    if not run_id or slot["run"] != run_id or not slot["inbox"]:
        return False
    return (m.work / os.fsdecode(scratch.heartbeat(scratch.box_of(run_id)))).exists()


def start_long_run(
    m: Mount,
    command: str,
    going: Callable[[Mount], bool] = serving_its_inbox,
    what: str = "the supervisor to serve its inbox",
) -> subprocess.Popen[bytes]:
    """``baifs run`` of ``command``, once the run goes and ``going`` says it is well under way."""
    argv = [sys.executable, "-m", "baifs", "run", str(m.path), "--", command]
    runner = subprocess.Popen(argv, env=m.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(
        lambda: (
            (m.path / ".runs" / "1" / "status").exists()
            and json.loads((m.path / ".runs" / "1" / "status").read_text())["state"] == "running"
        ),
        20,
        "the run to start",
    )
    wait_for(lambda: going(m), 20, what)
    return runner


def test_namespace_changes_big_writes_and_ranged_reads_do_not_wait_for_the_mounts_run(
    mount: Mount,
) -> None:
    (mount.work / "old" / "deep").mkdir(parents=True)
    (mount.work / "old" / "deep" / "f.txt").write_text("to remove\n")
    (mount.work / "rename-me.txt").write_text("moving\n")
    big_remote = os.urandom(20 * 1024 * 1024)
    (mount.work / "big-remote.bin").write_bytes(big_remote)
    m = mount.start()
    big_local = os.urandom(5 * 1024 * 1024)
    runner = start_long_run(m, f"echo start; sleep {RUN_SECONDS}; echo end; exit 3")
    run_started = time.monotonic()
    status = baifs("status", str(m.path), env=m.env).stdout
    assert "held by run 1 of this mount" in status and "supervisor runs the mount's scripts" in status, status
    spent = {
        "rm -r": timed(lambda: subprocess.run(["rm", "-r", str(m.path / "old")], check=True)),
        "mv": timed(lambda: os.rename(m.path / "rename-me.txt", m.path / "renamed.txt")),
        "mkdir": timed(lambda: (m.path / "made" / "inner").mkdir(parents=True)),
        "5 MB write": timed(lambda: (m.path / "big-local.bin").write_bytes(big_local)),
        "read 20 MB": timed(lambda: (m.path / "big-remote.bin").read_bytes() == big_remote or 1 / 0),
    }
    spent["sync"] = timed(lambda: fsync_path(m.path))
    assert all(seconds < QUICK for seconds in spent.values()), spent
    assert runner.poll() is None and time.monotonic() - run_started < RUN_SECONDS - 5, "the run ended"
    # In the session before the run ends:
    assert not (m.work / "old").exists()
    assert (m.work / "renamed.txt").read_text() == "moving\n" and not (m.work / "rename-me.txt").exists()
    assert (m.work / "made" / "inner").is_dir()
    assert (m.work / "big-local.bin").read_bytes() == big_local
    out, err = runner.communicate(timeout=RUN_SECONDS + 30)
    assert (runner.returncode, out, err) == (3, b"start\nend\n", b""), (runner.returncode, out, err)
    record = m.path / ".runs" / "1"
    assert (record / "output").read_bytes() == b"start\nend\n"
    assert (record / "exit_code").read_text().strip() == "3"
    m.sync()
    assert not (m.work / ".baifs-tmp").exists(), os.listdir(m.work / ".baifs-tmp")


def test_a_run_that_kills_its_supervisor_costs_a_wait_not_a_change(mount: Mount) -> None:
    m = mount.start()
    kill_siblings = (
        'sup=$PPID; for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = "$$" ] && continue; '
        '[ "$(sed -n \'s/^PPid:[[:space:]]*//p\' "$d/status" 2>/dev/null)" = "$sup" ] && kill -9 "$p"; '
        "done; echo killed; sleep 20; echo end"
    )
    # Well into the run: its command has killed the supervisor's loop, so the inbox never answers.
    output = m.path / ".runs" / "1" / "output"
    runner = start_long_run(m, kill_siblings, lambda _: "killed\n" in output.read_text(), "the kill")
    (m.path / "made-while-orphaned").mkdir()
    waited = timed(lambda: fsync_path(m.path))
    out, _ = runner.communicate(timeout=60)
    assert out == b"killed\nend\n", out
    assert (m.work / "made-while-orphaned").is_dir()
    assert 10 <= waited < 40, waited
    assert "supervisor of the mount's run stopped answering" in m.log_text()
    m.sync()
    assert not (m.work / ".baifs-tmp").exists(), os.listdir(m.work / ".baifs-tmp")


def test_a_runs_record_stays_while_it_goes_after_a_flush_before_it(mount: Mount) -> None:
    """The barrier flush's run concludes in the background; that must not clear the user's run's record."""
    m = mount.start("--write-back", "600")
    (m.path / "newdir").mkdir()  # pending: the run's barrier flush runs a script first
    runner = subprocess.Popen(
        [sys.executable, "-m", "baifs", "run", str(m.path), "--", "sh -c 'sleep 6; echo done > long.txt'"],
        env=m.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    status = m.path / ".runs" / "1" / "status"
    wait_for(lambda: status.exists() and json.loads(status.read_text())["run_id"], 20, "the run to start")
    run_id = json.loads(status.read_text())["run_id"]
    marker = next((m.home / "state").rglob("mounts/*/"), None)
    assert marker is not None
    marker = marker / "current-run"
    # The run's id is in its status a moment before the executor records it as the current run
    # (the barrier flush's run may still be the one recorded then): wait for that first.
    wait_for(lambda: marker.exists() and marker.read_text().strip() == run_id, 20, "the run to be recorded")
    seen = 0
    while json.loads(status.read_text())["state"] == "running" and not (m.work / "long.txt").exists():
        assert marker.exists() and marker.read_text().strip() == run_id, "the running run's record vanished"
        seen += 1
        time.sleep(0.2)
    assert seen > 10
    assert runner.wait(30) == 0
    wait_for(lambda: not marker.exists(), 20, "the run's record to go once it is concluded")
    assert baifs("run", str(m.path), "--", "echo", "after", env=m.env, timeout=30).stdout == "after\n"


@pytest.mark.parametrize("ending", ["umount", "kill"])
def test_the_first_run_after_a_remount_reports_its_own_output_and_exit_code(
    mount: Mount, ending: str
) -> None:
    """A quiet run left going by a mount that ended is waited for, never probed into the next run."""
    m = mount.start()
    runner = start_long_run(m, "sleep 15; exit 7")
    if ending == "umount":
        done = baifs("umount", str(m.path), env=m.env, timeout=90, check=False)
        assert done.returncode == 0, done.stderr  # a follower's open of its output must not make it busy
        assert m.process is not None and m.process.wait(30) is not None
        m.process = None
    else:
        m.kill()
    runner.wait(30)
    m.start()
    second = subprocess.run(
        [sys.executable, "-m", "baifs", "run", str(m.path), "--", "echo second-run; exit 3"],
        env=m.env,
        capture_output=True,
        timeout=120,
    )
    assert (second.returncode, second.stdout) == (3, b"second-run\n"), (second, m.log_text()[-3000:])
    latest = json.loads((m.path / ".runs" / "latest" / "status").read_text())
    assert (latest["state"], latest["exit_code"]) == ("finished", 3), latest
