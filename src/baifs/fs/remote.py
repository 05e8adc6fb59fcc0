"""The remote seam: the only part of the file system that talks to the session.

It opens the session (`open_session`: the endpoint, the keys, the session
found or created and followed until it runs) and then serves it as a tree
(`RemoteTree`).

Above this module every path is bytes relative to /home/work (``b""`` is
/home/work itself), as the tree, the journal and the shell scripts hold
them; the session API takes text. The conversion happens here and nowhere
else (`_text`, `_name`): a name whose bytes are not UTF-8 travels with
surrogate escapes where the API can carry it, and where it cannot (a
manager hands request paths to msgpack or yarl, which refuse or rewrite
those bytes) it is listed and downloaded through an alias one script makes
in the scratch area: a relative symlink for a listing (the agent's scan
follows the final link), a hard link for a download (an archive holds a
symlink as itself; a copy where the file is on another file system).

It also decides where a script of the mount runs (`run`): through the
inbox of the mount's own run while that run holds the session's one
execution slot (`supervisor`), otherwise in the slot; and it holds the slot
itself (`slot`, `run_held`) for the flushes and runs that must keep it
across several steps.

Invariants: a UTF-8 path goes to the API as it is, with no extra request;
an alias is litter (`scratch.Scratch`) only once the request that used it is
answered; "not there" is an answer (`list` returns None), every other
failure an exception of `baifs.api.errors`, as the client raised it.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..api.archive import single_member
from ..api.batch import BatchExecutor, BatchOutcome, BatchSteps, ComposedSteps, ConsoleSink, RunRecorder
from ..api.client import (
    MAX_DOWNLOAD_PATHS,
    MAX_UPLOAD_BYTES,
    Connection,
    RemoteHealth,
    SessionClient,
    UploadFile,
)
from ..api.errors import (
    AuthenticationFailed,
    EndpointUnreachable,
    RemotePathError,
    SessionNotFound,
    UploadNotApplied,
)
from ..api.listing import RemoteEntry
from ..config import Credentials
from ..errors import BaifsError
from . import scratch
from .model import Entry
from .shell import ShellScript, is_utf8
from .supervisor import Inbox, InboxClosed, Supervisor

log = logging.getLogger(__name__)

__all__ = [
    "MAX_DOWNLOAD_PATHS",
    "MAX_UPLOAD_BYTES",
    "BatchOutcome",
    "BatchSteps",
    "ConsoleSink",
    "Entry",
    "Outgoing",
    "Remote",
    "RemoteTree",
    "UploadsMissing",
]

#: How long an alias's script may wait for the execution slot.
ALIAS_QUEUE_TIMEOUT = 20.0
LIVE_STATES = ("RUNNING", "RUNNING_DEGRADED")
#: A session on its way to RUNNING (the manager's SessionStatus before RUNNING).
STARTING_STATES = ("PENDING", "SCHEDULED", "PREPARING", "PULLING", "PREPARED", "CREATING")
#: How long ``baifs mount --create`` waits for a new session to run (``--create-timeout``).
CREATE_TIMEOUT = 600.0
#: The longest pause between two looks at a starting session (each is a request of the keypair's).
START_POLL_MAX = 5.0
#: How often a start that goes on is reported when nothing changes.
START_SAY_EVERY = 15.0
#: How long opening a session waits for the endpoint to answer before it gives up.
OPEN_PATIENCE = 20.0

#: Whether the API can carry a path as it is: UTF-8 (what the shell scripts also ask).
nameable = is_utf8


def _text(path: bytes) -> str:
    """A path as the API carries it (the one conversion to text)."""
    return path.decode("utf-8", "surrogateescape")


def _name(text: str) -> bytes:
    """A name or path the API gave back (the one conversion from text)."""
    return text.encode("utf-8", "surrogateescape")


def _entry(remote: RemoteEntry) -> Entry:
    return Entry(
        _name(remote.name), remote.mode, remote.size, remote.ctime_ns, remote.mtime_ns, remote.atime_ns
    )


@dataclass(frozen=True)
class Outgoing:
    """One file to upload: where it goes, its size, and how to read it when its request is built."""

    path: bytes
    size: int
    read: Callable[[], bytes] = field(repr=False)

    @classmethod
    def of(cls, path: bytes, data: bytes) -> Outgoing:
        return cls(path, len(data), lambda: data)


class UploadsMissing(BaifsError):
    """Uploads a verifying listing did not show where they were sent (a virtual folder took them)."""

    def __init__(self, paths: list[bytes], error: UploadNotApplied) -> None:
        super().__init__(str(error))
        self.paths = paths


class SessionUnavailable(BaifsError):
    """The session cannot be reached, found or started; the message says why and what to do."""


async def open_session(
    credentials: Credentials,
    name: str,
    *,
    create_image: str | None = None,
    create_timeout: float = CREATE_TIMEOUT,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[Connection, SessionClient, dict[str, Any]]:
    """Connect and find (or create) session ``name``, every failure a message a person can act on.

    The exchange is bounded by `OPEN_PATIENCE`: an endpoint that takes the
    connection and never answers fails with a message naming the request it
    did not answer. A session that is still starting (a new one whose image
    is pulled) is then followed until it runs, for at most ``create_timeout``
    seconds, telling ``progress`` where it is.
    """
    endpoint = credentials.endpoint
    connection = Connection(credentials)
    awaiting = "GET / (the manager's version)"
    try:
        with trio.move_on_after(OPEN_PATIENCE) as patience:
            await connection.negotiate()
            if create_image:
                awaiting = f"the creation of session {name!r}"
                created = await connection.create_session(name, create_image)
                session = connection.session(created["sessionId"])
            else:
                session = connection.session(name)
            awaiting = f"the information of session {name!r}"
            info = await session.info()
        if patience.cancelled_caught:
            raise SessionUnavailable(
                f"{endpoint} did not answer {awaiting} within {OPEN_PATIENCE:.0f} s; check that"
                " BACKEND_ENDPOINT is the manager's address and that the manager is up"
            )
    except EndpointUnreachable as error:
        await connection.aclose()
        raise SessionUnavailable(f"cannot reach the endpoint {endpoint}: {error}") from error
    except AuthenticationFailed as error:
        await connection.aclose()
        raise SessionUnavailable(
            f"{endpoint} rejected the access key {credentials.access_key} "
            f"({error.msg or error.title}); check BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY or your profile"
        ) from error
    except SessionNotFound as error:
        await connection.aclose()
        raise SessionUnavailable(
            f"no session {name!r} at {endpoint}; "
            "check 'backend.ai session list', or create it with --create IMAGE"
        ) from error
    except BaifsError:
        await connection.aclose()
        raise
    try:
        info = await _until_running(name, session, info, create_timeout, progress)
    except BaifsError:
        await connection.aclose()
        raise
    return connection, session, info


async def _until_running(
    name: str,
    session: SessionClient,
    info: dict[str, Any],
    create_timeout: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The session's info once it is RUNNING; `SessionUnavailable` if it ends otherwise or takes too long."""
    started = trio.current_time()
    pause = 1.0
    said, said_at = "", -math.inf
    while True:
        status = str(info.get("status", "UNKNOWN"))
        if status in LIVE_STATES:
            return info
        waited = trio.current_time() - started
        if status not in STARTING_STATES:
            raise SessionUnavailable(f"session {name!r} is {status}, not RUNNING; it cannot be mounted")
        if waited > create_timeout:
            raise SessionUnavailable(
                f"session {name!r} is still {status} after {waited:.0f} s; it may start later: "
                f"mount it then, or wait longer with --create-timeout SECONDS"
            )
        if status != said or waited - said_at >= START_SAY_EVERY:  # each change, and now and then
            doing = {"PULLING": "pulling its image", "PREPARING": "preparing its container"}.get(
                status, "starting"
            )
            line = f"session {name!r} is {status} ({doing}), {waited:.0f} s"
            progress(line)
            log.info("%s", line)
            said, said_at = status, waited
        await trio.sleep(pause)
        pause = min(pause * 1.5, START_POLL_MAX)
        info = await session.info()


class Remote(Protocol):
    """The session as the parts of a mount use it, all paths bytes: `RemoteTree` for a real
    session, and the fast tier's in-memory one (``tests/fakeremote.py``)."""

    scratch: scratch.Scratch
    supervisor: Supervisor

    @property
    def health(self) -> RemoteHealth: ...

    @property
    def terminated(self) -> str | None: ...

    @property
    def busy(self) -> bool: ...

    @property
    def current_run_id(self) -> str | None: ...

    @property
    def unconcluded_run(self) -> str | None: ...

    async def list_dir(self, path: bytes) -> list[Entry] | None: ...

    async def list_scratch(self) -> dict[bytes, int]: ...

    async def download(self, paths: Sequence[bytes]) -> list[memoryview]: ...

    async def read_files(self, paths: Sequence[bytes]) -> list[bytes]: ...

    async def read_link(self, path: bytes) -> bytes | None: ...

    async def upload(
        self,
        files: Sequence[Outgoing],
        *,
        verify: bool = False,
        on_batch: Callable[[Sequence[Outgoing]], None] | None = None,
    ) -> dict[bytes, list[Entry]]: ...

    async def send(self, files: Sequence[tuple[bytes, bytes]]) -> None: ...

    def inbox(self) -> Inbox | None: ...

    async def run(
        self, script: str, sink: ConsoleSink, *, purpose: str, queue_timeout: float
    ) -> BatchOutcome: ...

    def slot(
        self, queue_timeout: float = math.inf, purpose: str = ""
    ) -> AbstractAsyncContextManager[None]: ...

    async def run_held(
        self, steps: ComposedSteps, sink: ConsoleSink, run_id: str, *, purpose: str
    ) -> BatchOutcome: ...

    async def interrupt(self) -> None: ...

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    async def settle(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class RemoteTree:
    """The session's /home/work, its execution slot and the mount's scripts, in bytes paths."""

    def __init__(self, session: SessionClient, runs: RunRecorder | None = None) -> None:
        self._session = session
        self._executor = BatchExecutor(session, runs=runs)
        self.scratch = scratch.Scratch()
        self.supervisor = Supervisor(self, self.scratch)
        self._executor.liveness = self.supervisor.heartbeat

    def adopt(self, run_id: str) -> None:
        """A run an earlier process left going: it is concluded before the next run starts."""
        self._executor.adopt(run_id)

    # -- what the session holds -------------------------------------------------

    async def list_dir(self, path: bytes) -> list[Entry] | None:
        """One directory level, whatever bytes its path holds; None where nothing (or no directory) is."""
        try:
            if nameable(path):
                entries = await self._session.list_dir(_text(path))
            else:
                alias = scratch.alias(scratch.new_token())
                with self.scratch.using(alias):
                    link = b"../" * (scratch.ROOT.count(b"/") + 1) + path
                    await self._make_alias(path, alias, "ln -s -- {target} {alias}", link)
                    entries = await self._session.list_dir(_text(alias))
        except RemotePathError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        return [_entry(entry) for entry in entries]

    async def list_scratch(self) -> dict[bytes, int]:
        """The names in the scratch directory and their mtimes (none while it does not exist)."""
        entries = await self.list_dir(scratch.ROOT)
        return {entry.name: entry.mtime_ns for entry in entries or ()}

    async def download(self, paths: Sequence[bytes]) -> list[memoryview]:
        """Archives of up to 5 paths, in order, whatever bytes they hold (a script for each alias)."""
        if all(nameable(path) for path in paths):
            return await self._session.download([_text(path) for path in paths])
        with ExitStack() as held:  # each alias is in use until the download is answered
            names = []
            for path in paths:
                if nameable(path):
                    names.append(path)
                    continue
                alias = scratch.alias(scratch.new_token())
                held.enter_context(self.scratch.using(alias))
                await self._make_alias(
                    path, alias, "ln -f -- {target} {alias} 2>/dev/null || cp -p -- {target} {alias}"
                )
                names.append(alias)
            return await self._session.download([_text(name) for name in names])

    async def read_files(self, paths: Sequence[bytes]) -> list[bytes]:
        """The content of up to 5 files (each a tar of one member)."""
        return [single_member(archive)[1] for archive in await self.download(paths)]

    async def read_link(self, path: bytes) -> bytes | None:
        """A symlink's target, from its archive entry; None if ``path`` is not a symlink now."""
        member, _ = single_member((await self.download([path]))[0])
        return _name(member.linkname) if member.issym() else None

    # -- putting content there --------------------------------------------------

    async def upload(
        self,
        files: Sequence[Outgoing],
        *,
        verify: bool = False,
        on_batch: Callable[[Sequence[Outgoing]], None] | None = None,
    ) -> dict[bytes, list[Entry]]:
        """Any number of files, in batches of 20; the listings that verified them, by parent.

        A listing verifies where ``verify`` asks for it or the manager's 204
        proves nothing (`UploadsMissing` names what did not arrive).
        """
        sent = {_text(item.path): item for item in files}

        def batch_sent(batch: Sequence[UploadFile]) -> None:
            if on_batch is not None:
                on_batch([sent[item.name] for item in batch])

        try:
            listings = await self._session.upload_all(
                [UploadFile(name, item.size, item.read) for name, item in sent.items()],
                on_batch=batch_sent,
                verify=verify,
            )
        except UploadNotApplied as error:
            raise UploadsMissing([_name(path) for path in error.paths], error) from error
        return {_name(parent): [_entry(e) for e in entries] for parent, entries in listings.items()}

    async def send(self, files: Sequence[tuple[bytes, bytes]]) -> None:
        """Up to 20 small files (path, content) in one request, never verified: what reads them
        checks that they arrived (a run, an inbox)."""
        await self._session.upload([UploadFile.of(_text(path), data) for path, data in files], verify=False)

    # -- scripts and the execution slot -----------------------------------------

    def inbox(self) -> Inbox | None:
        """The inbox a script goes to now, if the mount's own run holds the execution slot."""
        return self.supervisor.available()

    async def run(
        self, script: str, sink: ConsoleSink, *, purpose: str, queue_timeout: float
    ) -> BatchOutcome:
        """Run a script of the mount: through the inbox of the mount's going run, else in the slot
        (`SessionBusy` once ``queue_timeout`` passed waiting for it); while it waits for the slot,
        an inbox that opens takes the script (`Supervisor.take_slot`)."""
        deadline = trio.current_time() + queue_timeout
        while True:
            inbox = self.inbox()
            if inbox is not None:
                try:
                    result = await inbox.request(script)
                except InboxClosed:
                    log.debug("the run ended before it took the script; waiting for the slot instead")
                else:
                    await sink("stdout", result.stdout)
                    await sink("stderr", result.stderr)
                    return BatchOutcome(f"inbox {inbox.box.decode()}", result.exit_code, result.complete)
            async with AsyncExitStack() as held:
                left = max(0.0, deadline - trio.current_time())
                if await self.supervisor.take_slot(held, left, purpose):
                    return await self._executor.run_held(BatchSteps(exec=script), sink, purpose=purpose)

    @asynccontextmanager
    async def slot(self, queue_timeout: float = math.inf, purpose: str = "") -> AsyncIterator[None]:
        """Hold the session's one execution slot (see `BatchExecutor.slot`)."""
        async with self._executor.slot(queue_timeout, purpose):
            yield

    async def run_held(
        self, steps: ComposedSteps, sink: ConsoleSink, run_id: str, *, purpose: str
    ) -> BatchOutcome:
        """Run ``steps`` in the slot the caller holds."""
        return await self._executor.run_held(steps, sink, run_id, purpose=purpose)

    @property
    def busy(self) -> bool:
        """Whether something holds the execution slot."""
        return self._executor.busy

    @property
    def current_run_id(self) -> str | None:
        return self._executor.current_run_id

    @property
    def unconcluded_run(self) -> str | None:
        """A run whose end the session has not given yet (concluded before the next one starts)."""
        return self._executor.unconcluded_run

    async def interrupt(self) -> None:
        """Ask the session to interrupt the run that holds the slot."""
        await self._executor.interrupt()

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Where runs are concluded after their caller has its result; until cancelled."""
        await self._executor.run_background(task_status=task_status)

    async def settle(self) -> None:
        """Read the last run to its end, before the process ends."""
        await self._executor.settle()

    # -- what is known of the session -------------------------------------------

    @property
    def health(self) -> RemoteHealth:
        return self._session.connection.health

    @property
    def terminated(self) -> str | None:
        """Why the session is known to be gone for good, or None."""
        return self._session.terminated

    def status(self) -> dict[str, Any]:
        """The session's side of ``baifs status``."""
        connection = self._session.connection
        return {
            "remote": {
                "terminated": self._session.terminated,
                **connection.health.as_dict(),
                "rate": connection.rate.as_dict(),
                "unconcluded_run": self._executor.unconcluded_run,
            },
            "slot": {**self._executor.slot_state(), "inbox": self.supervisor.inbox is not None},
            "session_api": connection.stats.as_dict(),
            "phase_behaviour": self._executor.phase_behaviour,
            "upload_names": "absolute" if self._session.absolute_upload_names else "relative",
        }

    # -- aliases --------------------------------------------------------------------

    async def _make_alias(self, path: bytes, alias: bytes, command: str, target: bytes | None = None) -> None:
        """One script that makes ``alias`` for ``path`` by ``command`` (pointing at ``target``)."""
        shell = ShellScript()
        shell.raw(f"mkdir -p -- {shell.word(scratch.ROOT)} || exit 1")
        shell.raw(f"[ -e {shell.word(path)} ] || [ -L {shell.word(path)} ] || exit 2")
        shell.raw(command.format(target=shell.word(target or path), alias=shell.word(alias)) + " || exit 1")

        async def ignore(stream: str, text: str) -> None:
            pass

        outcome = await self.run(
            shell.render(), ignore, purpose="an alias", queue_timeout=ALIAS_QUEUE_TIMEOUT
        )
        if outcome.exit_code == 2:
            raise RemotePathError(errno.ENOENT, _text(path), "not in the session")
        if outcome.exit_code != 0:
            raise RemotePathError(
                errno.EIO, _text(path), f"no alias could be made (exit {outcome.exit_code})"
            )
