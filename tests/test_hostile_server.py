"""A server that lies, drips or floods: the mount serves what it can, bounds every wait and its memory.

Each test puts the fault proxy (`faultproxy.py`) between a mount and its own
`baifs serve` and makes the answers wrong in one way: listing entries no
directory can hold, an endpoint that takes connections and never
answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, baifs_environment, create_session, needs_fuse, wait_for
from support import FaultProxy, LocalServer, start_proxy, start_server

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.timeout(240)]


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[LocalServer, FaultProxy, Mount]]:
    server = start_server(tmp_path / "server")
    proxy = start_proxy(tmp_path / "proxy", server)
    home = tmp_path / "home"
    home.mkdir()
    mount = Mount(tmp_path / "mnt", server, create_session(server), home, baifs_environment(server, home, proxy.endpoint))
    try:
        yield server, proxy, mount
    finally:
        mount.stop()
        proxy.stop()
        server.stop()


BAD_ENTRIES = [
    '{"filename": "a/b", "mode": "-rw-r--r--", "size": 1, "ctime": 1, "mtime": 1, "atime": 1}',
    '{"filename": ".", "mode": "drwxr-xr-x", "size": 1, "ctime": 1, "mtime": 1, "atime": 1}',
    '{"filename": "..", "mode": "drwxr-xr-x", "size": 1, "ctime": 1, "mtime": 1, "atime": 1}',
    '{"filename": "", "mode": "-rw-r--r--", "size": 1, "ctime": 1, "mtime": 1, "atime": 1}',
    '{"filename": "nul\\u0000name", "mode": "-rw-r--r--", "size": 1, "ctime": 1, "mtime": 1, "atime": 1}',
    '{"filename": "huge", "mode": "-rw-r--r--", "size": 9223372036854775808, "ctime": 1, "mtime": 1, "atime": 1}',
    '{"filename": "forever", "mode": "-rw-r--r--", "size": 1, "ctime": 1, "mtime": Infinity, "atime": 1}',
    '{"filename": "never", "mode": "-rw-r--r--", "size": 1, "ctime": 1, "mtime": NaN, "atime": 1}',
    '{"filename": "typeless", "mode": "?rw-r--r--", "size": 1, "ctime": 1, "mtime": 1, "atime": 1}',
    '"not an object"',
]


def test_bad_listing_entries_are_skipped_and_the_rest_of_the_directory_is_served(hostile) -> None:
    server, proxy, m = hostile
    (m.work / "d").mkdir()
    (m.work / "d" / "good.txt").write_text("good\n")
    m.start()
    proxy.set({"endpoint": "list", "fault": "entries", "entries": BAD_ENTRIES})
    assert sorted(os.listdir(m.path / "d")) == ["good.txt"]
    assert (m.path / "d" / "good.txt").read_text() == "good\n"
    assert "skipped 10 entries" in m.log_text()


def test_an_endpoint_that_never_answers_fails_the_mount_in_bounded_time_and_says_why(hostile) -> None:
    server, proxy, m = hostile
    proxy.set({"endpoint": "version", "fault": "stall"})
    m.path.mkdir()
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "baifs", "mount", m.session_id, str(m.path)],
        env=m.env,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    assert finished.returncode != 0 and took < 35, (took, finished.stderr)
    assert "did not answer GET /" in finished.stderr and "Traceback" not in finished.stderr
