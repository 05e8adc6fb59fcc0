"""The fast tier: crashes, recovery and scratch over the in-memory session, one case at a time.

Each case is a path where a mount could lose what was written, or leave
something behind in the session, found by reviewing the remote seam and the
overlay's owner against the code they replaced. They run over
`fakeremote.FakeRemote` (a directory whose scripts really run) and
`MountCore`, as ``baifs mount`` builds it; a crash is the daemon's memory
lost with its state directory kept.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fakeremote import FakeRemote
from ops import PROFILES, Mount, drive_rename, drive_write, resolve, view

from baifs.fs.core import MountCore, MountOptions
from baifs.fs.supervisor import InboxClosed

pytestmark = pytest.mark.fast


@dataclass
class Session:
    """An in-memory session; each life of a mount on it gets a `FakeRemote` of its directory."""

    work: Path
    options: dict = field(default_factory=lambda: {"write_back": 3600, "dir_ttl": 3600})
    remotes: list[FakeRemote] = field(default_factory=list)
    remote_class: type[FakeRemote] = FakeRemote

    def core(self, state: Path, cache: Path, options: MountOptions) -> MountCore:
        self.remotes.append(self.remote_class(self.work))
        return MountCore(self.remotes[-1], state, cache, MountOptions(**self.options))


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as opened:
        yield opened
        opened.cancel_scope.cancel()


async def life(nursery: trio.Nursery, session: Session, state: Path, number: int) -> Mount:
    return await Mount.start(nursery, session, state, state.parent / f"cache{number}", PROFILES["plain"])  # type: ignore[arg-type]


def session_with(tmp_path: Path, files: dict[str, bytes], **settings: object) -> tuple[Session, Path]:
    """A session whose home holds `files` (paths with their parents), and its home."""
    work = tmp_path / "work"
    work.mkdir()
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    return Session(work, **settings), work  # type: ignore[arg-type]


def scratch_left(work: Path) -> list[str]:
    return sorted(os.listdir(work / ".baifs-tmp")) if (work / ".baifs-tmp").exists() else []


# -- the inbox's results ----------------------------------------------------------


async def test_results_read_after_the_inbox_closed_are_removed_by_the_next_script(tmp_path: Path) -> None:
    """A request finished as its run ended: its results are read once the inbox closed, and the
    next flush removes them (they used to wait for an inbox that never came)."""
    remote = FakeRemote(tmp_path / "work")
    supervisor = remote.supervisor
    inbox = supervisor.open("a" * 32)
    box, area = inbox.box.decode(), tmp_path / "work" / ".baifs-tmp"
    area.mkdir()

    async def loop_takes_the_request_then_the_run_ends() -> None:
        while not (area / f"{box}.req.0").exists():
            await trio.sleep(0.01)
        (area / f"{box}.req.0").unlink()
        for kind, text in (("out", "hi\n"), ("err", ""), ("code", "0\n")):
            (area / f"{box}.{kind}.0").write_text(text)
        supervisor.close(inbox, ended=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop_takes_the_request_then_the_run_ends)
        result = await inbox.request("echo hi")
    assert result.stdout == "hi\n" and remote.scratch.has_litter
    assert sorted(remote.scratch.take_litter()) == [
        f".baifs-tmp/{box}.{k}.0".encode() for k in ("code", "err", "out")
    ]


async def test_results_a_request_was_to_remove_stay_litter_when_it_never_ran(tmp_path: Path) -> None:
    remote = FakeRemote(tmp_path / "work")
    supervisor = remote.supervisor
    inbox = supervisor.open("b" * 32)
    box, area = inbox.box.decode(), tmp_path / "work" / ".baifs-tmp"
    area.mkdir()
    earlier = [f".baifs-tmp/{box}.{kind}.9".encode() for kind in ("out", "err", "code")]
    remote.scratch.note_results(earlier)  # read before: request 0 carries their removal

    async def the_run_ends_before_its_loop_takes_it() -> None:
        while not (area / f"{box}.req.0").exists():
            await trio.sleep(0.01)
        supervisor.close(inbox, ended=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(the_run_ends_before_its_loop_takes_it)
        with pytest.raises(InboxClosed):
            await inbox.request("true")
    assert set(earlier) <= set(remote.scratch.take_litter())


# -- recovery ------------------------------------------------------------------------


class SlowListings(FakeRemote):
    """A session whose listings take a third of a second (a busy agent)."""

    async def list_dir(self, path: bytes):  # type: ignore[no-untyped-def]
        await trio.sleep(0.3)
        return await super().list_dir(path)


async def test_recovery_keeps_files_whose_pending_change_is_only_a_mode(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Recovery longer than the listing TTL listed directories again while their files were out of
    the tree, made second nodes for them, and then doomed the files (the next flush removed them)."""
    session, work = session_with(tmp_path, {f"d{index}/f": b"precious" for index in range(3)})
    state = tmp_path / "state"
    first = await life(nursery, session, state, 0)
    for index in range(3):
        await first.fs.setattr(await resolve(first.fs, f"d{index}/f"), mode=0o600)
    await first.core.overlay.save_checkpoint()  # as any flush of other changes does
    first.crash()
    session.options, session.remote_class = {"write_back": 3600, "dir_ttl": 0.5}, SlowListings
    second = await life(nursery, session, state, 1)
    assert not second.core.namespace.doomed
    await second.fs.sync.flush_all()
    for index in range(3):
        assert (work / f"d{index}" / "f").read_bytes() == b"precious"
        assert (work / f"d{index}" / "f").stat().st_mode & 0o777 == 0o600
    await second.unmount()


async def test_a_file_made_before_a_crash_is_recovered_on_a_full_state_disk(
    tmp_path: Path, small_disk: Path, nursery: trio.Nursery
) -> None:
    """Replay writes nothing: a state disk still full when the next mount starts loses nothing."""
    session, work = session_with(tmp_path, {})
    state = small_disk / "state"
    first = await life(nursery, session, state, 0)
    await drive_write(first.fs, "x", (65, 3000))
    first.crash()
    (state / "journal.reserve").unlink(missing_ok=True)
    journal = state / "journal.jsonl"  # to a page's end: a record more needs a page the disk has not
    padding = -(journal.stat().st_size + len('{"op": "pad", "x": ""}\n')) % 4096
    with open(journal, "a") as handle:
        handle.write('{"op": "pad", "x": "' + " " * padding + '"}\n')
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle:  # full to the last byte, as when the daemon died
        for chunk in (65536, 4096, 64, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    second = await life(nursery, session, state, 1)
    assert second.core.sync.stats.recovered_changes and (await view(second.fs))["x"][2] == b"A" * 3000
    second.crash()
    filler.unlink()
    third = await life(nursery, session, state, 2)
    await third.fs.sync.flush_all()
    assert (work / "x").read_bytes() == b"A" * 3000
    await third.unmount()


async def test_a_write_to_an_unlinked_file_is_not_given_to_the_file_at_its_name(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    session, work = session_with(tmp_path, {"log": b"old log\n"})
    state = tmp_path / "state"
    mount = await life(nursery, session, state, 0)
    fs = mount.fs
    number, _ = await fs.handles.open(await resolve(fs, "log"), os.O_WRONLY)  # a writer holds it open
    await drive_write(fs, "other", (65, 3))
    await fs.sync.flush_all()  # its staging copy is clean now
    await fs.unlink(fs.namespace.root, b"log")  # someone removes the log and starts a new one
    await drive_write(fs, "log", (78, 5))
    await fs.handles.write(number, 8, b"a late line from the old writer\n")
    mount.crash()
    again = await life(nursery, session, state, 1)
    assert (await view(again.fs))["log"][2] == b"N" * 5
    await again.unmount()


class CutAfterTheMoveAside(FakeRemote):
    """The session's script dies right after it moved an object aside (a container restart, an
    OOM kill), and the answer that would have said so is lost."""

    cut = True

    def _write(self, path: bytes, data: bytes) -> None:
        if self.cut and path.endswith(b".sh"):
            data = re.sub(rb"(say 'ok 0'; )", rb"\1kill -9 $$; ", data, count=1)
            self.fail("run", after=True)
        super()._write(path, data)


async def test_an_object_a_crashed_script_left_aside_goes_where_it_was_renamed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """It used to be left in .baifs-tmp as litter, and the next flush removed it."""
    session, work = session_with(tmp_path, {"x": b"precious data"}, remote_class=CutAfterTheMoveAside)
    state = tmp_path / "state"
    first = await life(nursery, session, state, 0)
    await drive_rename(first.fs, "x", "y")
    with pytest.raises(Exception):  # noqa: B017 - the flush's outcome is lost, whichever way it says so
        await first.fs.sync.flush_all()
    assert not (work / "x").exists() and not (work / "y").exists()  # it is aside, in .baifs-tmp
    first.crash()
    CutAfterTheMoveAside.cut = False
    try:
        second = await life(nursery, session, state, 1)
        assert (await view(second.fs))["y"][2] == b"precious data"
        await second.fs.sync.flush_all()
        assert (work / "y").read_bytes() == b"precious data" and not scratch_left(work)
        await second.unmount()
    finally:
        CutAfterTheMoveAside.cut = True


async def test_write_back_reads_an_unknown_outcome_without_waiting_for_a_change(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A flush someone asked for (baifs sync) lost its answer: write-back reads its outcome on its
    own, so listings soon conclude again from what they see (a directory another writer removed)."""
    session, work = session_with(tmp_path, {}, options={"write_back": 0.2, "dir_ttl": 0.5})
    (work / "d" / "sub").mkdir(parents=True)
    state = tmp_path / "state"
    mount = await life(nursery, session, state, 0)
    fs = mount.fs
    await view(fs)
    sub = await resolve(fs, "d/sub")  # a shell's working directory, say
    fs.sync.scratch.note_litter([b".baifs-tmp/read-0123456789ab"])  # what a ranged read leaves
    session.remotes[-1].fail("run", after=True)
    with pytest.raises(Exception):  # noqa: B017 - its outcome is not known
        await fs.flush_everything()  # baifs sync: a script that removes the litter, and nothing changed here
    assert fs.sync.unresolved is not None
    shutil.rmtree(work / "d")
    await wait_until(lambda: fs.sync.unresolved is None, 10)
    fs.listings.expire()
    with pytest.raises(Exception):  # noqa: B017 - gone, as the session says
        await fs.list_children(sub)
    await mount.unmount()


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
