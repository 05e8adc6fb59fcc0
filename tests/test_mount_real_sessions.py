"""The mount on sessions shaped like real ones: virtual folders and a container user other than the uploader.

The server is `baifs serve --container-uid 9001 --vfolder data=HOSTDIR
--vfolder .auto=HOSTDIR2`: uploads under ``data/`` vanish underneath the
mount point, and runs (uid 9001) cannot change what uploads (root) made.
Everything written through the mount must land where it belongs anyway,
owned by the container user.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CONTAINER_UID
from mounting import (
    Mount,
    baifs,
    baifs_run,
    create_session,
    delta,
    make_tree,
    mount_for,
    needs_fuse,
    wait_for,
)
from support import LocalServer, signed_request

from baifs.mountctl import UNANSWERED_SECONDS

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]


@pytest.fixture
def real(realistic: LocalServer, tmp_path: Path, folders: dict[str, Path]) -> Iterator[Mount]:
    """A fresh session of the realistic server, mounted (started), with a folder of its own."""
    mounted = mount_for(realistic, tmp_path)
    try:
        yield mounted.start()
    finally:
        mounted.stop()


def folder_dir(m: Mount, folders: dict[str, Path], name: str) -> tuple[Path, Path]:
    """A directory of this test in the folder: (through the mount, on the folder's host directory)."""
    (m.path / "data" / name).mkdir()
    return m.path / "data" / name, folders["data"] / name


def test_the_profile_is_discovered_once_with_one_upload_and_one_run(
    realistic: LocalServer, tmp_path: Path
) -> None:
    m = mount_for(realistic, tmp_path)
    before = realistic.counters()
    try:
        profile = m.start().status()["profile"]
        spent = delta(before, realistic.counters())
        m.stop()
        before = realistic.counters()
        again = m.start().status()["profile"]  # the next mount of the session knows it without a run
        assert delta(before, realistic.counters()).get("batch_runs", 0) == 0
    finally:
        m.stop()
    assert profile["folders"] == [".auto", "data"] and profile["folders_from"] == "BACKENDAI_PERSISTENT_PATHS"
    assert profile["uploads_owned"] is False and profile["container_uid"] == CONTAINER_UID
    assert profile["source"] == "discovered" and again["source"] == "last mount", (profile, again)
    assert spent.get("upload") == 1 and spent.get("batch_runs") == 1, spent
    assert not any(name.startswith(".baifs-probe") for name in os.listdir(m.work))


def test_a_tree_copied_into_a_folder_is_there_after_unmount_for_12_uploads_and_2_runs(
    real: Mount, folders: dict[str, Path], tmp_path: Path
) -> None:
    source = make_tree(tmp_path / "source")
    before = real.counters()
    subprocess.run(["cp", "-r", str(source), str(real.path / "data" / "tree")], check=True)
    real.sync()
    spent = delta(before, real.counters())
    big = os.urandom(3 * 1024 * 1024 + 17)
    (real.path / "data" / "tree" / "big.bin").write_bytes(big)
    assert real.unmount() == 0
    host = folders["data"] / "tree"
    for path in source.rglob("*.dat"):
        assert (host / path.relative_to(source)).read_bytes() == path.read_bytes(), path
    assert (host / "big.bin").read_bytes() == big
    assert {path.stat().st_uid for path in host.rglob("*")} == {CONTAINER_UID}
    assert not (real.work / "data" / "tree").exists(), "nothing lands underneath the mount point"
    assert spent.get("upload", 0) <= 12 and spent.get("batch_runs", 0) <= 2, spent


def test_namespace_changes_and_editors_saves_inside_a_folder(real: Mount, folders: dict[str, Path]) -> None:
    mounted, host = folder_dir(real, folders, "edits")
    (mounted / "keep.txt").write_text("first\n")
    (mounted / "gone.txt").write_text("to be removed\n")
    (mounted / "sub").mkdir()
    (mounted / "script.sh").write_text("#!/bin/sh\necho hi\n")
    real.sync()
    assert (host / "keep.txt").read_text() == "first\n"
    with open(mounted / "keep.txt", "a") as handle:  # append
        handle.write("second\n")
    temporary = mounted / ".keep.txt.swp"  # temp-plus-rename, as editors save
    temporary.write_text("replaced\n")
    os.rename(temporary, mounted / "gone.txt")
    os.rename(mounted / "keep.txt", mounted / "sub" / "moved.txt")
    (mounted / "script.sh").chmod(0o755)
    os.symlink("sub/moved.txt", mounted / "link")
    (mounted / "emptydir").mkdir()
    real.sync()
    assert sorted(os.listdir(host)) == ["emptydir", "gone.txt", "link", "script.sh", "sub"]
    assert (host / "gone.txt").read_text() == "replaced\n"
    assert (host / "sub" / "moved.txt").read_text() == "first\nsecond\n"
    assert os.readlink(host / "link") == "sub/moved.txt"
    assert (host / "script.sh").stat().st_mode & 0o777 == 0o755
    shutil.rmtree(mounted / "sub")
    os.unlink(mounted / "link")
    real.sync()
    assert sorted(os.listdir(host)) == ["emptydir", "gone.txt", "script.sh"]
    assert {path.stat().st_uid for path in host.rglob("*")} == {CONTAINER_UID}


@pytest.mark.skipif(shutil.which("vim") is None or shutil.which("git") is None, reason="needs vim and git")
def test_vim_and_git_inside_a_folder(real: Mount, folders: dict[str, Path]) -> None:
    mounted, host = folder_dir(real, folders, "repo")
    (mounted / "main.py").write_text("print('hello')\n")
    script = real.path.parent / "edit.vim"
    script.write_text("set backupskip=\nnormal Goprint('bye')\nwq\n")
    subprocess.run(
        ["vim", "-es", "-N", "-i", "NONE", "-S", str(script), "main.py"],
        cwd=mounted,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "main.py"], ["commit", "-q", "-m", "first"]):
        subprocess.run([*git, *args], cwd=mounted, check=True, capture_output=True)
    real.sync()
    assert (host / "main.py").read_text() == "print('hello')\nprint('bye')\n"
    checked = baifs_run(real, "cd data/repo && git fsck --strict && git log --format=%s")
    assert checked.returncode == 0, checked
    assert checked.stdout.decode().split() == ["first"]


def test_with_another_container_user_runs_can_change_everything_the_mount_wrote(real: Mount) -> None:
    for directory in ("src", "src/pkg", "deep/er/still"):
        (real.path / directory).mkdir(parents=True, exist_ok=True)
    files = ["top.txt", "src/a.py", "src/pkg/b.py", "deep/er/still/c.txt"]
    for name in files:
        (real.path / name).write_text(f"{name}\n")
    (real.path / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    real.sync()
    for name in [*files, "big.bin", "src", "src/pkg", "deep/er/still"]:
        assert (real.work / name).stat().st_uid == CONTAINER_UID, name
    edits = "; ".join(f"echo changed >> {name} && sed -i 's/^/#/' {name}" for name in files)
    creations = "; ".join(f"touch {directory}/new" for directory in ("src", "src/pkg", "deep/er/still"))
    result = baifs_run(real, f"set -e; {edits}; {creations}; rm big.bin; id -u")
    assert result.returncode == 0, result
    assert result.stdout.split()[-1] == str(CONTAINER_UID).encode()
    for name in files:
        assert (real.path / name).read_text() == f"#{name}\n#changed\n"
    assert (real.path / "deep/er/still/new").exists() and not (real.path / "big.bin").exists()


def test_overwriting_a_file_in_scratch_stays_one_upload_and_no_run(real: Mount) -> None:
    (real.path / "notes.txt").write_text("one\n")
    real.sync()
    before = real.counters()
    (real.path / "notes.txt").write_text("two\n")
    real.sync()
    spent = delta(before, real.counters())
    assert spent.get("upload") == 1 and "execute" not in spent, spent
    assert (real.work / "notes.txt").read_text() == "two\n"
    assert (real.work / "notes.txt").stat().st_uid == CONTAINER_UID


def occupy_session(server: LocalServer, session_id: str, seconds: float) -> threading.Thread:
    """Another client's run of ``seconds``, read to its end in a thread (it holds the slot meanwhile)."""
    run_id = secrets.token_hex(8)

    def execute(mode: str, options: dict | None = None) -> dict:
        body = {"mode": mode, "runId": run_id, "code": "", "options": options}
        answer = signed_request(server, "POST", f"/session/{session_id}", content=json.dumps(body).encode())
        answer.raise_for_status()
        return answer.json()["result"]

    def drive() -> None:
        result = execute("batch", {"clean": f"sleep {seconds}", "build": None, "exec": None})
        while result["status"] != "finished":
            result = execute("continue")

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    return thread


def test_while_another_clients_run_blocks_discovery_uploads_show_the_folder(
    realistic: LocalServer, tmp_path: Path, folders: dict[str, Path]
) -> None:
    session = create_session(realistic)
    runs_before = realistic.counters()["batch_runs"]
    other = occupy_session(realistic, session, 30)
    # The server counts a batch run as the run takes the session's execution slot.
    wait_for(lambda: realistic.counters()["batch_runs"] > runs_before, 20, "the other client's run to start")
    m = mount_for(realistic, tmp_path, session)
    try:
        m.start(settle=False)
        assert not m.status()["profile"]["source"], "discovery cannot have run yet"
        # Outlasts UNANSWERED_SECONDS: only then does status call the unanswered run queued behind another's.
        time.sleep(UNANSWERED_SECONDS + 1)
        status = baifs("status", str(m.path), env=m.env).stdout
        assert "another client's run holds the session" in status and "not known yet" in status, status
        name = f"fallback-{secrets.token_hex(4)}.txt"
        (m.path / "data" / name).write_text("placed after all\n")
        wait_for(lambda: "did not arrive: taking data" in m.log_text(), 30, "an upload to vanish")
        wait_for(lambda: (folders["data"] / name).exists(), 60, "the file to reach the folder")
        assert (folders["data"] / name).read_text() == "placed after all\n"
        assert m.status()["profile"]["source"] == "discovered"
    finally:
        m.stop()
        other.join(30)


def test_a_change_the_session_refuses_is_held_reported_in_its_words_and_kept_by_umount(real: Mount) -> None:
    result = baifs_run(real, "mkdir locked && chmod 555 locked")
    assert result.returncode == 0, result
    (real.path / "locked" / "x.txt").write_text("x\n")  # uid 9001 may not write there: refused

    wait_for(lambda: real.status()["flushes"]["holding"], timeout=60, what="write-back to hold the refusal")
    (refusal,) = real.status()["flushes"]["refused"]
    assert refusal["change"] == "place locked/x.txt" and refusal["attempts"] == 3, refusal
    assert "Permission denied" in refusal["said"], refusal
    assert "Permission denied" in baifs("status", str(real.path), env=real.env).stdout

    started = time.monotonic()
    refused = baifs("umount", str(real.path), env=real.env, timeout=60, check=False)
    assert refused.returncode != 0 and time.monotonic() - started < 60
    assert "locked/x.txt" in refused.stderr and "Permission denied" in refused.stderr, refused.stderr
    assert real.alive and (real.path / "locked" / "x.txt").read_text() == "x\n"

    kept = baifs("umount", "--keep-pending", str(real.path), env=real.env, timeout=60)
    assert "stay pending" in kept.stderr, kept.stderr
    assert real.process is not None and real.process.wait(30) == 0
    real.process = None
    assert "locked/x.txt" in baifs("salvage", "list", "--paths", env=real.env).stdout

    (real.work / "locked").chmod(0o755)  # fixed in the session: the next mount places the file
    real.start()
    real.sync()
    assert (real.work / "locked" / "x.txt").read_text() == "x\n"
