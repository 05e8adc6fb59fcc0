from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mounting import Mount, mount_for
from support import IMAGE, LocalServer, start_server, unique_session_name

from baifs.api.client import Connection, SessionClient


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One `baifs serve` with default behaviour, shared by the whole run."""
    local = start_server(tmp_path_factory.mktemp("server"))
    yield local
    local.stop()


#: The container user of the realistic server: the entrypoint's default, not the uploader (root).
CONTAINER_UID = 9001


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Host directories of two virtual folders, ``data`` and the automount ``.auto``."""
    base = tmp_path_factory.mktemp("folders")
    made = {"data": base / "data-store", "auto": base / "auto-store"}
    for path in made.values():
        path.mkdir()
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
    return made


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path]) -> Iterator[LocalServer]:
    """A server shaped like a real cluster: runs as uid 9001, uploads as root, folders in /home/work."""
    extra = ("--container-uid", str(CONTAINER_UID), "--vfolder", f"data={folders['data']}")
    server = start_server(
        tmp_path_factory.mktemp("realistic"), extra=(*extra, "--vfolder", f".auto={folders['auto']}")
    )
    yield server
    server.stop()


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
    mounted = mount_for(server, tmp_path)
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
