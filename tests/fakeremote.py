"""An in-memory session for the fast tier: the remote seam's surface over a local directory.

`FakeRemote` answers what `baifs.fs.remote.RemoteTree` answers, without
HTTP: its ``/home/work`` is a directory of this machine, listings are
``lstat`` of it, uploads write into it, downloads are tar archives of it,
and scripts (flush scripts, ranged reads, aliases) really run, with ``sh``,
in it, one at a time as a session's execution slot allows. So the planner,
the overlay, the sync engine and the namespace rules are tested against a
session that behaves like one, in milliseconds per flush.

What it leaves out on purpose (the HTTP tier tests those): request shapes,
limits and retries (`baifs.api`), the supervisor's inbox (no run holds the
slot here), and release profiles. Faults are injected at the seam, as
what a real session's failures raise, before or after the session acted:
`fail` for the next calls of one kind, `chaos` for a share of all calls
(seeded), `down` for every call while it lasts. A run whose answer is lost
after it ran stays unconcluded until the slot is taken again, as the
executor concludes it, so the sync engine meets the unresolved flush it
meets in a real session.
"""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import tarfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from baifs.api.client import RemoteHealth
from baifs.api.errors import EndpointUnreachable, RemotePathError, ServerError, SessionBusy
from baifs.fs import scratch
from baifs.fs.model import Entry
from baifs.fs.remote import BatchOutcome, BatchSteps, ConsoleSink, Outgoing
from baifs.fs.supervisor import Inbox, Supervisor


@dataclass
class Fault:
    """The next ``count`` calls of ``kind`` fail; ``after`` once the session acted on them."""

    kind: str
    count: int = 1
    after: bool = False


@dataclass
class FakeRemote:
    work: Path
    scratch: scratch.Scratch = field(default_factory=scratch.Scratch)
    health: RemoteHealth = field(default_factory=RemoteHealth)
    terminated: str | None = None
    #: calls per kind (list, upload, download, run), as `baifs status` counts requests.
    calls: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    #: every call fails (the session's server is down) while this is set.
    down: bool = False
    #: a run whose answer was lost after it ran: concluded when the slot is next taken.
    unconcluded_run: str | None = None

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(self, self.scratch)  # type: ignore[arg-type]
        self._slot = trio.Lock()
        self._current: str | None = None
        self._chaos: tuple[float, random.Random] | None = None

    # -- faults ---------------------------------------------------------------------

    def fail(self, kind: str, count: int = 1, *, after: bool = False) -> None:
        self.faults.append(Fault(kind, count, after))

    def chaos(self, rate: float | None, seed: int = 0) -> None:
        """A share ``rate`` of the calls fail from now on, half before the session acted (None: none)."""
        self._chaos = None if rate is None else (rate, random.Random(seed))

    def _call(self, kind: str, *, after: bool = False) -> None:
        """Count a call of ``kind``; raise if a fault says so at this moment (before or after)."""
        if not after:
            self.calls[kind] += 1
        failing = self.down
        for fault in self.faults:
            if not failing and fault.kind == kind and fault.after == after and fault.count > 0:
                fault.count -= 1
                failing = True
        if not failing and self._chaos is not None:
            rate, draw = self._chaos
            failing = draw.random() < rate / 2
        if failing:
            self.health.failed(f"{kind}: injected")
            raise EndpointUnreachable(f"{kind}: the injected fault", delivered=after)
        self.health.answered()

    def _path(self, path: bytes) -> Path:
        return self.work / os.fsdecode(path) if path else self.work

    # -- what the session holds -----------------------------------------------------

    async def list_dir(self, path: bytes) -> list[Entry] | None:
        self._call("list")
        await trio.lowlevel.checkpoint()
        directory = self._path(path)
        try:
            names = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return None
        entries = []
        for name in names:
            try:
                info = os.lstat(directory / name)
            except FileNotFoundError:
                continue
            entries.append(
                Entry(
                    os.fsencode(name),
                    info.st_mode,
                    info.st_size,
                    info.st_ctime_ns,
                    info.st_mtime_ns,
                    info.st_atime_ns,
                )
            )
        self._call("list", after=True)
        return entries

    async def list_scratch(self) -> dict[bytes, int]:
        entries = await self.list_dir(scratch.ROOT)
        return {entry.name: entry.mtime_ns for entry in entries or ()}

    async def download(self, paths: Sequence[bytes]) -> list[memoryview]:
        self._call("download")
        await trio.lowlevel.checkpoint()
        archives = []
        for path in paths:
            full = self._path(path)
            if not os.path.lexists(full):
                raise RemotePathError(errno.ENOENT, os.fsdecode(path), "not in the session")
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                archive.add(full, arcname=os.path.basename(full), recursive=False)
            archives.append(memoryview(buffer.getvalue()))
        self._call("download", after=True)
        return archives

    async def read_files(self, paths: Sequence[bytes]) -> list[bytes]:
        self._call("download")
        await trio.lowlevel.checkpoint()
        try:
            return [self._path(path).read_bytes() for path in paths]
        except FileNotFoundError as error:
            raise RemotePathError(errno.ENOENT, str(error.filename), "not in the session") from None

    async def read_link(self, path: bytes) -> bytes | None:
        self._call("download")
        await trio.lowlevel.checkpoint()
        full = self._path(path)
        if not os.path.lexists(full):
            raise RemotePathError(errno.ENOENT, os.fsdecode(path), "not in the session")
        return os.fsencode(os.readlink(full)) if full.is_symlink() else None

    # -- putting content there --------------------------------------------------------

    async def upload(
        self,
        files: Sequence[Outgoing],
        *,
        verify: bool = False,
        on_batch: Callable[[Sequence[Outgoing]], None] | None = None,
    ) -> dict[bytes, list[Entry]]:
        for start in range(0, len(files), 20):
            batch = files[start : start + 20]
            self._call("upload")
            await trio.lowlevel.checkpoint()
            for item in batch:
                self._write(item.path, item.read())
            self._call("upload", after=True)
            if on_batch is not None:
                on_batch(batch)
        if not verify:
            return {}
        parents = sorted({item.path.rpartition(b"/")[0] for item in files})
        return {parent: await self.list_dir(parent) or [] for parent in parents}

    async def send(self, files: Sequence[tuple[bytes, bytes]]) -> None:
        self._call("upload")
        for path, data in files:
            self._write(path, data)

    def _write(self, path: bytes, data: bytes) -> None:
        """As the agent writes an upload: parents made, an existing file overwritten in place."""
        target = self._path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
        except OSError as error:  # the agent's write failed: a 500 with its words
            raise ServerError(500, title="Internal server error", msg=str(error), endpoint="upload") from None

    # -- scripts and the execution slot -------------------------------------------------

    def inbox(self) -> Inbox | None:
        return self.supervisor.available()

    async def run(
        self, script: str, sink: ConsoleSink, *, purpose: str, queue_timeout: float
    ) -> BatchOutcome:
        async with self.slot(queue_timeout, purpose):
            run_id = f"fake-{self.calls['run']}"
            return await self.run_held(BatchSteps(exec=script), sink, run_id, purpose=purpose)

    @asynccontextmanager
    async def slot(self, queue_timeout: float = float("inf"), purpose: str = "") -> AsyncIterator[None]:
        with trio.move_on_after(queue_timeout):
            await self._slot.acquire()
        if not self._slot.locked() or self._slot.statistics().owner is not trio.lowlevel.current_task():
            raise SessionBusy(f"the session is still busy with {self._current} after {queue_timeout:.0f} s")
        self.unconcluded_run = None  # read to its end before anyone else runs, as the executor does
        try:
            yield
        finally:
            self._slot.release()

    async def run_held(self, steps: Any, sink: ConsoleSink, run_id: str, *, purpose: str) -> BatchOutcome:
        self._call("run")
        self._current = self.unconcluded_run = run_id
        try:
            with trio.CancelScope(shield=True):  # once sent, the run goes on whatever its caller does
                result = await trio.run_process(
                    ["sh", "-c", steps.script()],
                    cwd=self.work,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            # A caller cancelled meanwhile, or a fault here, loses the answer: the run stays unconcluded.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._call("run", after=True)
        finally:
            self._current = None
        self.unconcluded_run = None
        await sink("stdout", result.stdout.decode("utf-8", "surrogateescape"))
        await sink("stderr", result.stderr.decode("utf-8", "surrogateescape"))
        return BatchOutcome(run_id, result.returncode)

    @property
    def busy(self) -> bool:
        return self._slot.locked()

    @property
    def current_run_id(self) -> str | None:
        return self._current

    async def interrupt(self) -> None:
        pass

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def settle(self) -> None:
        pass

    def adopt(self, run_id: str) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {
            "remote": {"terminated": None, **self.health.as_dict(), "rate": {}, "unconcluded_run": None},
            "slot": {"run": self._current, "inbox": False},
            "session_api": {"requests": dict(self.calls)},
            "phase_behaviour": "none",
            "upload_names": "relative",
        }


def tree(root: Path) -> dict[str, tuple]:
    """Every object under ``root`` but the scratch directory: type, mode bits, content or target."""
    found: dict[str, tuple] = {}
    for directory, subdirs, files in os.walk(root):
        if os.path.relpath(directory, root).split(os.sep)[0] == scratch.ROOT.decode():
            continue
        for name in subdirs + files:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            if relative == scratch.ROOT.decode():
                continue
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("dir", stat.S_IMODE(info.st_mode))
            elif stat.S_ISFIFO(info.st_mode):
                found[relative] = ("fifo", stat.S_IMODE(info.st_mode))
            else:
                found[relative] = ("file", stat.S_IMODE(info.st_mode), Path(full).read_bytes())
    return found
