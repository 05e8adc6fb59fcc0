from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mounting import Mount, baifs_environment, create_session
from support import IMAGE, LocalServer, start_server, unique_session_name

from baifs.api.client import Connection, SessionClient


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One `baifs serve` with default behaviour, shared by the whole run."""
    local = start_server(tmp_path_factory.mktemp("server"))
    yield local
    local.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start servers with compatibility switches; all are stopped after the test."""
    started: list[LocalServer] = []

    def start(*compat: str, latency_ms: float = 0) -> LocalServer:
        local = start_server(tmp_path / f"server{len(started)}", *compat, latency_ms=latency_ms)
        started.append(local)
        return local

    yield start
    for local in started:
        local.stop()


async def open_session(local: LocalServer) -> tuple[Connection, SessionClient, str]:
    connection = Connection(local.credentials, timeout=20)
    await connection.negotiate()
    answer = await connection.create_session(unique_session_name(), IMAGE)
    return connection, connection.session(answer["sessionId"]), answer["sessionId"]


@pytest.fixture
async def remote(server: LocalServer) -> AsyncIterator[tuple[SessionClient, Path]]:
    """A fresh session on the shared server, and its work directory on disk."""
    connection, session, session_id = await open_session(server)
    try:
        yield session, server.work_dir(session_id)
    finally:
        await connection.aclose()


@pytest.fixture
def mount(server: LocalServer, tmp_path: Path) -> Iterator[Mount]:
    """A fresh session mounted at ``tmp_path/mnt`` (not yet started: call ``.start()``)."""
    home = tmp_path / "home"
    home.mkdir()
    mounted = Mount(tmp_path / "mnt", server, create_session(server), home, baifs_environment(server, home))
    try:
        yield mounted
    finally:
        mounted.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, for a state directory that fills up."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
