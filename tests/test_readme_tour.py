"""The README's tour, as a user types it: a shell script of its commands, with set-up already done.

`baifs mount --local`, a git clone into the mount, `baifs run` from the
clone's directory (it runs there), a run through ``.run``, `baifs status`,
`baifs umount`, `baifs serve --stop --local`. Every command must succeed as
written, with `baifs` found on PATH (the installed one: the test fails, not
skips, without it). The edit/run loop is repeated from a directory the clone
made through the mount: run, `git status`, run again, in the same shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mounting import force_unmount, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]

TOUR = r"""
set -eu
baifs mount --local "$HOME/work"
cd "$HOME/work"
git clone -q "$SOURCE" myproject && cd myproject
baifs run -- make test
echo "ran: $?"
git status --short
baifs run -- true
git status --short
echo 'pwd > where.txt' > "$HOME/work/.run"
for _ in $(seq 100); do
    grep -q '"state": "finished"' "$HOME/work/.runs/latest/status" && break
    sleep 0.1
done
cat "$HOME/work/.runs/latest/status" | grep '"exit_code": 0'
git status --short
baifs status "$HOME/work" | grep -q 'pending'
cd /
baifs umount "$HOME/work"
baifs serve --stop --local
"""


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    # The installed baifs: the one next to this interpreter (setup.sh puts it in .venv/bin).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    assert shutil.which("baifs", path=path), "baifs is not installed next to the test's Python"
    assert shutil.which("git", path=path), "git is not installed (scripts/setup.sh installs it)"
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    source = tmp_path / "myproject"
    source.mkdir()
    (source / "main.c").write_text('#include <stdio.h>\nint main(void) { puts("all tests passed"); }\n')
    (source / "Makefile").write_text("test: app\n\t./app\napp: main.c\n\tcc -O2 -o app main.c\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "start"]):
        subprocess.run([*git, *args], cwd=source, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "XDG_"))}
    env.update(HOME=str(home), SOURCE=str(source), PATH=path)
    try:
        tour = subprocess.run(["sh", "-c", TOUR], env=env, capture_output=True, text=True, timeout=150)
        assert tour.returncode == 0, f"{tour.stdout}\n{tour.stderr}"
        assert "all tests passed" in tour.stdout and "ran: 0" in tour.stdout, tour.stdout
        work = next((home / ".local/share/baifs/local/sessions").glob("*/work"))
        assert (work / "myproject" / "where.txt").read_text() == "/home/work/myproject\n"
        assert (work / "myproject" / "app").exists(), "make ran in the clone's directory"
        assert "stopped pid" in tour.stderr
    finally:
        force_unmount(home / "work")
        subprocess.run(["baifs", "serve", "--stop", "--local"], env=env, capture_output=True, timeout=60)
