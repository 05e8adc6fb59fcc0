"""Batch executions through `BatchExecutor` against `baifs serve`, on both agent behaviours."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from conftest import open_session
from support import LocalServer

from baifs.api.batch import BatchExecutor, BatchSteps
from baifs.api.client import SessionClient

Remote = tuple[SessionClient, Path]


class Console:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, float]] = []

    async def __call__(self, stream: str, text: str) -> None:
        self.items.append((stream, text, trio.current_time()))

    def text(self, stream: str) -> str:
        return "".join(text for kind, text, _ in self.items if kind == stream)


@pytest.mark.parametrize(
    ("steps", "exit_code"),
    [
        (BatchSteps(exec="true"), 0),
        (BatchSteps(exec="exit 3"), 3),
        (BatchSteps(exec="echo never", build="exit 1"), 127),
        (BatchSteps(exec="echo ran", build="true", clean="exit 9"), 0),
    ],
)
async def test_exit_codes(remote: Remote, steps: BatchSteps, exit_code: int) -> None:
    session, _ = remote
    outcome = await BatchExecutor(session).run(steps)
    assert outcome.exit_code == exit_code


async def test_commands_run_in_the_work_directory(remote: Remote) -> None:
    session, work = remote
    console = Console()
    outcome = await BatchExecutor(session).run(
        BatchSteps(exec='pwd; echo "$HOME"; echo out; echo err >&2; echo made > created.txt'), console
    )
    assert outcome.exit_code == 0
    lines = console.text("stdout").splitlines()
    assert lines[0] == lines[1] and lines[2] == "out"
    assert lines[0] in ("/home/work", str(work))
    assert console.text("stderr") == "err\n"
    assert (work / "created.txt").read_text() == "made\n"


async def test_console_arrives_while_the_run_goes_on(remote: Remote) -> None:
    session, _ = remote
    console = Console()
    started = trio.current_time()
    await BatchExecutor(session).run(
        BatchSteps(exec="for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done"), console
    )
    ended = trio.current_time()
    first = next(at for kind, text, at in console.items if "1" in text)
    assert console.text("stdout") == "1\n2\n3\n4\n5\n6\n"
    assert first - started < ended - started - 0.5


async def test_runs_are_serialised_per_session(remote: Remote) -> None:
    session, work = remote
    executor = BatchExecutor(session)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            executor.run, BatchSteps(exec="echo first >> order; sleep 1; echo first-end >> order")
        )
        await trio.sleep(0.1)
        nursery.start_soon(executor.run, BatchSteps(exec="echo second >> order"))
    assert (work / "order").read_text() == "first\nfirst-end\nsecond\n"


async def test_interrupt_stops_a_long_command(remote: Remote) -> None:
    session, _ = remote
    executor = BatchExecutor(session)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def interrupt_soon() -> None:
            await trio.sleep(1)
            await executor.interrupt()

        nursery.start_soon(interrupt_soon)
        outcome = await executor.run(BatchSteps(exec="sleep 60"))
    assert outcome.exit_code != 0
    assert trio.current_time() - started < 10


@pytest.mark.parametrize(
    ("switch", "latency_ms", "learned"),
    [
        ("phase-frame-loss", 0, {"detach", "resume"}),  # a fast continue may still catch a marker
        ("phase-frame-loss", 30, {"detach"}),  # slower than the 10 ms marker gap: frames are lost
        ("run-id-snake-only", 0, {"resume"}),
    ],
)
async def test_runs_complete_on_every_agent_behaviour(
    server_factory, switch: str, latency_ms: float, learned: set[str]
) -> None:
    local: LocalServer = server_factory(switch, latency_ms=latency_ms)
    connection, session, session_id = await open_session(local)
    async with connection:
        executor = BatchExecutor(session)
        console = Console()
        for number in range(4):
            outcome = await executor.run(BatchSteps(exec=f"echo run{number}; exit {number}"), console)
            assert outcome.exit_code == number
        assert console.text("stdout") == "run0\nrun1\nrun2\nrun3\n"
        assert executor.phase_behaviour in learned
    assert local.counters()["batch_runs"] >= 4
