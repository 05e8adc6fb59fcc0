"""A server that lies, drips or floods: the mount serves what it can, bounds every wait and its memory.

Each test puts the fault proxy (`faultproxy.py`) between a mount and its own
`baifs serve` and makes the answers wrong in one way: listing entries no
directory can hold, answers that trickle a byte at a time, answers larger
than the protocol allows, an endpoint that takes connections and never
answers.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
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
    mount = Mount(
        tmp_path / "mnt",
        server,
        create_session(server),
        home,
        baifs_environment(server, home, proxy.endpoint),
    )
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
    '{"filename": "huge", "mode": "-rw-r--r--", "size": 9223372036854775808, '
    '"ctime": 1, "mtime": 1, "atime": 1}',
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


def _cold_read(path: Path, results: dict[str, object]) -> None:
    try:
        results[path.name] = path.read_bytes()
    except OSError as error:
        results[path.name] = error


def test_dripping_downloads_free_their_workers_and_every_read_gets_its_content(hostile) -> None:
    server, proxy, m = hostile
    contents = {f"f{index}": os.urandom(50_000) for index in range(6)}
    for index, (name, data) in enumerate(contents.items()):  # one a directory: no prefetch of siblings
        (m.work / f"d{index}").mkdir()
        (m.work / f"d{index}" / name).write_bytes(data)
    m.start()
    for index in range(6):
        os.listdir(m.path / f"d{index}")
    proxy.set({"endpoint": "download", "fault": "drip", "seconds": 2, "count": 5})
    results: dict[str, object] = {}
    readers = []
    for index in range(5):  # five separate downloads, one a reader, each dripping
        seen = proxy.state()["seen"].get("download", 0)
        reader = threading.Thread(
            target=_cold_read, args=(m.path / f"d{index}" / f"f{index}", results), daemon=True
        )
        reader.start()
        readers.append(reader)
        wait_for(
            lambda seen=seen: proxy.state()["seen"].get("download", 0) > seen,
            20,
            f"download {index} to start",
        )
    started = time.monotonic()
    _cold_read(m.path / "d5" / "f5", results)  # the server answers promptly again: the drips are exhausted
    for reader in readers:
        reader.join(90)
    assert results == contents, {k: v if isinstance(v, OSError) else len(v) for k, v in results.items()}
    assert time.monotonic() - started < 60
    assert m.alive


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_an_answer_larger_than_the_protocol_allows_is_refused_while_it_streams(hostile) -> None:
    server, proxy, m = hostile
    (m.work / "small.txt").write_text("small\n")
    m.start()
    os.listdir(m.path)
    assert m.process is not None
    before = _rss_kib(m.process.pid)
    proxy.set({"endpoint": "download", "fault": "pad", "size": 500 * 1024 * 1024})
    with pytest.raises(OSError) as refused:
        (m.path / "small.txt").read_bytes()
    assert refused.value.errno == errno.EIO
    assert _rss_kib(m.process.pid) - before < 64 * 1024, "the daemon took the oversized answer in"
    assert "larger than the" in m.log_text()
    proxy.clear()
    assert (m.path / "small.txt").read_text() == "small\n"


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
