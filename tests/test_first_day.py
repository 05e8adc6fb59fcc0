"""A new user's first day: the edit/run loop keeps the shell's directory, nothing litters, errors guide.

Each test is a thing someone following the README, then trying what an
rclone or sshfs user tries next, runs into; each goes through the real
commands (a shell, `baifs run`, git, `baifs serve`, `baifs umount`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mounting import Mount, needs_fuse

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
    loop = shell(m, "mkdir proj && cd proj && git init -q && baifs run -- true && git status --short && baifs run -- true && pwd -P")
    assert loop.returncode == 0, loop.stderr
    assert loop.stdout.strip().endswith("/proj"), loop.stdout
    through_run = shell(
        m,
        "mkdir viarun && cd viarun && echo x > f && echo true > ../.run"
        " && until grep -q '\"state\": \"finished\"' ../.runs/latest/status; do sleep 0.1; done"
        " && cat f && baifs run -- true",
    )
    assert through_run.returncode == 0 and through_run.stdout == "x\n", through_run.stderr
    cloned = shell(m, "git clone -q proj copy 2>/dev/null && cd copy && baifs run -- true && git status --short && ls -a")
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
