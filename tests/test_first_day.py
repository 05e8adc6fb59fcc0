"""A new user's first day: the edit/run loop keeps the shell's directory, nothing litters, errors guide.

Each test is a thing someone following the README, then trying what an
rclone or sshfs user tries next, runs into; each goes through the real
commands (a shell, `baifs run`, git, `baifs serve`, `baifs umount`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from mounting import Mount, baifs, mount_for, needs_fuse, run_status, wait_done, wait_for
from support import start_server

from baifs import controlfiles

#: A PATH on which ``baifs`` is the one next to this interpreter.
PATH = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def shell(m: Mount, script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """One shell running ``script`` (set -e), as a user's terminal would, with baifs on PATH."""
    return subprocess.run(
        ["sh", "-ec", script],
        cwd=cwd or m.path,
        env=dict(m.env, PATH=PATH),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(150)
def test_the_shells_directory_survives_runs_in_directories_made_through_the_mount(mount: Mount) -> None:
    m = mount.start()
    # A directory made here after a lookup said it did not exist: the run must not make the
    # kernel forget the shell's working directory (git: "Unable to read current working directory").
    loop = shell(
        m,
        "mkdir proj && cd proj && git init -q && baifs run -- true && git status --short"
        " && baifs run -- true && pwd -P",
    )
    assert loop.returncode == 0, loop.stderr
    assert loop.stdout.strip().endswith("/proj"), loop.stdout
    through_run = shell(
        m,
        "mkdir viarun && cd viarun && echo x > f && echo true > ../.run"
        ' && until grep -q \'"state": "finished"\' ../.runs/latest/status; do sleep 0.1; done'
        " && cat f && baifs run -- true",
    )
    assert through_run.returncode == 0 and through_run.stdout == "x\n", through_run.stderr
    cloned = shell(
        m, "git clone -q proj copy 2>/dev/null && cd copy && baifs run -- true && git status --short && ls -a"
    )
    assert cloned.returncode == 0 and ".git" in cloned.stdout.split(), cloned.stderr


def test_baifs_run_in_a_removed_directory_says_what_to_do(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    ran = subprocess.run(
        ["sh", "-c", f"cd {gone} && rmdir {gone} && baifs run -- true"],
        env=dict(os.environ, PATH=PATH),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode != 0 and "Traceback" not in ran.stderr, ran.stderr
    assert "current directory no longer exists" in ran.stderr and 'cd "$PWD"' in ran.stderr, ran.stderr


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(150)
def test_a_clean_unmount_leaves_exactly_the_users_files_and_scratch_never_shows(mount: Mount) -> None:
    m = mount.start(settle=False)
    seen: set[str] = set()
    while not m.status()["profile"]["source"]:  # discovery's probe is in the session meanwhile
        seen.update(os.listdir(m.path))
    seen.update(os.listdir(m.path))
    assert not [name for name in seen if name.startswith(".baifs")], seen
    big = os.urandom(3 * 1024 * 1024)
    (m.path / "big.bin").write_bytes(big)
    (m.path / "small.txt").write_text("hello\n")
    (m.path / "d").mkdir()
    (m.path / "d" / "gone.txt").write_text("x")
    m.sync()
    (m.path / "d" / "gone.txt").unlink()
    ran = shell(m, "baifs run -- 'head -c 2000000 /dev/zero > made.bin'")
    assert ran.returncode == 0, ran.stderr
    assert (m.path / "made.bin").read_bytes() == bytes(2000000)  # a ranged read: parts in scratch
    assert (m.path / "big.bin").read_bytes() == big
    assert shell(m, "echo 'sleep 4' > .run").returncode == 0
    wait_for(lambda: run_status(m, 2)["state"] == "running", what="the long run")
    (m.path / "e").mkdir()  # carried out by the run's supervisor: its results are scratch
    m.sync()
    assert (m.work / "e").is_dir() and run_status(m, 2)["state"] == "running"
    wait_done(m, 2)
    assert not [name for name in os.listdir(m.path) if name.startswith(".baifs")]
    assert (
        subprocess.run(
            [sys.executable, "-m", "baifs", "umount", str(m.path)], env=m.env, timeout=120
        ).returncode
        == 0
    )
    m.process.wait(60)
    m.process = None
    scratch = sorted(os.listdir(m.work / ".baifs-tmp")) if (m.work / ".baifs-tmp").exists() else []
    assert sorted(os.listdir(m.work)) == ["big.bin", "d", "e", "made.bin", "small.txt"], scratch
    assert os.listdir(m.work / "d") == []


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(150)
def test_stopping_a_server_a_mount_uses_is_refused_unless_forced(tmp_path: Path) -> None:
    own = start_server(tmp_path / "srv")
    m = mount_for(own, tmp_path)
    try:
        m.start()
        (m.path / "kept.txt").write_text("mine\n")
        refused = baifs("serve", "--stop", "--data-dir", str(own.data_dir), env=dict(os.environ), check=False)
        assert refused.returncode != 0 and own.process.poll() is None, refused.stderr
        assert str(m.path) in refused.stderr and "baifs umount" in refused.stderr, refused.stderr
        assert "--force" in refused.stderr
        m.sync()
        assert (m.work / "kept.txt").read_text() == "mine\n"
        forced = baifs("serve", "--stop", "--force", "--data-dir", str(own.data_dir), env=dict(os.environ))
        assert "stopped pid" in forced.stderr and own.process.wait(30) == 0
    finally:
        m.stop()
        own.stop()


def test_a_virtual_folder_runs_cannot_write_in_is_refused_and_a_missing_one_made_theirs(
    tmp_path: Path,
) -> None:
    if os.getuid() != 0:
        pytest.skip("a container user other than the server's needs root")
    theirs = tmp_path / "root-owned"
    theirs.mkdir(mode=0o755)
    refused = baifs(
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "d1"),
        "--container-uid",
        "9001",
        "--vfolder",
        f"data={theirs}",
        env=dict(os.environ),
        check=False,
        timeout=60,
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert "runs (uid 9001) cannot write in" in refused.stderr and "chown 9001:9001" in refused.stderr
    made = tmp_path / "new-folder"
    server = start_server(tmp_path / "srv", extra=("--container-uid", "9001", "--vfolder", f"data={made}"))
    try:
        assert made.stat().st_uid == 9001
        assert "virtual folder data:" in server.log_path.read_text()
    finally:
        server.stop()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_on_a_shared_mount_what_another_user_makes_is_theirs(mount: Mount) -> None:
    m = mount.start("--allow-other")
    (m.path / "shared").mkdir()
    os.chmod(m.path / "shared", 0o777)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    made = subprocess.run(
        [*nobody, "sh", "-ec", "echo hi > f; echo more >> f; chmod 600 f; mkdir d; echo x > d/g; cat f"],
        cwd=m.path / "shared",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0 and made.stdout == "hi\nmore\n", made.stderr
    assert (os.stat(m.path / "shared" / "f").st_uid, os.stat(m.path / "shared" / "d").st_gid) == (
        65534,
        65534,
    )
    assert os.stat(m.path / "shared" / "f").st_mode & 0o777 == 0o600
    other = subprocess.run(
        ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "cat", "f"],
        cwd=m.path / "shared",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode != 0 and "Permission denied" in other.stderr  # 0600 is the maker's own
    m.sync()
    assert (m.work / "shared" / "f").read_text() == "hi\nmore\n"


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_run_requests_written_one_after_another_on_one_descriptor_are_each_taken(mount: Mount) -> None:
    m = mount.start()
    descriptor = os.open(m.path / controlfiles.RUN, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(descriptor, b"echo A > a.txt")
        os.fsync(descriptor)  # submits the first request
        os.write(descriptor, b"echo B > b.txt")  # the next request, at the descriptor's offset
    finally:
        os.close(descriptor)  # submits the second
    assert (wait_done(m, 1)["exit_code"], wait_done(m, 2)["exit_code"]) == (0, 0)
    assert (m.work / "a.txt").read_text() == "A\n" and (m.work / "b.txt").read_text() == "B\n"


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_run_request_the_full_state_disk_cannot_record_fails_the_shells_write(
    mount: Mount, small_disk: Path
) -> None:
    mount.env["XDG_STATE_HOME"] = str(small_disk)
    m = mount.start()
    filler = small_disk / "filler"
    with open(filler, "wb") as fill:
        try:
            while True:
                fill.write(b"\0" * 65536)
                fill.flush()
        except OSError:
            pass
    written = subprocess.run(
        ["bash", "-c", "echo true > .run"], cwd=m.path, capture_output=True, text=True, timeout=60
    )
    assert written.returncode != 0 and "No space left on device" in written.stderr, written
    assert "could not be recorded" in (m.path / controlfiles.RUN).read_text()
    filler.unlink()
    again = subprocess.run(
        ["bash", "-c", "echo true > .run"], cwd=m.path, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert wait_done(m, 1)["exit_code"] == 0


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_df_du_and_findmnt_read_as_on_the_sessions_disk(mount: Mount) -> None:
    m = mount.start()
    for index in range(20):
        (m.path / f"small{index}.txt").write_text("x" * 100)
    m.sync()
    ours, theirs = os.statvfs(m.path), os.statvfs(m.work)
    # df's used is total - free: the session's, not total - available (root's reserve counted used).
    used = (ours.f_blocks - ours.f_bfree) * ours.f_frsize
    expected = (theirs.f_blocks - theirs.f_bfree) * theirs.f_frsize
    assert abs(used - expected) <= max(expected * 0.05, 64 * 2**20), (used, expected)
    assert ours.f_bfree >= ours.f_bavail

    def du(path: Path) -> int:
        shown = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
        return int(shown.stdout.split()[0])

    assert du(m.path / "small0.txt") == 4  # one whole 4 KiB block, as the session's disk holds it
    assert du(m.path) >= 20 * 4
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(m.path)], capture_output=True, text=True)
    assert source.stdout.strip() == f"baifs:{m.session_id}", source


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_times_in_the_control_files_are_iso_8601_with_a_zone(mount: Mount) -> None:
    m = mount.start()
    assert shell(m, "echo true > .run").returncode == 0
    finished = wait_done(m, 1)
    latest = json.loads((m.path / controlfiles.RUN).read_text())["latest"]
    status = m.status()
    for when in (
        finished["queued_at"],
        finished["started_at"],
        finished["ended_at"],
        latest["ended_at"],
        status["time"],
        status["profile"]["learnt_at"],
    ):
        parsed = datetime.fromisoformat(when)
        assert parsed.tzinfo is not None and abs(parsed.timestamp() - time.time()) < 600, when


def test_setup_installs_bash_completion_that_loads_and_completes_paths_and_a_man_page_whatis_knows(
    tmp_path: Path,
) -> None:
    loader = Path("/usr/share/bash-completion/bash_completion")
    assert loader.exists(), "scripts/setup.sh installs bash-completion"
    (tmp_path / "mnt-here").mkdir()
    (tmp_path / "mnt-file").write_text("")
    script = (
        f"source {loader}; _completion_loader baifs; "  # what bash does the first time baifs is completed
        'COMP_WORDS=(baifs umount mnt-); COMP_CWORD=2; COMP_LINE="baifs umount mnt-"; '
        "COMP_POINT=${#COMP_LINE}; "
        '_shtab_baifs baifs mnt- umount; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    completed = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert completed.stdout.split() == ["mnt-here"], completed  # a mount point is a directory
    known = subprocess.run(["whatis", "baifs"], capture_output=True, text=True, timeout=30)
    assert known.returncode == 0 and "mount a Backend.AI compute session" in known.stdout, known


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_umount_with_nothing_pending_returns_once_the_daemon_exited(mount: Mount) -> None:
    m = mount.start()
    (m.path / "f.txt").write_text("x")
    m.sync()
    started = time.monotonic()
    done = baifs("umount", str(m.path), env=m.env)
    took = time.monotonic() - started
    assert m.process is not None and m.process.poll() is not None  # exited (reaped only now, by us)
    m.process = None
    # The bar is under a second; the daemon's exit is all it waits for, not its reaping (which a
    # container's init may never do), so a zombie daemon costs nothing.
    assert took < 1.5 and "unmounted" in done.stderr, took


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_mounting_on_a_mount_left_dead_says_how_to_clear_it(mount: Mount) -> None:
    m = mount.start()
    assert m.process is not None
    m.process.send_signal(signal.SIGKILL)
    m.process.wait(30)
    m.process = None  # the FUSE mount stays, dead: what kill -9 leaves
    again = baifs("mount", m.session_id, str(m.path), env=m.env, check=False, timeout=60)
    assert again.returncode != 0 and "Errno" not in again.stderr and "Traceback" not in again.stderr, (
        again.stderr
    )
    assert f"baifs umount --force {m.path}" in again.stderr, again.stderr


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_baifs_run_says_what_a_user_habit_gets_wrong(mount: Mount, tmp_path: Path) -> None:
    m = mount.start()
    unquoted = shell(m, "baifs run echo hi || echo rc=$?")
    assert "rc=2" in unquoted.stdout and "baifs run [MOUNT] -- echo hi" in unquoted.stderr, unquoted.stderr
    assert "usage: baifs run" in unquoted.stderr
    piped = shell(m, "echo data | baifs run -- cat; echo rc=$?")
    assert "standard input is not passed to the run" in piped.stderr and "rc=0" in piped.stdout, piped
    built = shell(m, "baifs run --build 'exit 3' -- echo never || echo rc=$?")
    assert "rc=127" in built.stdout and "never" not in built.stdout, built
    assert "the build step failed (exit 3); the command was not run" in built.stderr, built.stderr
    options = baifs(
        "mount", "-o", "allow_other,bogus", m.session_id, str(tmp_path / "elsewhere"), env=m.env, check=False
    )
    assert options.returncode == 2 and "unknown option 'bogus'" in options.stderr, options.stderr


def test_mount_takes_mount_style_options_as_sshfs_does() -> None:
    from baifs.cli import _parse, build_parser

    args = _parse(build_parser(), ["mount", "-o", "allow_other,write_back=2,noauto", "s", "/m"])
    assert (args.allow_other, args.write_back, args.target) == (True, 2.0, ["s", "/m"])
    from baifs.server.compat import Compat

    assert set(Compat.explained()) == set(Compat.names())  # serve --help explains every switch


def test_setup_leaves_another_checkouts_working_baifs_on_path(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "link-baifs.sh"
    bin_dir, sbin_dir = tmp_path / "bin", tmp_path / "sbin"
    bin_dir.mkdir()
    sbin_dir.mkdir()

    def checkout(name: str) -> Path:
        root = tmp_path / name
        (root / "scripts").mkdir(parents=True)
        shutil.copy(script, root / "scripts" / script.name)
        venv = root / ".venv" / "bin"
        venv.mkdir(parents=True)
        for tool in ("baifs", "mount.fuse.baifs"):
            (venv / tool).write_text(f"#!/bin/sh\necho {name}\n")
            (venv / tool).chmod(0o755)
        return root

    def link(root: Path, **extra: str) -> str:
        env = dict(os.environ, BAIFS_BIN_DIR=str(bin_dir), BAIFS_SBIN_DIR=str(sbin_dir), **extra)
        subprocess.run(
            ["bash", str(root / "scripts" / script.name)], env=env, check=True, capture_output=True
        )
        return subprocess.run([str(bin_dir / "baifs")], capture_output=True, text=True).stdout.strip()

    mine, scratch = checkout("mine"), checkout("scratch")
    assert link(mine) == "mine"
    assert link(scratch) == "mine"  # a CI clone does not take over the checkout in use
    assert link(scratch, BAIFS_LINK="1") == "scratch"
    shutil.rmtree(scratch)  # the clone is gone: its link is dead and the next setup replaces it
    assert link(mine) == "mine" and os.readlink(sbin_dir / "mount.fuse.baifs").startswith(str(mine))
