"""The fast tier: case tables of what a flush plans and what the session ends up holding.

Each case starts from a session's tree, applies operations through the
mount's `Filesystem` (built by `MountCore` over the in-memory session,
`fakeremote.FakeRemote`) and, alike, to a reference directory, then:

1. reads the plan (`flush.plan`, which changes nothing) and checks its shape:
   which uploads go straight to their names, which are staged, which
   objects move, how many removals, whether a script runs;
2. flushes (`SyncEngine.flush_all`: uploads, the script run by ``sh`` in the
   session's directory, then what the session confirmed recorded by the
   overlay) and checks that the session holds exactly the reference tree,
   nothing is pending, and what it cost in calls to the session.

mutagen tests its reconciler the same way, with tables of ancestor, alpha
and beta trees; here the session is the ancestor, the mount is alpha, and
the reference directory is the answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fakeremote import FakeRemote, tree
from ops import PROFILES, Mount, Reference, apply, differences

from baifs.errors import BaifsError
from baifs.fs.core import MountCore, MountOptions
from baifs.fs.flush import plan
from baifs.fs.profile import SessionProfile

pytestmark = pytest.mark.fast

BIG = 1_100_000  # over one upload's 1,048,575 bytes: sent in parts and assembled by the script


@dataclass(frozen=True)
class Shape:
    """What a plan holds."""

    direct: int = 0
    staged: int = 0
    moves: int = 0
    removals: int = 0
    script: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    #: the session's tree before: a file's content, or None for a directory (parents first).
    session: dict[str, bytes | None]
    operations: list[tuple]
    shape: Shape
    #: calls the flush makes to the session, by kind (only the kinds given are checked).
    calls: dict[str, int] = field(default_factory=dict)
    profile: str = "plain"


CASES = [
    Case(
        "a new file is one upload to its name",
        {},
        [("write", "a", (65, 17))],
        Shape(direct=1),
        {"upload": 1, "run": 0},
    ),
    Case(
        "new directories come with the upload of a file inside them: no mkdir",
        {},
        [("mkdir", "d"), ("mkdir", "d/a"), ("write", "d/a/b", (66, 3000))],
        Shape(direct=1),
        {"upload": 1, "run": 0},
    ),
    Case(
        "an editor's save (write a temporary file, rename it over) is one upload, no script",
        {"a": b"old"},
        [("write", "b", (67, 40)), ("rename", "b", "a")],
        Shape(direct=1),
        {"upload": 1, "run": 0},
    ),
    Case(
        "two files swapped through a third name: one script moves both",
        {"a": b"first", "b": b"second"},
        [("rename", "a", "d"), ("rename", "b", "a"), ("rename", "d", "b")],
        Shape(moves=2, script=True),
        {"upload": 1, "run": 1},  # the script travels as a file, so its report survives a lost answer
    ),
    Case(
        "a cycle of three renames lands every object",
        {"a": b"A", "b": b"B", "d": b"D"},
        [("rename", "a", "e"), ("rename", "d", "a"), ("rename", "b", "d"), ("rename", "e", "b")],
        Shape(moves=3, script=True),
        {"run": 1},
    ),
    Case(
        "exchanged directories keep what is inside them",
        {"a": None, "a/a": b"in a", "d": None, "d/e": b"in d"},
        [("exchange", "a", "d")],
        Shape(moves=2, script=True),
        {"run": 1},
    ),
    Case(
        "a tree removed here is removed by one script, each object as the mount knew it",
        {"d": None, "d/a": None, "d/a/b": b"x", "d/e": b"y"},
        [("unlink", "d/a/b"), ("rmdir", "d/a"), ("unlink", "d/e"), ("rmdir", "d")],
        Shape(removals=4, script=True),
        {"upload": 0, "run": 1},
    ),
    Case(
        "a file moved and then written is uploaded at its new name, its old object removed",
        {"a": b"old"},
        [("rename", "a", "b"), ("write", "b", (68, 10))],
        Shape(direct=1, removals=1, script=True),
        {"upload": 1, "run": 1},
    ),
    Case(
        "a directory moved takes its files; a new file in it goes where the directory lands",
        {"d": None, "d/a": b"kept"},
        [("rename", "d", "b"), ("write", "b/e", (69, 5))],
        Shape(staged=1, moves=1, script=True),
        {"run": 1},
    ),
    Case(
        "a large file goes in parts and is assembled in the session",
        {},
        [("write", "a", (70, BIG))],
        Shape(staged=1, script=True),
        {"upload": 1, "run": 1},
    ),
    Case(
        "chmod, utime and a symlink need only the script",
        {"a": b"x"},
        [("chmod", "a", 0o600), ("utime", "a", 1_500_000_000), ("symlink", "b", "a")],
        Shape(script=True),
        {"upload": 0, "run": 1},
    ),
    Case(
        "a name a shell would misread travels staged and is placed by the quoted script",
        {},
        [("write", "we ird'$(x)", (71, 9))],
        Shape(direct=1),
        {"upload": 1},
    ),
    Case(
        "into a virtual folder content is staged and copied into place",
        {"d": None},
        [("write", "d/a", (72, 33)), ("write", "b", (73, 5))],
        Shape(staged=2, script=True),
        {"upload": 1, "run": 1},
        profile="placed",
    ),
    Case(
        "a file created and deleted before the flush never leaves this machine",
        {},
        [("write", "a", (74, 10)), ("unlink", "a")],
        Shape(),
        {"upload": 0, "run": 0},
    ),
]


def seed_session(work: Path, session: dict[str, bytes | None]) -> None:
    for path, data in session.items():
        if data is None:
            (work / path).mkdir(mode=0o755)
        else:
            (work / path).write_bytes(data)
            os.chmod(work / path, 0o644)


async def flush_case(tmp: Path, case: Case) -> None:
    work, ref_root = tmp / "work", tmp / "reference"
    for root in (work, ref_root):
        root.mkdir()
        seed_session(root, case.session)
    reference = Reference(ref_root)
    remote = FakeRemote(work)
    profile: SessionProfile = PROFILES[case.profile]

    class Session:
        work = remote.work

        def core(self, state: Path, cache: Path, options: MountOptions) -> MountCore:
            return MountCore(remote, state, cache, options)

    async with trio.open_nursery() as nursery:
        mount = await Mount.start(nursery, Session(), tmp / "state", tmp / "cache", profile)  # type: ignore[arg-type]
        fs = mount.fs
        for op in case.operations:
            expected, actual = reference.apply(op), await apply(fs, op)
            assert expected == actual == 0, f"{op}: reference errno {expected}, baifs {actual}"
        flush_plan = plan(fs.namespace, fs.sync.profile)
        shape = Shape(
            direct=sum(upload.direct for upload in flush_plan.uploads),
            staged=sum(not upload.direct for upload in flush_plan.uploads),
            moves=len(flush_plan.moves),
            removals=len(flush_plan.doomed),
            script=flush_plan.shell is not None,
        )
        assert shape == case.shape
        before = remote.calls.copy()
        await fs.sync.flush_all()
        spent = remote.calls - before
        assert not fs.namespace.pending_changes(), "left pending"
        assert not differences(tree(ref_root), tree(work)), "the session"
        for kind, count in case.calls.items():
            assert spent[kind] == count, f"{kind}: {spent[kind]} call(s), expected {count}"
        await mount.unmount()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_the_plan_and_what_the_session_holds_after_it(tmp_path: Path, case: Case) -> None:
    await flush_case(tmp_path, case)


async def test_a_mode_and_mtime_wait_for_their_file_when_its_placement_is_in_the_way(tmp_path: Path) -> None:
    """A chmod or touch of an object whose placement failed would change what is in the way: it is
    skipped (not a refusal), and lands with the object once the way is clear."""
    work, seconds = tmp_path / "work", 1_500_000_000
    remote = FakeRemote(work)

    class Session:
        def core(self, state: Path, cache: Path, options: MountOptions) -> MountCore:
            return MountCore(remote, state, cache, options)

    async with trio.open_nursery() as nursery:
        mount = await Mount.start(
            nursery, Session(), tmp_path / "state", tmp_path / "cache", PROFILES["plain"]
        )  # type: ignore[arg-type]
        fs = mount.fs
        assert await apply(fs, ("write", "b%c", (65, 9))) == 0  # '%': uploaded staged, placed by the script
        assert await apply(fs, ("chmod", "b%c", 0o600)) == 0
        assert await apply(fs, ("utime", "b%c", seconds)) == 0
        (work / "b%c").mkdir()
        (work / "b%c" / "in-the-way").write_text("the session's")
        with pytest.raises(BaifsError, match="a directory is in the way"):
            await fs.sync.flush_all()
        assert (work / "b%c").stat().st_mode & 0o777 == 0o755, "the obstacle's mode was changed"
        assert (work / "b%c").stat().st_mtime_ns != seconds * 10**9 + 123, "the obstacle's mtime was set"
        assert not fs.sync.refusals.keys() - {"place b%c"}, "a skipped step counted as refused"
        (work / "b%c" / "in-the-way").unlink()
        (work / "b%c").rmdir()
        await fs.sync.flush_all()
        placed = (work / "b%c").stat()
        assert (work / "b%c").read_bytes() == b"A" * 9
        assert placed.st_mode & 0o777 == 0o600 and placed.st_mtime_ns == seconds * 10**9 + 123
        await mount.unmount()
