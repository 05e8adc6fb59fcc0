"""Real programs on a real mount: editors, cp, rsync, tar and git; the session must end up right."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from mounting import Mount, needs_fuse, tree

from baifs import controlfiles

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(240)]

GIT = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]


def program(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"needs {name}")


def run(argv: list[str], cwd: Path | None = None, **kwargs: object) -> str:
    environment = {**os.environ, "HOME": str(cwd or Path.cwd()), "GIT_CONFIG_NOSYSTEM": "1"}
    finished = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=environment
    )
    assert finished.returncode == 0, f"{argv} failed:\n{finished.stdout}\n{finished.stderr}"
    return finished.stdout


def make_source_tree(root: Path, files: int = 220) -> Path:
    """Nested directories, executables, private files, empty files and symlinks."""
    for index in range(files):
        directory = root / f"pkg{index % 6}" / f"mod{index % 4}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"file{index:03d}.txt"
        path.write_bytes(os.urandom(index * 37 % 5000) + f"line {index}\n".encode())
        if index % 17 == 0:
            path.chmod(0o755)
        if index % 23 == 0:
            path.chmod(0o600)
    (root / "empty").write_bytes(b"")
    (root / "secret").mkdir()
    (root / "secret").chmod(0o700)
    (root / "secret" / "key").write_text("k")
    os.symlink("pkg0/mod0/file000.txt", root / "link-to-file")
    os.symlink("pkg1", root / "link-to-dir")
    return root


def executables(root: Path) -> set[str]:
    """Executable files outside .git."""
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and path.stat().st_mode & 0o111 and ".git" not in path.relative_to(root).parts
    }


def mtimes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.lstat().st_mtime_ns // 1000
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and path.name != controlfiles.STATUS
    }


def test_cp_r_cp_a_rsync_a_and_tar_x_land_byte_for_byte(mount: Mount, tmp_path: Path) -> None:
    source = make_source_tree(tmp_path / "source")
    archive = tmp_path / "source.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="untarred")
    m = mount.start()
    run(["cp", "-r", str(source), str(m.path / "cp-r")])
    run(["cp", "-a", str(source), str(m.path / "cp-a")])
    run(["rsync", "-a", f"{source}/", str(m.path / "rsync-a")])
    run(["tar", "xf", str(archive), "-C", str(m.path)])
    expected = tree(source, modes=True)
    for name in ("cp-r", "cp-a", "rsync-a", "untarred"):
        assert tree(m.path / name, modes=True) == expected, f"{name} in the mount"
    for name in ("cp-a", "rsync-a"):
        assert mtimes(m.path / name) == mtimes(source), f"{name} mtimes in the mount"
    set_times = {name: mtimes(m.path / name) for name in ("cp-a", "rsync-a", "untarred")}
    m.sync()
    for name in ("cp-r", "cp-a", "rsync-a", "untarred"):
        assert tree(m.work / name, modes=True) == expected, f"{name} on the session"
    for name, times in set_times.items():
        assert mtimes(m.work / name) == times, f"{name} mtimes on the session"
    run(["rsync", "-a", "--delete", f"{source}/", str(m.path / "rsync-a")])
    m.sync()
    assert not m.status()["pending"]["uploads"]


@program("vim")
@pytest.mark.parametrize("backupcopy", ["auto", "no", "yes"])
def test_vim_saves_with_its_defaults(mount: Mount, backupcopy: str) -> None:
    (mount.work / "notes.txt").write_text("first\nsecond\n")
    os.chmod(mount.work / "notes.txt", 0o640)
    m = mount.start()
    # Clear 'backupskip': its default skips backups of files under /tmp, where the test mounts.
    script = f"set backupskip= backupcopy={backupcopy}\nnormal Gothird\nwq\n"
    (m.path.parent / "edit.vim").write_text(script)
    run(["vim", "-es", "-N", "-i", "NONE", "-S", str(m.path.parent / "edit.vim"), "notes.txt"], cwd=m.path)
    assert (m.path / "notes.txt").read_text() == "first\nsecond\nthird\n"
    m.sync()
    assert (m.work / "notes.txt").read_text() == "first\nsecond\nthird\n"
    assert oct(os.stat(m.work / "notes.txt").st_mode & 0o777) == oct(0o640)
    assert sorted(os.listdir(m.work)) == ["notes.txt"], "swap or backup files left on the session"


def drive_terminal(argv: list[str], cwd: Path, keys: list[bytes], settle: float = 0.7) -> None:
    """Run a full-screen program on a pseudo-terminal and type ``keys``, pausing between them."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.environ.update(TERM="xterm", LINES="24", COLUMNS="80")
        os.execvp(argv[0], argv)
    try:
        for key in keys:
            _drain(fd, settle)
            os.write(fd, key)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _drain(fd, 0.1)
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                assert os.waitstatus_to_exitcode(status) == 0
                return
        raise AssertionError(f"{argv[0]} did not exit")
    finally:
        os.close(fd)


def _drain(fd: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                os.read(fd, 65536)
            except OSError:
                return


@program("nano")
def test_nano_saves(mount: Mount) -> None:
    (mount.work / "todo.txt").write_text("buy milk\n")
    m = mount.start()
    # Type a line at the top, ^O (write out), Enter (keep the name), ^X (exit).
    drive_terminal(
        ["nano", "--ignorercfiles", "todo.txt"], m.path, [b"first bread\r", b"\x0f", b"\r", b"\x18"]
    )
    assert (m.path / "todo.txt").read_text() == "first bread\nbuy milk\n"
    m.sync()
    assert (m.work / "todo.txt").read_text() == "first bread\nbuy milk\n"
    assert sorted(os.listdir(m.work)) == ["todo.txt"]


def test_save_through_a_temp_file_and_rename(mount: Mount) -> None:
    """The gedit/GIO and JetBrains 'safe write': write a temp file, fsync, rename over the target."""
    (mount.work / "doc.md").write_text("version 1\n")
    m = mount.start()
    for version in range(2, 5):
        temporary = m.path / f".goutputstream-{version}"
        with open(temporary, "w") as handle:
            handle.write(f"version {version}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, m.path / "doc.md")
    assert (m.path / "doc.md").read_text() == "version 4\n"
    m.sync()
    assert (m.work / "doc.md").read_text() == "version 4\n"
    assert sorted(os.listdir(m.work)) == ["doc.md"]


@program("git")
def test_git_init_add_commit_status_checkout(mount: Mount, tmp_path: Path) -> None:
    m = mount.start()
    repo = m.path / "repo"
    repo.mkdir()
    run([*GIT, "init", "-q"], cwd=repo)
    make_source_tree(repo / "src", files=60)
    run([*GIT, "add", "-A"], cwd=repo)
    run([*GIT, "commit", "-q", "-m", "first"], cwd=repo)
    assert run([*GIT, "status", "--porcelain"], cwd=repo) == ""
    run([*GIT, "checkout", "-q", "-b", "feature"], cwd=repo)
    (repo / "src" / "pkg0" / "mod0" / "file000.txt").write_text("changed on feature\n")
    (repo / "feature.txt").write_text("new\n")
    run([*GIT, "add", "-A"], cwd=repo)
    run([*GIT, "commit", "-q", "-m", "feature work"], cwd=repo)
    run([*GIT, "checkout", "-q", "main"], cwd=repo)
    assert not (repo / "feature.txt").exists()
    assert run([*GIT, "status", "--porcelain"], cwd=repo) == ""
    m.sync()
    remote = m.work / "repo"
    assert run([*GIT, "fsck", "--strict"], cwd=remote) == ""
    assert run([*GIT, "log", "--format=%s", "feature"], cwd=remote).split() == ["feature", "work", "first"]
    assert run([*GIT, "status", "--porcelain"], cwd=remote) == ""
    assert tree(remote / "src") == tree(repo / "src")


@program("git")
def test_git_clone_into_the_mount(mount: Mount, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    run([*GIT, "init", "-q"], cwd=origin)
    make_source_tree(origin, files=120)
    run([*GIT, "add", "-A"], cwd=origin)
    run([*GIT, "commit", "-q", "-m", "import"], cwd=origin)
    m = mount.start()
    run([*GIT, "clone", "-q", "--no-local", str(origin), "clone"], cwd=m.path)
    assert run([*GIT, "status", "--porcelain"], cwd=m.path / "clone") == ""
    m.sync()
    remote = m.work / "clone"
    assert run([*GIT, "fsck", "--strict"], cwd=remote) == ""
    assert run([*GIT, "status", "--porcelain"], cwd=remote) == ""
    expected = {k: v for k, v in tree(origin).items() if not k.startswith(".git")}
    actual = {k: v for k, v in tree(remote).items() if not k.startswith(".git")}
    assert actual == expected
    assert executables(remote) == executables(origin)  # git keeps only the executable bit


@program("git")
def test_git_commit_then_gc_prune_in_a_clone(mount: Mount, tmp_path: Path) -> None:
    """git gc writes a pack over 1 MiB, fsyncs, closes and renames it, then reads it at once."""
    origin = tmp_path / "origin"
    origin.mkdir()
    run([*GIT, "init", "-q"], cwd=origin)
    (origin / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    make_source_tree(origin, files=40)
    run([*GIT, "add", "-A"], cwd=origin)
    run([*GIT, "commit", "-q", "-m", "import"], cwd=origin)
    m = mount.start()
    run([*GIT, "clone", "-q", "--no-local", str(origin), "clone"], cwd=m.path)
    clone = m.path / "clone"
    (clone / "more.txt").write_text("more\n")
    run([*GIT, "add", "-A"], cwd=clone)
    run([*GIT, "commit", "-q", "-m", "more"], cwd=clone)
    run([*GIT, "gc", "-q", "--prune=now"], cwd=clone)
    assert run([*GIT, "fsck", "--strict"], cwd=clone) == ""
    m.sync()
    assert run([*GIT, "fsck", "--strict"], cwd=m.work / "clone") == ""
    assert run([*GIT, "log", "--format=%s"], cwd=m.work / "clone").split() == ["more", "import"]
