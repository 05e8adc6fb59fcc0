"""What common work costs in session API requests, read from the server's counters.

Request counts are exact and do not depend on the machine, so they are
asserted here; wall times are measured by the benchmarks in ``bench/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mounting import Mount, delta, make_tree, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(180)]


def test_cp_r_of_200_files_costs_ten_uploads_and_no_run(mount: Mount, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "source")
    m = mount.start()
    before = m.counters()
    subprocess.run(["cp", "-r", str(source), str(m.path / "copy")], check=True)
    m.sync()
    spent = delta(before, m.counters())
    assert spent.get("upload", 0) <= 12, spent
    assert spent.get("batch_runs", 0) <= 1, spent
    assert spent.get("upload", 0) == 10 and spent.get("execute", 0) == 0, spent
    for path in source.rglob("*.dat"):
        assert (m.work / "copy" / path.relative_to(source)).read_bytes() == path.read_bytes()


@pytest.mark.skipif(shutil.which("vim") is None, reason="needs vim")
def test_vim_edit_save_quit_costs_one_upload_and_no_run(mount: Mount) -> None:
    (mount.work / "main.py").write_text("print('hello')\n" * 200)
    m = mount.start()
    os.listdir(m.path)
    (m.path.parent / "edit.vim").write_text("set backupskip=\nnormal Goprint('bye')\nwq\n")
    before = m.counters()
    subprocess.run(
        ["vim", "-es", "-N", "-i", "NONE", "-S", str(m.path.parent / "edit.vim"), "main.py"],
        cwd=m.path,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    m.sync()
    spent = delta(before, m.counters())
    assert (m.work / "main.py").read_text() == "print('hello')\n" * 200 + "print('bye')\n"
    assert spent.get("upload", 0) == 1, spent
    assert spent.get("execute", 0) == 0 and spent.get("batch_runs", 0) == 0, spent


def test_ls_lR_twice_within_the_ttl_lists_each_directory_once(mount: Mount) -> None:
    directories = ["", "a", "a/b", "a/b/c", "d", "d/e"]
    for directory in directories:
        (mount.work / directory).mkdir(parents=True, exist_ok=True)
        for index in range(30):
            (mount.work / directory / f"f{index}").write_text(str(index))
    m = mount.start("--dir-cache-time", "30")
    before = m.counters()
    first = subprocess.run(["ls", "-lR", str(m.path)], check=True, capture_output=True, text=True).stdout
    second = subprocess.run(["ls", "-lR", str(m.path)], check=True, capture_output=True, text=True).stdout
    spent = delta(before, m.counters())
    # The link counts of directories differ: a directory not yet listed when its parent was
    # printed shows 1 ("unknown"), and 2 plus its subdirectories once listed.
    assert without_link_counts(first) == without_link_counts(second) and "f29" in first
    assert spent == {"list": len(directories)}, spent


def without_link_counts(listing: str) -> list[list[str]]:
    return [line.split()[:1] + line.split()[2:] for line in listing.splitlines()]
