"""The life of a mount: checks, state, the FUSE loop, and a shutdown that loses nothing.

Order of events:

1. fail fast, before touching the mountpoint: the endpoint answers, the keys
   are accepted, the session exists and is RUNNING (or is created with
   ``--create``), the mountpoint is an empty directory and nothing else
   mounts this session from this machine (a lock in the state directory);
2. replay the journal an earlier mount left (`Filesystem.recover`), so the
   tree shows what was written before a crash;
3. mount, report readiness (to the waiting ``baifs mount`` process and to
   systemd), serve until unmounted or signalled;
4. on SIGTERM, SIGINT or SIGHUP: flush everything while still mounted, then
   unmount; on ``fusermount3 -u``: flush everything after the kernel let go.
   What cannot be flushed stays in the journal for the next mount, and the
   log says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .. import config
from ..api.batch import BatchExecutor
from ..api.client import Connection, SessionClient
from ..api.errors import AuthenticationFailed, BaifsError, EndpointUnreachable, SessionNotFound
from .content import ContentStore
from .control import ControlTree
from .filesystem import Filesystem, MountOptions
from .journal import Journal, overlay_state
from .operations import Operations
from .recovery import recover
from .runs import DEFAULT_KEEP, RunManager

log = logging.getLogger(__name__)

LIVE_STATES = ("RUNNING", "RUNNING_DEGRADED")
CURRENT_RUN_FILE = "current-run"
FINAL_FLUSH_ATTEMPTS = 5


class MountError(BaifsError):
    """The mount cannot start; the message says why and what to do."""


@dataclass
class MountRequest:
    session: str
    mountpoint: Path
    credentials: config.Credentials
    options: MountOptions
    create_image: str | None = None
    allow_other: bool = False
    cache_dir: Path | None = None
    log_file: Path | None = None
    keep_runs: int = DEFAULT_KEEP


def check_mountpoint(path: Path) -> None:
    if not path.exists():
        raise MountError(f"mountpoint {path} does not exist (create it with: mkdir -p {path})")
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mountpoint (unmount it first: baifs umount {path})")
    if any(path.iterdir()):
        raise MountError(f"mountpoint {path} is not empty; mount on an empty directory")


async def open_session(request: MountRequest) -> tuple[Connection, SessionClient, dict[str, Any]]:
    """Connect and find the session, turning every failure into a message a person can act on."""
    endpoint = request.credentials.endpoint
    connection = Connection(request.credentials)
    try:
        await connection.negotiate()
        if request.create_image:
            created = await connection.create_session(request.session, request.create_image)
            session = connection.session(created["sessionId"])
        else:
            session = connection.session(request.session)
        info = await session.info()
    except EndpointUnreachable as error:
        await connection.aclose()
        raise MountError(f"cannot reach the endpoint {endpoint}: {error}") from error
    except AuthenticationFailed as error:
        await connection.aclose()
        raise MountError(
            f"{endpoint} rejected the access key {request.credentials.access_key} "
            f"({error.msg or error.title}); check BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY or your profile"
        ) from error
    except SessionNotFound as error:
        await connection.aclose()
        raise MountError(
            f"no session {request.session!r} at {endpoint}; "
            "check 'backend.ai session list', or create it with --create IMAGE"
        ) from error
    except BaifsError:
        await connection.aclose()
        raise
    status = str(info.get("status", "UNKNOWN"))
    if status not in LIVE_STATES:
        await connection.aclose()
        raise MountError(f"session {request.session!r} is {status}, not RUNNING; it cannot be mounted")
    return connection, session, info


def state_key(endpoint: str, session_id: str) -> str:
    return hashlib.sha256(f"{endpoint}\0{session_id}".encode()).hexdigest()[:16]


class StateLock:
    """One mount per session and machine: an exclusive lock in the state directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / "lock"
        self._handle = open(self.path, "a+")

    def acquire(self, mountpoint: Path) -> None:
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            owner = self._handle.read().strip() or "another process"
            raise MountError(f"this session is already mounted from this machine ({owner})") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} at {mountpoint}")
        self._handle.flush()

    def release(self) -> None:
        self._handle.close()


class RunMarker:
    """Keeps the id of the batch run in progress in the state directory, for a successor."""

    def __init__(self, state: Path) -> None:
        self.path = state / CURRENT_RUN_FILE

    def record(self, run_id: str | None) -> None:
        if run_id is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_text(run_id)


async def conclude_abandoned_run(executor: BatchExecutor, state: Path) -> None:
    """A crashed mount may have left a run that blocks the session: read it to its end."""
    marker = state / CURRENT_RUN_FILE
    if not marker.exists():
        return
    run_id = marker.read_text().strip()
    log.info("concluding run %s that an earlier mount left unfinished", run_id)
    try:
        await executor.conclude_abandoned(run_id)
    except BaifsError as error:
        log.warning("could not conclude run %s: %s", run_id, error)
    marker.unlink(missing_ok=True)


def notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


async def run_mount(request: MountRequest, ready: Callable[[str], None]) -> None:
    """Mount and serve until unmounted; ``ready`` is called once the mount works."""
    connection, session, info = await open_session(request)
    async with connection:
        session_id = str(info.get("containerId") or session.id_or_name)
        state = config.state_dir() / "mounts" / state_key(request.credentials.endpoint, session_id)
        lock = StateLock(state)
        lock.acquire(request.mountpoint)
        journal = Journal(state)
        try:
            cache = request.cache_dir or config.cache_dir() / "mounts" / state.name
            store = ContentStore(cache, state / "staging", request.options.cache_limit)
            executor = BatchExecutor(session, on_run=RunMarker(state).record)
            await conclude_abandoned_run(executor, state)
            filesystem = Filesystem(session, executor, store, journal, request.options)
            identity = {
                "session": request.session,
                "session_id": session_id,
                "endpoint": request.credentials.endpoint,
                "mountpoint": str(request.mountpoint),
                "state_dir": str(state),
                "log": str(request.log_file) if request.log_file else None,
            }
            recovered = await recover(filesystem)
            runs = RunManager(filesystem, state / "runs", keep=request.keep_runs)
            operations = Operations(filesystem, ControlTree(filesystem, runs, identity))
            runs.after_run = operations.forget_kernel_caches
            await _serve(filesystem, runs, operations, request, recovered, ready)
        finally:
            journal.close()
            lock.release()


async def _serve(
    filesystem: Filesystem,
    runs: RunManager,
    operations: Operations,
    request: MountRequest,
    recovered: int,
    ready: Callable[[str], None],
) -> None:
    options = set(pyfuse3.default_options) | {"fsname=baifs", "subtype=baifs"}
    if request.allow_other:
        options.add("allow_other")
    pyfuse3.init(operations, str(request.mountpoint), options)
    unmounted_cleanly = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(filesystem.executor.run_background)
            await nursery.start(filesystem.run_background)
            await nursery.start(runs.run_background)
            nursery.start_soon(_handle_signals, filesystem)
            message = f"mounted session {request.session} at {request.mountpoint}"
            if recovered:
                message += f"; recovered {recovered} change(s) an earlier mount had not uploaded"
                nursery.start_soon(_flush_recovered, filesystem)
            log.info("%s", message)
            ready(message)
            notify_systemd("READY=1")
            await pyfuse3.main()
            notify_systemd("STOPPING=1")
            nursery.cancel_scope.cancel()
        unmounted_cleanly = True
    finally:
        pyfuse3.close(unmount=unmounted_cleanly)
    await _final_flush(filesystem)


async def _flush_recovered(filesystem: Filesystem) -> None:
    try:
        await filesystem.flush_all()
        log.info("the recovered changes are on the session")
    except BaifsError as error:
        log.error("could not upload the recovered changes yet: %s", error)


async def _handle_signals(filesystem: Filesystem) -> None:
    """First signal: flush, then unmount. A second one: unmount now, changes stay journalled."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        received = await signals.__anext__()
        log.info("%s: flushing, then unmounting", signal.Signals(received).name)
        async with trio.open_nursery() as nursery:

            async def flush_then_stop() -> None:
                try:
                    await filesystem.flush_all()
                except BaifsError as error:
                    log.error("flush before unmount failed: %s; the changes stay in the journal", error)
                nursery.cancel_scope.cancel()

            nursery.start_soon(flush_then_stop)
            async for received in signals:
                log.warning("%s again: unmounting now", signal.Signals(received).name)
                nursery.cancel_scope.cancel()
    pyfuse3.terminate()


async def _final_flush(filesystem: Filesystem) -> None:
    """After the kernel let go: push what is left, or leave it in the journal and say so."""
    for attempt in range(FINAL_FLUSH_ATTEMPTS):
        try:
            await filesystem.flush_all()
            await filesystem.journal.checkpoint(overlay_state(filesystem.namespace))
            return
        except SessionNotFound as error:
            log.error("final flush failed: %s", error)
            break
        except BaifsError as error:
            log.error("final flush failed (attempt %d): %s", attempt + 1, error)
            await trio.sleep(2**attempt)
    pending = filesystem.namespace.pending_changes()
    log.error(
        "%d change(s) could not be uploaded; they are kept in %s for the next mount of this session",
        pending,
        filesystem.journal.path.parent,
    )
