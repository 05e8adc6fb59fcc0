"""A new user's first hour: runs start where the user is, tree tools skip the control files, errors are clear.

Each test goes through the real commands (`baifs run`, the shell writing
``.run``, rsync, tar, find, `baifs serve`, option parsing), as someone
following the README would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mounting import Mount, baifs, needs_fuse, wait_done, wait_for
from support import LocalServer, start_server

from baifs import controlfiles


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_run_starts_in_the_session_directory_that_matches_the_callers(mount: Mount) -> None:
    m = mount.start()
    (m.path / "proj" / "sub").mkdir(parents=True)
    ran = baifs("run", "--", "pwd", env=m.env, check=False)  # outside the mount: needs the argument
    assert ran.returncode == 255 and "is not inside a baifs mount" in ran.stderr
    inside = subprocess.run(
        [sys.executable, "-m", "baifs", "run", "--", "pwd; echo made > here.txt"],
        cwd=m.path / "proj",
        env=m.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (inside.returncode, inside.stdout) == (0, "/home/work/proj\n"), inside
    assert (m.work / "proj" / "here.txt").read_text() == "made\n"
    written = shell("echo pwd > ../../.run", m.path / "proj" / "sub")  # a shell in proj/sub writes .run
    assert written.returncode == 0, written
    status = wait_done(m, 2)
    assert (m.path / controlfiles.RUNS / "2" / "stdout").read_text() == "/home/work/proj/sub\n" and status[
        "exit_code"
    ] == 0
    explicit = shell("""printf 'exec = "pwd"\\ncwd = "proj"\\n' > .run""", m.path)
    assert explicit.returncode == 0, explicit
    wait_done(m, 3)
    assert (m.path / controlfiles.RUNS / "3" / "stdout").read_text() == "/home/work/proj\n"


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_request_that_can_never_be_valid_fails_the_shells_write(mount: Mount) -> None:
    m = mount.start()
    refused = shell("echo 'exec = 5' > .run", m.path)  # dash says "I/O error" for any write error
    assert refused.returncode != 0 and "error" in refused.stderr, refused
    in_bash = subprocess.run(
        ["bash", "-c", "echo 'exec = 5' > .run"], cwd=m.path, capture_output=True, text=True
    )
    assert in_bash.returncode != 0 and "write error: Invalid argument" in in_bash.stderr, in_bash
    assert "must be strings" in json.loads((m.path / controlfiles.RUN).read_text())["last_rejected"]
    unknown = shell("echo 'exe = \"x\"' > .run", m.path)
    assert (
        unknown.returncode != 0
        and "unknown key" in json.loads((m.path / controlfiles.RUN).read_text())["last_rejected"]
    )
    accepted = shell("echo 'echo fine' > .run", m.path)
    assert accepted.returncode == 0
    assert not (m.path / controlfiles.RUNS / "2").exists(), "a refused request became a run"


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_tree_tools_do_not_pick_up_the_control_files(mount: Mount, tmp_path: Path) -> None:
    (mount.work / "src").mkdir()
    (mount.work / "src" / "a.txt").write_text("a\n")
    m = mount.start("--write-back", "600")
    assert baifs("run", str(m.path), "--", "echo", "a run", env=m.env).returncode == 0
    assert sorted(os.listdir(m.path)) == ["src"], "the control files are reached by name only"
    assert json.loads((m.path / controlfiles.STATUS).read_text())["session"]
    assert (m.path / controlfiles.RUNS / "1" / "stdout").read_text() == "a run\n"
    backup = tmp_path / "backup"
    for attempt in range(2):
        copied = subprocess.run(
            ["rsync", "-a", f"{m.path}/", f"{backup}/"], capture_output=True, text=True, timeout=60
        )
        assert copied.returncode == 0, (attempt, copied.stderr)
    assert sorted(os.listdir(backup)) == ["src"]
    archived = subprocess.run(
        ["tar", "cf", str(tmp_path / "all.tar"), "-C", str(m.path), "."], capture_output=True, text=True
    )
    assert archived.returncode == 0, archived.stderr
    found = subprocess.run(["find", str(m.path)], capture_output=True, text=True, check=True).stdout
    assert ".run" not in found and ".baifs-status" not in found
    subprocess.run(["git", "init", "-q"], cwd=m.path, check=True)
    untracked = subprocess.run(
        ["git", "status", "--porcelain"], cwd=m.path, capture_output=True, text=True, check=True
    ).stdout
    assert untracked.split() == ["??", "src/"], untracked
    assert not (m.path / controlfiles.RUNS / "2").exists(), "a tree tool started a run"
    for index in range(30):
        (m.path / f"pending-{index:02d}.txt").write_text("x")
    status = baifs("status", str(m.path), env=m.env).stdout
    assert "… and " in status and " more" in status, status


def test_options_are_validated_with_their_names(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    for args, message in (
        (["mount", "--umask", "999", "s", "m"], "argument --umask: expected an octal mask"),
        (["mount", "--write-back", "-1", "s", "m"], "argument --write-back: expected a number of seconds"),
        (["mount", "--dir-cache-time", "0", "s", "m"], "argument --dir-cache-time: expected a number"),
        (["mount", "--keep-runs", "0", "s", "m"], "argument --keep-runs: expected a whole number"),
        (["serve", "--port", "70000"], "argument --port: expected a port number"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "baifs", *args], capture_output=True, text=True, env=env, timeout=30
        )
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    usage = subprocess.run([sys.executable, "-m", "baifs", "mount", "--help"], capture_output=True, text=True)
    assert "[SESSION] MOUNTPOINT ..." not in usage.stdout and "SESSION MOUNTPOINT" in usage.stdout


def test_baifs_serve_on_a_busy_port_or_a_used_data_directory_says_so_in_one_line(
    tmp_path: Path, server: LocalServer
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "baifs", "serve", "--port", str(port), "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in busy.stderr, busy.stderr
    second = subprocess.run(
        [sys.executable, "-m", "baifs", "serve", "--port", "0", "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and "already in use" in second.stderr, second.stderr
    assert (server.data_dir / "serve.json").exists(), "the second server removed the first one's serve.json"
    assert server.counters(), "the first server still answers"


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_df_shows_the_sessions_disk(mount: Mount) -> None:
    m = mount.start()
    ours, theirs = os.statvfs(m.path), os.statvfs(m.work)
    total, expected = ours.f_blocks * ours.f_frsize, theirs.f_blocks * theirs.f_frsize
    assert abs(total - expected) <= expected * 0.01, (total, expected)
    assert ours.f_bavail * ours.f_frsize <= total
    shown = subprocess.run(["df", "-P", str(m.path)], capture_output=True, text=True, check=True).stdout
    assert "baifs" in shown and str(64 * 2**40 // 1024) not in shown


def test_baifs_serve_stop_ends_the_server_of_a_data_directory(tmp_path: Path) -> None:
    server = start_server(tmp_path / "srv")
    try:
        stopped = baifs("serve", "--stop", "--data-dir", str(server.data_dir), env=dict(os.environ))
        assert "stopped pid" in stopped.stderr
        assert server.process.wait(30) == 0
        again = baifs("serve", "--stop", "--data-dir", str(server.data_dir), env=dict(os.environ))
        assert "none runs" in again.stderr
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_verifies_and_baifs_is_on_path(tmp_path: Path) -> None:
    assert shutil.which("baifs"), "scripts/setup.sh links baifs onto PATH"
    unit = Path(__file__).resolve().parent.parent / "systemd" / "baifs@.service"
    shutil.copy(unit, tmp_path / unit.name)
    verified = subprocess.run(
        ["systemd-analyze", "verify", f"./{unit.name}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not Path("/usr/sbin/mount.fuse.baifs").exists(), reason="scripts/setup.sh links the helper"
)
def test_mount_t_fuse_baifs_and_an_fstab_style_option_list(mount: Mount) -> None:
    mount.path.mkdir()
    options = "rw,noauto,user,_netdev,x-systemd.automount,write_back=600,dir_cache_time=30"
    mounted_it = subprocess.run(
        ["mount", "-t", "fuse.baifs", mount.session_id, str(mount.path), "-o", options],
        env=mount.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert mounted_it.returncode == 0, mounted_it.stderr
        assert os.path.ismount(mount.path)
        (mount.path / "via-fstab.txt").write_text("mounted by mount(8)\n")
        assert "pending" in baifs("status", str(mount.path), env=mount.env).stdout  # write_back=600 held
    finally:
        subprocess.run(["umount", str(mount.path)], capture_output=True, timeout=60)
    wait_for(lambda: (mount.work / "via-fstab.txt").exists(), 30, "the final flush after umount")
    bad = subprocess.run(
        ["mount", "-t", "fuse.baifs", mount.session_id, str(mount.path), "-o", "writeback=1"],
        env=mount.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "--writeback" in bad.stderr and not os.path.ismount(mount.path)


def test_completions_and_the_man_page_come_from_the_arguments() -> None:
    def baifs_out(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "baifs", *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    bash = baifs_out("completion", "bash")
    loaded = subprocess.run(
        ["bash", "-c", "source /dev/stdin; complete -p baifs"], input=bash, capture_output=True, text=True
    )
    assert loaded.returncode == 0 and "baifs" in loaded.stdout, loaded.stderr
    assert "--dir-cache-time" in bash and "umount" in bash
    assert baifs_out("completion", "zsh").startswith("#compdef baifs")
    page = baifs_out("manpage")
    assert page.startswith(".TH BAIFS") and "'baifs mount'" in page and "write\\-back" in page
