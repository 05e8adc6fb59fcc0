"""Batch runs started from the mount: what a write to ``.run`` does, and the records behind ``.runs/``.

A write to ``.run`` is a *run request*: either a shell command (the exec
step) or a small TOML document with ``clean``, ``build`` and ``exec`` keys,
and ``cwd``, where the steps start (relative to ``/home/work``; without it,
the directory of the writer when it is inside the mount, else
``/home/work``). `parse_request` accepts or rejects it (`RunRejected` says
why; the FUSE layer answers EINVAL); `early_refusal` rejects at ``write``
what can never become valid, so that a shell's ``echo … > .run``, which
ignores errors of ``close``, sees the error. An accepted request becomes a `RunRecord` numbered
1, 2, 3, ... and queues for the session's execution slot, so runs go one at
a time and in order. A run then:

1. flushes everything pending in the mount while holding the slot (the
   barrier: a run sees everything written before it);
2. runs its steps as one batch execution, wrapped in a supervisor that
   serves the mount's own scripts while they go (`supervisor`), appending the console to
   ``output`` (both streams in arrival order), ``stdout`` and ``stderr`` as
   it arrives;
3. ends ``finished`` with its exit code, or ``failed`` with the cause (the
   barrier failed, the session stopped answering, the mount ended);
4. makes the mount look again: every listing expires and the kernel's
   cached attributes and names are dropped, so what the run changed shows
   at once.

Records live in ``<state>/runs/<number>/`` (``command``, ``status`` as
JSON, the three output files, ``exit_code`` once finished), survive a
remount, and only the newest ``keep`` are kept. A full disk never stops a
run that is going (that would leave it holding the session): output that
cannot be written is dropped and the record says so; a request that cannot
be recorded is refused with ENOSPC. A record left ``queued`` or
``running`` by a mount that ended is marked failed when the next mount loads
it (the run itself, if it was going, is concluded before the next one:
`remote.RemoteTree`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import secrets
import shutil
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from ..concurrency import keep_running
from ..errors import BaifsError
from ..files import replace_atomically
from ..timestamps import moment, stamp
from .kernel import KernelNotifier
from .listing import Listings
from .profile import ProfileKeeper
from .remote import BatchOutcome, BatchSteps, Remote
from .supervisor import SupervisedSteps, Supervisor
from .sync import SyncEngine

log = logging.getLogger(__name__)

STEP_KEYS = ("clean", "build", "exec")
REQUEST_KEYS = (*STEP_KEYS, "cwd")
#: A command longer than this could not reach the session's shell (one argument is capped at 128 KiB).
MAX_COMMAND_BYTES = 64 * 1024
RECORD_FILES = ("command", "status", "output", "stdout", "stderr", "exit_code")
#: Free space on the state disk a request needs besides its own bytes: its status, the start of its output.
RECORD_RESERVE = 64 * 1024
DEFAULT_KEEP = 100


class RunRejected(BaifsError):
    """A write to ``.run`` that is not a run request."""


class IncompleteRequest(RunRejected):
    """A request with no command (yet): refused at ``close``, but more bytes could mend it."""


class RunFailed(BaifsError):
    """A run could not be carried out; the message is the cause recorded in its status."""


class RunUnrecordable(BaifsError):
    """The state disk cannot take the record of a run (full, or gone): refused at ``write``."""


def session_directory(path: str) -> str:
    """A directory under /home/work as the runs' ``cwd``: relative, normalised; `RunRejected` if outside."""
    absolute = posixpath.normpath(posixpath.join("/home/work", path))
    if absolute != "/home/work" and not absolute.startswith("/home/work/"):
        raise RunRejected(f"cwd {path!r} is outside /home/work")
    return absolute[len("/home/work/") :] if absolute != "/home/work" else ""


def early_refusal(data: bytes) -> str | None:
    """Why a request being written can never become valid, or None (it may, once complete).

    Only what more bytes cannot mend: too long, a NUL, or a complete TOML
    document with a key or a value a request cannot have. An empty request,
    or a document without steps yet, may be the start of a valid one.
    """
    try:
        parse_request(data)
    except IncompleteRequest:
        return None
    except RunRejected as error:
        if b"\0" in data or len(data) > MAX_COMMAND_BYTES:
            return str(error)
        try:
            tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None  # not UTF-8 yet: the rest of a character may follow
        return str(error)
    return None


def parse_request(data: bytes) -> BatchSteps:
    """The steps a write to ``.run`` asks for: a TOML table of steps, or else one command."""
    if len(data) > MAX_COMMAND_BYTES:
        raise RunRejected(f"the request has {len(data):,} bytes; at most {MAX_COMMAND_BYTES:,} are allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunRejected("the request is not UTF-8 text") from None
    if "\0" in text:
        raise RunRejected("the request contains a NUL byte")
    if not text.strip():
        raise IncompleteRequest(
            "the request is empty: write a command, or a TOML table with clean, build and exec"
        )
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return BatchSteps(exec=text.strip())
    unknown = sorted(set(document) - set(REQUEST_KEYS))
    if unknown:
        raise RunRejected(
            f"unknown key(s) {', '.join(map(repr, unknown))}: a structured request has only "
            'clean, build, exec and cwd (to run a command that looks like TOML, write exec = "...")'
        )
    if not all(isinstance(document.get(key, ""), str) for key in REQUEST_KEYS):
        raise RunRejected("clean, build, exec and cwd must be strings")
    steps = BatchSteps(
        **{key: document.get(key, "").strip() for key in STEP_KEYS},
        cwd=session_directory(document.get("cwd", "")),
    )
    if not (steps.clean or steps.build or steps.exec):
        raise IncompleteRequest("every step is empty")
    return steps


def _document_keys(data: bytes) -> set[str]:
    try:
        return set(tomllib.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return set()


@dataclass
class RunRecord:
    number: int
    directory: Path
    command: str
    steps: BatchSteps
    state: str = "queued"
    exit_code: int | None = None
    run_id: str | None = None
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    #: why some output is missing from the record (a full disk, a lost answer), if it is.
    output_note: str | None = None
    #: open output files while the run goes (output, stdout, stderr).
    sinks: dict[str, IO[bytes]] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed")

    def status(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "state": self.state,
            "exit_code": self.exit_code,
            "run_id": self.run_id,
            "steps": {key: getattr(self.steps, key) for key in REQUEST_KEYS},
            "queued_at": stamp(self.queued_at),
            "started_at": stamp(self.started_at),
            "ended_at": stamp(self.ended_at),
            "error": self.error,
            "output_note": self.output_note,
        }

    def write_status(self) -> None:
        """Write the status (and the exit code, once finished); OSError if the disk cannot take it."""
        replace_atomically(self.directory / "status", (json.dumps(self.status(), indent=2) + "\n").encode())
        if self.state == "finished" and self.exit_code is not None:
            (self.directory / "exit_code").write_text(f"{self.exit_code}\n")

    def save(self) -> None:
        """`write_status`; a full disk keeps the older status and is logged."""
        try:
            self.write_status()
        except OSError as error:
            log.warning("run %d: cannot save its status (%s)", self.number, error)

    def append(self, stream: str, text: str) -> None:
        data = text.encode("utf-8", "surrogateescape")
        try:
            for name in ("output", stream):
                self.sinks[name].write(data)
                self.sinks[name].flush()
        except OSError as error:
            if self.output_note is None:
                log.warning("run %d: output is being dropped (%s)", self.number, error)
                self.output_note = f"output was dropped: {error.strerror or error}"

    @classmethod
    def load(cls, directory: Path) -> RunRecord:
        document = json.loads((directory / "status").read_text())
        steps = BatchSteps(**{key: document["steps"].get(key, "") for key in REQUEST_KEYS})
        record = cls(
            number=int(document["number"]),
            directory=directory,
            command=(directory / "command").read_text(errors="replace"),
            steps=steps,
            state=document["state"],
            exit_code=document["exit_code"],
            run_id=document["run_id"],
            queued_at=moment(document["queued_at"]) or 0.0,
            started_at=moment(document["started_at"]),
            ended_at=moment(document["ended_at"]),
            error=document["error"],
            output_note=document.get("output_note"),
        )
        return record


class RunManager:
    """Queues, carries out and remembers the mount's runs."""

    def __init__(
        self,
        remote: Remote,
        supervisor: Supervisor,
        sync: SyncEngine,
        listings: Listings,
        kernel: KernelNotifier,
        profiles: ProfileKeeper,
        directory: Path,
        *,
        keep: int = DEFAULT_KEEP,
    ) -> None:
        self.remote = remote
        self.supervisor = supervisor
        self.sync = sync
        self.listings = listings
        self.kernel = kernel
        self.profiles = profiles
        self.directory = directory
        self.keep = max(1, keep)
        self.records: dict[int, RunRecord] = {}
        #: why the last write to ``.run`` was refused (shown when ``.run`` is read).
        self.last_rejection: str | None = None
        self._nursery: trio.Nursery | None = None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()

    def _load(self) -> None:
        for entry in self.directory.iterdir():
            if not entry.name.isdigit() or not (entry / "status").exists():
                continue
            try:
                record = RunRecord.load(entry)
            except (OSError, ValueError, KeyError) as error:
                log.warning("run record %s is unreadable (%s); ignoring it", entry, error)
                continue
            if not record.done:
                record.state = "failed"
                record.error = "the mount ended before this run finished; its output may be incomplete"
                record.ended_at = record.ended_at or time.time()
                record.save()
            self.records[record.number] = record

    @property
    def latest(self) -> RunRecord | None:
        return self.records[max(self.records)] if self.records else None

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._abandon_all()

    def refuse_early(self, data: bytes) -> None:
        """`RunRejected` now for a request being written that can never become valid, and
        `RunUnrecordable` when the state disk could not record it (a shell ignores close's error)."""
        reason = early_refusal(data)
        if reason is not None:
            self.last_rejection = reason
            raise RunRejected(reason)
        try:
            disk = os.statvfs(self.directory)
            free = disk.f_bavail * disk.f_frsize
        except OSError as error:
            free, reason = 0, error.strerror or str(error)
        else:
            reason = f"{free:,} bytes free"
        if free < len(data) + RECORD_RESERVE:
            self.last_rejection = (
                f"the run could not be recorded: the state disk ({self.directory}) is full ({reason}); "
                "free some space there and write the request again"
            )
            raise RunUnrecordable(self.last_rejection)

    def submit(self, data: bytes, *, writer_cwd: str | None = None) -> RunRecord:
        """Accept a run request and queue it; `RunRejected` says why not.

        ``writer_cwd`` is where the writer works, relative to /home/work, when
        it works inside the mount: the steps start there unless the request
        says ``cwd``.
        """
        try:
            steps = parse_request(data)
        except RunRejected as error:
            self.last_rejection = str(error)
            raise
        if writer_cwd and not steps.cwd and "cwd" not in _document_keys(data):
            steps = dataclasses.replace(steps, cwd=writer_cwd)
        self.last_rejection = None
        number = max(self.records, default=0) + 1
        directory = self.directory / str(number)
        record = RunRecord(number, directory, data.decode("utf-8"), steps)
        try:
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(mode=0o700)
            (directory / "command").write_bytes(data)
            for name in ("output", "stdout", "stderr"):
                record.sinks[name] = open(directory / name, "wb")
            record.write_status()
        except OSError as error:
            for handle in record.sinks.values():
                handle.close()
            shutil.rmtree(directory, ignore_errors=True)
            self.last_rejection = f"the run could not be recorded: {error.strerror or error}"
            raise
        self.records[number] = record
        self._prune()
        assert self._nursery is not None, "runs are taken only while the mount serves"
        self._nursery.start_soon(self._carry_out, record)
        log.info("run %d queued: %s", number, record.command.strip()[:200])
        return record

    async def _carry_out(self, record: RunRecord) -> None:
        try:
            async with self.remote.slot(purpose=f"run {record.number}"):
                record.state, record.started_at = "running", time.time()
                record.save()
                try:
                    await self.sync.barrier()
                except (BaifsError, OSError) as error:
                    raise RunFailed(
                        f"the pending changes could not be put on the session first: {error}"
                    ) from error
                record.run_id = secrets.token_hex(16)
                record.save()
                outcome = await self._supervised(record)
            if not outcome.complete:
                record.output_note = "an answer from the session was lost on the way: some output is missing"
            if outcome.exit_code is None:
                raise RunFailed("the run ended, but the answer that carried its exit code was lost")
            # Killed by signal N (-N, as some agents report it): the shell's 128 + N, like `baifs run`.
            code = outcome.exit_code if outcome.exit_code >= 0 else 128 - outcome.exit_code
            record.state, record.exit_code = "finished", code
            log.info("run %d finished with exit code %d", record.number, code)
        except BaifsError as error:
            record.state, record.error = "failed", str(error)
            log.error("run %d failed: %s", record.number, error)
        finally:
            record.ended_at = time.time()
            self._close(record)
            with trio.CancelScope(shield=True):
                self.listings.expire()
                await self.kernel.attributes_stale()

    async def _supervised(self, record: RunRecord) -> BatchOutcome:
        """The run, with a supervisor that serves the mount's scripts while it goes (`supervisor`)."""
        supervisor = self.supervisor
        assert record.run_id is not None
        inbox = supervisor.open(record.run_id)
        ended = False
        try:
            keep_tmp = self.profiles.profile.keeps_staging_dir
            steps = SupervisedSteps(record.steps, inbox.box, keep_tmp)
            outcome = await self.remote.run_held(
                steps, self._sink(record), record.run_id, purpose=f"run {record.number}"
            )
            ended = True
            return outcome
        finally:
            supervisor.close(inbox, ended=ended)
            if not ended and self._nursery is not None:
                self._nursery.start_soon(keep_running, "concluding a run", lambda: supervisor.conclude(inbox))

    def _sink(self, record: RunRecord) -> Callable[[str, str], Awaitable[None]]:
        async def sink(stream: str, text: str) -> None:
            record.append(stream, text)

        return sink

    def _close(self, record: RunRecord) -> None:
        for handle in record.sinks.values():
            try:
                handle.close()
            except OSError as error:  # the last of the output did not fit on the disk
                record.output_note = record.output_note or f"output was dropped: {error.strerror or error}"
        record.sinks.clear()
        record.save()

    def _abandon_all(self) -> None:
        """The mount is ending: runs not done are failed (a going one is concluded by the next mount)."""
        for record in self.records.values():
            if not record.done:
                record.state = "failed"
                record.error = (
                    "the mount ended before this run started"
                    if record.started_at is None
                    else "the mount ended while this run was going; its output after that is lost"
                )
                record.ended_at = time.time()
                self._close(record)

    async def interrupt(self, number: int) -> None:
        """Ask the session to interrupt run ``number`` if it is the one going."""
        record = self.records.get(number)
        if record is None or record.state != "running" or self.remote.current_run_id != record.run_id:
            return
        log.info("interrupting run %d", number)
        await self.remote.interrupt()
        if self._nursery is not None:
            relay = self.supervisor.relay_interrupt
            self._nursery.start_soon(
                keep_running, "the interrupt relay", lambda: relay(lambda: record.state == "running")
            )

    def _prune(self) -> None:
        for number in sorted(self.records)[: -self.keep]:
            if self.records[number].done:
                shutil.rmtree(self.records.pop(number).directory, ignore_errors=True)
