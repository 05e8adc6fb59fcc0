"""The overlay and sync engine against a reference, over HTTP: a real `baifs serve` behind the fault proxy.

Each example runs one random sequence of the operations of `ops` (and the
cases of `ops.REFERENCE_EXAMPLES`) through `ops.scenario`, against a mount's
parts built by `MountCore` as ``baifs mount`` builds them, talking to a real
`baifs serve` through the fault proxy. The faults that need the transport
are made here: a flush under a rate of failing requests (5xx, resets before
and after the server acted), the answer to its script's execute request cut
off after the server acted, and the server killed during a flush and started
again. The same scenarios run in milliseconds against the in-memory
session (`test_fast_reference.py`) and through a real FUSE mount
(`test_mounted_reference.py`).

No FUSE here: the kernel adapter is tested by the mounted tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from ops import (
    PROFILES,
    attempt_flush,
    flush_interrupted,
    operation_st,
    reference_settings,
    scenario,
    with_examples,
)
from support import FaultProxy, LocalServer, start_proxy, start_server

from baifs.api.client import Connection, RetryPolicy, SessionClient
from baifs.fs.core import MountCore, MountOptions
from baifs.fs.filesystem import Filesystem
from baifs.fs.profile import SessionProfile


@dataclass
class Faulted:
    """The reference test's own server (it is killed and started again) and the fault proxy before it."""

    server: LocalServer
    proxy: FaultProxy


def faulted_server(directory: Path, *extra: str) -> Iterator[Faulted]:
    """A server (started with ``extra``) behind the fault proxy, stopped when done."""
    server = start_server(directory / "server", extra=extra)
    proxy = start_proxy(directory / "proxy", server)
    try:
        yield Faulted(server, proxy)
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture(scope="module")
def faulted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulted]:
    yield from faulted_server(tmp_path_factory.mktemp("faulted"))


@dataclass
class ServedWorld:
    """A session of the faulted server, reached over HTTP (`ops.World`)."""

    faulted: Faulted
    session: SessionClient
    work: Path

    def core(self, state: Path, cache: Path, options: MountOptions) -> MountCore:
        return MountCore.over_session(self.session, state, cache, options)

    async def fault(self, fs: Filesystem, op: tuple) -> bool:
        kind, *args = op
        if kind == "lost_answer":  # the executor follows the run on its id and reads the rest
            self.faulted.proxy.set({"endpoint": "execute", "fault": "reset_after", "count": 1})
            try:
                return await attempt_flush(fs)
            finally:
                self.faulted.proxy.clear()
        if kind == "flaky_flush":
            rate, seed = args
            third = rate / 3
            self.faulted.proxy.set(
                {"endpoint": "*", "fault": "status", "status": 503, "rate": third},
                {"endpoint": "*", "fault": "reset_before", "rate": third},
                {"endpoint": "*", "fault": "reset_after", "rate": third},
                seed=seed,
            )
            try:
                return await attempt_flush(fs)
            finally:
                self.faulted.proxy.clear()
        # server_killed

        async def kill_and_restart() -> None:
            await trio.to_thread.run_sync(self.faulted.server.kill)
            await trio.to_thread.run_sync(self.faulted.server.restart)

        return await flush_interrupted(fs, args[0], kill_and_restart)


async def served_scenario(
    faulted: Faulted, tmp: Path, operations: list[tuple], profile: SessionProfile
) -> None:
    retry = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
    connection = Connection(faulted.proxy.credentials, timeout=30, retry=retry)
    await connection.negotiate()
    async with connection:
        answer = await connection.create_session(f"ref-{tmp.name[-40:]}".replace("_", "-"), "test")
        session = connection.session(answer["sessionId"])
        world = ServedWorld(faulted, session, faulted.server.work_dir(answer["sessionId"]))
        await scenario(world, tmp, operations, profile)


@pytest.mark.timeout(600)
@reference_settings("BAIFS_REFERENCE_EXAMPLES", 60)
@given(operations=st.lists(operation_st, min_size=1, max_size=25))
@with_examples
@pytest.mark.parametrize("shape", sorted(PROFILES))
def test_overlay_matches_a_real_directory(
    faulted: Faulted, tmp_path_factory: pytest.TempPathFactory, operations: list[tuple], shape: str
) -> None:
    tmp = tmp_path_factory.mktemp("ref")
    trio.run(served_scenario, faulted, tmp, operations, PROFILES[shape])


@pytest.fixture(scope="module", params=["24.03.7", "26.8.1"])
def faulted_release(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Faulted]:
    """The fault proxy before a server emulating a real release: absolute upload names, verified
    uploads, bare 500s and detaching phases (see `baifs.server.releases`)."""
    yield from faulted_server(tmp_path_factory.mktemp(f"faulted-{request.param}"), "--emulate", request.param)


@pytest.mark.timeout(600)
@reference_settings("BAIFS_RELEASE_EXAMPLES", 6)
@given(operations=st.lists(operation_st, min_size=1, max_size=25))
@with_examples
def test_overlay_matches_a_real_directory_on_real_releases(
    faulted_release: Faulted, tmp_path_factory: pytest.TempPathFactory, operations: list[tuple]
) -> None:
    tmp = tmp_path_factory.mktemp("ref")
    trio.run(served_scenario, faulted_release, tmp, operations, PROFILES["plain"])
