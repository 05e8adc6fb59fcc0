"""The session API client against a real `baifs serve` over HTTP on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
from conftest import open_session
from support import IMAGE, LocalServer, unique_session_name

from baifs.api.archive import extract_tar, single_member
from baifs.api.client import Connection, SessionClient, UploadFile
from baifs.api.errors import (
    AuthenticationFailed,
    EndpointUnreachable,
    LimitExceeded,
    RemotePathError,
    ServerError,
    SessionNotFound,
)
from baifs.config import Credentials

Remote = tuple[SessionClient, Path]


async def test_negotiates_version_and_reads_session_info(remote: Remote) -> None:
    session, _ = remote
    assert session.connection.api_version == "v9.20250722"
    info = await session.info()
    assert info["status"] == "RUNNING" and info["image"] == IMAGE


async def test_wrong_key_is_authentication_failed(server: LocalServer) -> None:
    wrong = Credentials(server.endpoint, server.credentials.access_key, "wrong-secret")
    async with Connection(wrong) as connection:
        with pytest.raises(AuthenticationFailed) as failure:
            await connection.session("anything").info()
    assert failure.value.status == 401
    assert "wrong-secret" not in str(failure.value)


async def test_unknown_session_is_session_not_found(server: LocalServer) -> None:
    async with Connection(server.credentials) as connection:
        with pytest.raises(SessionNotFound):
            await connection.session("no-such-session").list_dir("")


async def test_unreachable_endpoint_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    credentials = Credentials(f"http://127.0.0.1:{port}", "AK", "SK")
    async with Connection(credentials, connect_timeout=2) as connection:
        with pytest.raises(EndpointUnreachable, match=f"cannot reach http://127.0.0.1:{port}"):
            await connection.negotiate()


async def test_destroyed_session_is_gone(server: LocalServer) -> None:
    connection, session, session_id = await open_session(server)
    async with connection:
        await session.upload([UploadFile.of("x.txt", b"x")])
        await session.destroy()
        assert not server.work_dir(session_id).exists()
        with pytest.raises(SessionNotFound):
            await session.list_dir("")


async def test_upload_nested_tree_and_list_it(remote: Remote) -> None:
    session, work = remote
    await session.upload(
        [
            UploadFile.of("a.txt", b"alpha"),
            UploadFile.of("d/e/b.txt", b"beta"),
            UploadFile.of("sp ace é.txt", b""),
        ]
    )
    assert (work / "d/e/b.txt").read_bytes() == b"beta"
    assert (work / "sp ace é.txt").read_bytes() == b""
    root = {entry.name: entry for entry in await session.list_dir("")}
    assert set(root) == {"a.txt", "d", "sp ace é.txt"}
    assert root["d"].is_dir and root["a.txt"].size == 5
    assert abs(root["a.txt"].mtime_ns - (work / "a.txt").stat().st_mtime_ns) < 1000
    assert [entry.name for entry in await session.list_dir("d/e")] == ["b.txt"]


async def test_list_errors_become_errno_exceptions(remote: Remote) -> None:
    session, work = remote
    (work / "file").write_text("x")
    with pytest.raises(RemotePathError) as missing:
        await session.list_dir("missing")
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(RemotePathError) as not_dir:
        await session.list_dir("file")
    assert not_dir.value.errno == errno.ENOTDIR


async def test_limits_are_refused_locally_and_never_sent(server: LocalServer, remote: Remote) -> None:
    session, _ = remote
    before = server.counters()
    with pytest.raises(LimitExceeded, match="at most 20 files"):
        await session.upload([UploadFile.of(f"f{i}", b"") for i in range(21)])
    with pytest.raises(LimitExceeded, match="1,048,575"):
        await session.upload([UploadFile.of("big", b"x" * 1_048_576)])
    with pytest.raises(LimitExceeded, match="at most 5 paths"):
        await session.download([f"f{i}" for i in range(6)])
    with pytest.raises(LimitExceeded, match="plain relative path"):
        await session.upload([UploadFile.of("../escape", b"")])
    assert server.counters().get("upload", 0) == before.get("upload", 0)
    assert server.counters().get("download", 0) == before.get("download", 0)


async def test_thousand_small_files_take_at_most_fifty_upload_requests(
    server: LocalServer, remote: Remote
) -> None:
    session, work = remote
    files = [UploadFile.of(f"tree/d{i % 10}/f{i:04d}.txt", f"content {i}\n".encode()) for i in range(1000)]
    before = server.counters().get("upload", 0)
    await session.upload_all(files)
    uploads = server.counters()["upload"] - before
    assert uploads <= 50, uploads
    assert sum(1 for _ in (work / "tree").rglob("*.txt")) == 1000
    assert (work / "tree/d7/f0987.txt").read_text() == "content 987\n"


async def test_download_correlates_parts_and_extracts_safely(remote: Remote, tmp_path: Path) -> None:
    session, work = remote
    (work / "dir/sub").mkdir(parents=True)
    (work / "dir/sub/x").write_bytes(b"x-content")
    (work / "one").write_bytes(b"one-content")
    (work / "two").write_bytes(b"")
    os.symlink("one", work / "link")
    archives = await session.download(["two", "one", "dir", "link"])
    assert single_member(archives[0])[1] == b""
    assert single_member(archives[1])[1] == b"one-content"
    member, _ = single_member(archives[3])
    assert member.issym() and member.linkname == "one"
    names = extract_tar(archives[2], tmp_path / "out")
    assert "dir/sub/x" in names
    assert (tmp_path / "out/dir/sub/x").read_bytes() == b"x-content"
    assert await session.download_single("one") == b"one-content"


async def test_download_of_missing_path_is_server_error(remote: Remote) -> None:
    session, _ = remote
    with pytest.raises(ServerError) as failure:
        await session.download(["missing"])
    assert "Could not download" in failure.value.msg


async def test_download_falls_back_to_get_on_405(server_factory) -> None:
    local = server_factory("download-get-only")
    connection, session, session_id = await open_session(local)
    async with connection:
        (local.work_dir(session_id) / "f").write_bytes(b"data")
        assert single_member((await session.download(["f"]))[0])[1] == b"data"
        assert single_member((await session.download(["f"]))[0])[1] == b"data"
    counts = local.counters()
    assert counts["download"] == 3  # one 405, then GET twice


async def test_list_path_in_query_works_on_query_only_managers(server_factory) -> None:
    local = server_factory("list-path-query-only")
    connection, session, session_id = await open_session(local)
    async with connection:
        (local.work_dir(session_id) / "sub").mkdir()
        (local.work_dir(session_id) / "sub/inner").write_text("x")
        assert [entry.name for entry in await session.list_dir("sub")] == ["inner"]


async def test_swallowed_upload_failure_is_detected(server_factory) -> None:
    local = server_factory("upload-errors-swallowed")
    connection, session, session_id = await open_session(local)
    async with connection:
        (local.work_dir(session_id) / "occupied").mkdir()
        with pytest.raises(ServerError, match="did not arrive"):
            await session.upload([UploadFile.of("occupied", b"cannot overwrite a directory")])
        await session.upload([UploadFile.of("fine.txt", b"ok")])
        assert (local.work_dir(session_id) / "fine.txt").read_bytes() == b"ok"


async def test_absolute_upload_names_are_adopted(server_factory) -> None:
    local = server_factory("absolute-upload-names")
    connection, session, session_id = await open_session(local)
    async with connection:
        await session.upload([UploadFile.of("x/y.txt", b"abs")])
        await session.upload([UploadFile.of("z.txt", b"second")])
        assert (local.work_dir(session_id) / "x/y.txt").read_bytes() == b"abs"
        assert (local.work_dir(session_id) / "z.txt").read_bytes() == b"second"
    assert local.counters()["upload"] == 3  # one refusal, then absolute names from the start


async def test_get_or_create_reuses_by_name(server: LocalServer) -> None:
    name = unique_session_name()
    async with Connection(server.credentials) as connection:
        first = await connection.create_session(name, IMAGE)
        second = await connection.create_session(name, IMAGE)
    assert first["created"] and not second["created"]
    assert first["sessionId"] == second["sessionId"]
