"""The fast tier: the reference scenarios of `ops` against the in-memory session, in seconds.

The same operations, faults and remote changes as `test_overlay_reference.py`,
through the same mount's parts (`MountCore`), but the session is
`fakeremote.FakeRemote`: a local directory whose scripts run with ``sh``.
Without HTTP and a server process an example costs milliseconds, so this
tier draws many more sequences; the faults are made at the seam: a share of
all calls failing before or after the session acted (``flaky_flush``), the
answer to the flush's script lost after it ran (``lost_answer``: the run
stays unconcluded and the flush unresolved until the slot is taken again),
every call failing for a while (``server_killed``: the session's server down
during a flush, then back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fakeremote import FakeRemote
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

from baifs.fs.core import MountCore, MountOptions
from baifs.fs.filesystem import Filesystem

pytestmark = pytest.mark.fast


@dataclass
class InMemoryWorld:
    """An in-memory session (`ops.World`): every mount of it gets a `FakeRemote` of one directory."""

    work: Path
    remotes: list[FakeRemote] = field(default_factory=list)

    def core(self, state: Path, cache: Path, options: MountOptions) -> MountCore:
        self.remotes.append(FakeRemote(self.work))
        return MountCore(self.remotes[-1], state, cache, options)

    async def fault(self, fs: Filesystem, op: tuple) -> bool:
        kind, *args = op
        remote = self.remotes[-1]
        if kind == "flaky_flush":
            rate, seed = args
            remote.chaos(rate, seed)
            try:
                return await attempt_flush(fs)
            finally:
                remote.chaos(None)
        if kind == "lost_answer":  # the flush is left unresolved: its outcome is read later
            remote.fail("run", after=True)
            try:
                return await attempt_flush(fs)
            finally:
                remote.faults.clear()
        # server_killed: down a moment into the flush, back when that flush gave up

        async def down() -> None:
            remote.down = True

        try:
            return await flush_interrupted(fs, args[0], down)
        finally:
            remote.down = False


@pytest.mark.timeout(300)
@reference_settings("BAIFS_FAST_EXAMPLES", 150)
@given(operations=st.lists(operation_st, min_size=1, max_size=30))
@with_examples
@pytest.mark.parametrize("shape", sorted(PROFILES))
def test_the_overlay_matches_a_real_directory_over_an_in_memory_session(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple], shape: str
) -> None:
    tmp = tmp_path_factory.mktemp("fast")
    trio.run(scenario, InMemoryWorld(tmp / "work"), tmp, operations, PROFILES[shape])
