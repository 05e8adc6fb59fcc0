"""The client's answers to real releases, under faults between it and the session.

`tests/test_releases.py` shows each release's own fault met; here the same
paths meet the network's faults too, through the fault proxy in front of an
emulated release: the create that polls a session through PULLING and
PREPARING, the listing that decides a bare 500 of managers from 26.1, and the
aliases a script makes for names that are not UTF-8. Each must end (no path
waits unbounded), guess nothing it cannot prove (no ENOENT for a file that may
be there), and work once the trouble is gone.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from mounting import Mount, baifs, baifs_environment, create_session, force_unmount, needs_fuse
from support import IMAGE, FaultProxy, LocalServer, start_proxy, start_server, unique_session_name

from baifs.api import archive
from baifs.api.client import Connection
from baifs.api.errors import BaifsError, RemotePathError

pytestmark = pytest.mark.timeout(240)

#: Every kind of trouble a request can meet, a share of each.
FLAKY = (
    {"fault": "status", "status": 503},
    {"fault": "reset_before"},
    {"fault": "reset_after"},
)


def flaky(endpoint: str, rate: float) -> list[dict[str, object]]:
    """Rules that fail a share of ``endpoint``'s requests, spread over 503s and both resets (each
    rule draws on its own: 1 - (1 - rate/3)**3 in all, about 42 % for 0.5 and 31 % for 0.35)."""
    return [{"endpoint": endpoint, "rate": rate / len(FLAKY), **rule} for rule in FLAKY]


@dataclass
class Faulted:
    server: LocalServer
    proxy: FaultProxy


@pytest.fixture
def faulted_release(tmp_path: Path) -> Iterator:
    def start(release: str, *extra: str) -> Faulted:
        directory = tmp_path / f"release-{len(servers)}"
        server = start_server(directory / "server", extra=("--emulate", release, *extra))
        servers.append(server)
        proxies.append(start_proxy(directory / "proxy", server))
        return Faulted(server, proxies[-1])

    servers: list[LocalServer] = []
    proxies: list[FaultProxy] = []
    yield start
    for proxy in proxies:
        proxy.stop()
    for server in servers:
        server.stop()


@needs_fuse
@pytest.mark.mount
def test_a_create_followed_through_pulling_survives_a_flaky_network(faulted_release, tmp_path: Path) -> None:
    """About 40 % of the create's polls fail (503, resets before and after) and the create is cut off
    once after the server made the session: the mount still comes up on the one session."""
    faulted = faulted_release("26.8.1", "--start-delay", "5")
    faulted.proxy.set(
        *flaky("info", 0.5), {"endpoint": "create", "fault": "reset_after", "rate": 1, "count": 1}, seed=3
    )
    home = tmp_path / "home"
    home.mkdir()
    env = baifs_environment(faulted.server, home, faulted.proxy.endpoint)
    target = tmp_path / "mnt"
    target.mkdir()
    name = unique_session_name()
    try:
        mounted = baifs("mount", "--create", IMAGE, name, str(target), env=env, timeout=150)
        assert "mounted session" in mounted.stderr, mounted.stderr
        injected = faulted.proxy.state()["injected"]
        assert injected.get("create:reset_after") == 1 and sum(
            n for key, n in injected.items() if key.startswith("info:")
        ), injected
        sessions = list((faulted.server.data_dir / "sessions").iterdir())
        assert len(sessions) == 1, "the repeated create reused the session it had made"
        (target / "hello.txt").write_text("hello\n")
        faulted.proxy.clear()
        descriptor = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)  # everything written is on the session when this returns
        finally:
            os.close(descriptor)
        assert (sessions[0] / "work" / "hello.txt").read_text() == "hello\n"
    finally:
        force_unmount(target)


async def test_a_bare_500_is_not_called_missing_when_the_listing_that_decides_it_fails(
    faulted_release,
) -> None:
    """On 26.1 a download of a missing file is a bare 500; the client decides by a listing.
    While listings fail, the file may be there: no ENOENT, an error that says the session did
    not answer. Once they answer, ENOENT; the file that is there is read."""
    faulted = faulted_release("26.1.0")
    async with Connection(faulted.proxy.credentials, timeout=2) as connection:
        await connection.negotiate()
        answer = await connection.create_session(unique_session_name(), IMAGE)
        session = connection.session(answer["sessionId"])
        (faulted.server.work_dir(answer["sessionId"]) / "there.txt").write_text("here\n")
        for rules in (
            [{"endpoint": "list", "fault": "status", "status": 503, "rate": 1}],
            [{"endpoint": "list", "fault": "stall", "seconds": 30, "rate": 1}],
        ):
            faulted.proxy.set(*rules)
            started = trio.current_time()
            with trio.fail_after(60):
                with pytest.raises(BaifsError) as raised:
                    await session.download(["gone.txt"])
            assert getattr(raised.value, "errno", None) != errno.ENOENT, (rules, raised.value)
            said = str(raised.value)
            assert "listing that would show whether 'gone.txt' exist" in said or "cannot reach" in said, said
            assert trio.current_time() - started < 30  # the connection's timeout, a few times over
        faulted.proxy.clear()
        with pytest.raises(RemotePathError) as missing:
            await session.download(["gone.txt"])
        assert missing.value.errno == errno.ENOENT
        faulted.proxy.set(*flaky("download", 0.5), seed=1)
        read = 0
        for _ in range(4):  # a flaky download of a present file is never turned into a missing one
            try:
                parts = await session.download(["there.txt"])
            except RemotePathError as error:
                assert error.errno != errno.ENOENT, error
            except BaifsError:
                continue
            else:
                assert archive.single_member(parts[0])[1] == b"here\n"
                read += 1
        injected = faulted.proxy.state()["injected"]
        assert read and any(key.startswith("download:") for key in injected), (read, injected)


@needs_fuse
@pytest.mark.mount
def test_names_that_are_not_utf8_are_read_and_written_through_aliases_on_a_flaky_network(
    faulted_release, tmp_path: Path
) -> None:
    """The scripts that make the aliases and the downloads through them fail about 30 % of the
    time (503s, resets before and after the script ran): every read gives the file's bytes or
    an error, never other bytes; a write arrives; the aliases are removed at unmount."""
    faulted = faulted_release("26.8.1")
    home = tmp_path / "home"
    home.mkdir()
    session_id = create_session(faulted.server)
    env = baifs_environment(faulted.server, home, faulted.proxy.endpoint)
    m = Mount(tmp_path / "mnt", faulted.server, session_id, home, env)
    work = os.fsencode(m.work)
    directory = os.path.join(work, b"caf\xe9")
    os.mkdir(directory)
    contents = {b"na\xefve-%d.txt" % index: os.urandom(2000 + index) for index in range(4)}
    for name, data in contents.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    try:
        m.start()
        inside = os.path.join(os.fsencode(m.path), b"caf\xe9")
        faulted.proxy.set(*flaky("execute", 0.35), *flaky("download", 0.35), seed=11)
        read_right = 0
        for name, data in contents.items():
            try:
                with open(os.path.join(inside, name), "rb") as handle:
                    got = handle.read()
            except OSError as error:
                assert error.errno in (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT), error
                continue
            assert got == data, name
            read_right += 1
        try:
            with open(os.path.join(inside, b"n\xe9w.txt"), "wb") as handle:
                handle.write(b"made here\n")
        except OSError as error:
            pytest.fail(f"a write is kept locally whatever the network does: {error}")
        assert faulted.proxy.state()["injected"], "no fault was injected"
        assert read_right, "no read got through the faults"
        faulted.proxy.clear()
        for name, data in contents.items():
            with open(os.path.join(inside, name), "rb") as handle:
                assert handle.read() == data, name
        m.sync()
        with open(os.path.join(directory, b"n\xe9w.txt"), "rb") as handle:
            assert handle.read() == b"made here\n"
        assert m.unmount() == 0
        scratch = os.path.join(work, b".baifs-tmp")
        assert not os.path.exists(scratch) or os.listdir(scratch) == [], os.listdir(scratch)
    finally:
        m.stop()


async def test_download_single_on_a_get_only_release_survives_faults_and_the_server_gone(
    faulted_release,
) -> None:
    """On 24.03.6 download_single is GET only: the client's 405 switch, then 503s, resets before
    and after the server answered, a stall and the server killed. Each call gives the bytes or
    an error within its bounds; after the trouble the file is read again."""
    faulted = faulted_release("24.03.6")
    async with Connection(faulted.proxy.credentials, timeout=2) as connection:
        await connection.negotiate()
        answer = await connection.create_session(unique_session_name(), IMAGE)
        session = connection.session(answer["sessionId"])
        (faulted.server.work_dir(answer["sessionId"]) / "one").write_bytes(b"one\n")
        faulted.proxy.set(
            *flaky("download_single", 0.5),
            {"endpoint": "download_single", "fault": "stall", "seconds": 30, "rate": 1, "count": 1},
            seed=2,
        )
        read = 0
        for _ in range(4):
            with trio.fail_after(60):
                try:
                    assert await session.download_single("one") == b"one\n"
                    read += 1
                except BaifsError:
                    continue
        injected = faulted.proxy.state()["injected"]
        assert read and "download_single:stall" in injected, (read, injected)
        faulted.proxy.clear()
        faulted.server.kill()
        with trio.fail_after(60), pytest.raises(BaifsError):
            await session.download_single("one")
        faulted.server.restart()
        assert await session.download_single("one") == b"one\n"
