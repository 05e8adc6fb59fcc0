"""The life of a mount: checks, state, the FUSE loop, and a shutdown that loses nothing.

Order of events:

1. fail fast, before touching the mountpoint: the endpoint answers, the keys
   are accepted, the session exists and is RUNNING (or is created with
   ``--create``), the mountpoint is an empty directory and nothing else
   mounts this session from this machine (a lock in the state directory);
2. replay the journal an earlier mount left (`state.start_filesystem`), so
   the tree shows what was written before a crash, and say so when an
   earlier session of the same name left changes this one cannot take;
3. mount, report readiness (to the waiting ``baifs mount`` process and to
   systemd), serve until unmounted or signalled;
4. on SIGTERM or SIGINT: flush everything while still mounted, then
   unmount (SIGHUP reopens the log, SIGUSR1 toggles debug logging); on
   ``fusermount3 -u``: stop write-back cooperatively (a flush under way
   finishes), then flush everything after the kernel let go.
   What cannot be flushed stays in the journal for the next mount (or
   ``baifs salvage``), and the log says so.

Nothing but an unmount or a signal ends the serving loop: every background
task logs and retries what it cannot do (`concurrency.keep_running`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .. import config
from ..api.client import Connection, SessionClient
from ..api.errors import (
    AuthenticationFailed,
    BaifsError,
    EndpointUnreachable,
    SessionBusy,
    SessionNotFound,
    SessionTerminated,
)
from ..concurrency import keep_running
from ..locks import DirectoryLock, DirectoryLocked
from ..logs import reopen_logs, toggle_debug_logging
from .control import ControlTree
from .filesystem import Filesystem, MountOptions
from .operations import Operations
from .runs import DEFAULT_KEEP, RunManager
from .salvage import pending_elsewhere
from .state import (
    StateIdentity,
    StateOfAnother,
    build_filesystem,
    session_identity,
    session_state,
    start_filesystem,
)

log = logging.getLogger(__name__)

LIVE_STATES = ("RUNNING", "RUNNING_DEGRADED")
#: A session on its way to RUNNING (the manager's SessionStatus before RUNNING).
STARTING_STATES = ("PENDING", "SCHEDULED", "PREPARING", "PULLING", "PREPARED", "CREATING")
#: How long ``baifs mount --create`` waits for a new session to run (``--create-timeout``).
CREATE_TIMEOUT = 600.0
#: The longest pause between two looks at a starting session (each is a request of the keypair's).
START_POLL_MAX = 5.0
#: How often a start that goes on is reported when nothing changes.
START_SAY_EVERY = 15.0
#: How long unmount waits for the execution slot (a run may hold it for hours).
FINAL_SLOT_WAIT = 30.0
#: Unmount keeps trying to flush for this long while the session fails.
FINAL_FLUSH_PATIENCE = 300.0
#: How long ``baifs mount`` waits for the endpoint to answer before it gives up.
OPEN_PATIENCE = 20.0


class MountError(BaifsError):
    """The mount cannot start; the message says why and what to do."""


@dataclass
class MountRequest:
    session: str
    mountpoint: Path
    credentials: config.Credentials
    options: MountOptions
    create_image: str | None = None
    create_timeout: float = CREATE_TIMEOUT
    allow_other: bool = False
    cache_dir: Path | None = None
    log_file: Path | None = None
    keep_runs: int = DEFAULT_KEEP


def check_mountpoint(path: Path) -> None:
    try:
        os.stat(path)
        if os.path.ismount(path):
            os.listdir(path)  # a round trip: the kernel may answer a stat of a dead mount from its cache
    except FileNotFoundError:
        pass
    except OSError as error:
        if error.errno == errno.ENOTCONN:  # a FUSE mount whose daemon is gone (kill -9, a crash)
            raise MountError(
                f"{path} is a mount whose daemon is gone; detach it with 'baifs umount --force {path}' "
                "(what it had not uploaded stays for the next mount), then mount again"
            ) from None
        raise MountError(f"mountpoint {path} cannot be used: {error.strerror}") from None
    if not path.exists():
        raise MountError(f"mountpoint {path} does not exist (create it with: mkdir -p {path})")
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mountpoint (unmount it first: baifs umount {path})")
    if any(path.iterdir()):
        raise MountError(f"mountpoint {path} is not empty; mount on an empty directory")


async def open_session(
    request: MountRequest, progress: Callable[[str], None] = lambda message: None
) -> tuple[Connection, SessionClient, dict[str, Any]]:
    """Connect and find the session, turning every failure into a message a person can act on.

    The exchange is bounded by `OPEN_PATIENCE`: an endpoint that takes the
    connection and never answers fails the mount with a message naming the
    request it did not answer. A session that is still starting (a new one
    whose image is pulled) is then followed until it runs, for at most
    ``request.create_timeout`` seconds, telling ``progress`` where it is.
    """
    endpoint = request.credentials.endpoint
    connection = Connection(request.credentials)
    awaiting = "GET / (the manager's version)"
    try:
        with trio.move_on_after(OPEN_PATIENCE) as patience:
            await connection.negotiate()
            if request.create_image:
                awaiting = f"the creation of session {request.session!r}"
                created = await connection.create_session(request.session, request.create_image)
                session = connection.session(created["sessionId"])
            else:
                session = connection.session(request.session)
            awaiting = f"the information of session {request.session!r}"
            info = await session.info()
        if patience.cancelled_caught:
            raise MountError(
                f"{endpoint} did not answer {awaiting} within {OPEN_PATIENCE:.0f} s; check that"
                " BACKEND_ENDPOINT is the manager's address and that the manager is up"
            )
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
    try:
        info = await _until_running(request, session, info, progress)
    except BaifsError:
        await connection.aclose()
        raise
    return connection, session, info


async def _until_running(
    request: MountRequest, session: SessionClient, info: dict[str, Any], progress: Callable[[str], None]
) -> dict[str, Any]:
    """The session's info once it is RUNNING; `MountError` if it ends otherwise or takes too long."""
    started = trio.current_time()
    pause = 1.0
    said, said_at = "", -math.inf
    while True:
        status = str(info.get("status", "UNKNOWN"))
        if status in LIVE_STATES:
            return info
        waited = trio.current_time() - started
        if status not in STARTING_STATES:
            raise MountError(f"session {request.session!r} is {status}, not RUNNING; it cannot be mounted")
        if waited > request.create_timeout:
            raise MountError(
                f"session {request.session!r} is still {status} after {waited:.0f} s; it may start later: "
                f"mount it then, or wait longer with --create-timeout SECONDS"
            )
        if status != said or waited - said_at >= START_SAY_EVERY:  # each change, and now and then
            doing = {"PULLING": "pulling its image", "PREPARING": "preparing its container"}.get(
                status, "starting"
            )
            line = f"session {request.session!r} is {status} ({doing}), {waited:.0f} s"
            progress(line)
            log.info("%s", line)
            said, said_at = status, waited
        await trio.sleep(pause)
        pause = min(pause * 1.5, START_POLL_MAX)
        info = await session.info()


def notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


async def run_mount(
    request: MountRequest,
    ready: Callable[[str], None],
    progress: Callable[[str], None] = lambda message: None,
) -> None:
    """Mount and serve until unmounted; ``ready`` is called once the mount works, ``progress``
    with what it waits for before (a session being started)."""
    connection, session, info = await open_session(request, progress)
    async with connection:
        endpoint = request.credentials.endpoint
        identity = StateIdentity(
            endpoint,
            request.session,
            session_identity(info, session.id_or_name, endpoint),
            str(request.mountpoint),
            time.time(),
        )
        try:
            state = session_state(identity)
        except StateOfAnother as error:
            raise MountError(str(error)) from None
        lock = DirectoryLock(state, "this session")
        try:
            lock.acquire(f"mounted at {request.mountpoint}")
        except DirectoryLocked as error:
            raise MountError(str(error)) from None
        try:
            identity.save(state)
            cache = request.cache_dir or config.cache_dir() / "mounts" / state.name
            filesystem = build_filesystem(session, state, cache, request.options)
            try:
                await _serve(filesystem, request, identity, state, ready)
            finally:
                filesystem.journal.close()
        finally:
            lock.release()


async def _serve(
    filesystem: Filesystem,
    request: MountRequest,
    identity: StateIdentity,
    state: Path,
    ready: Callable[[str], None],
) -> None:
    # The source df and findmnt show, as sshfs shows user@host:path (a comma would end the option).
    source = "baifs:" + re.sub(r"[,\\\s]", "_", request.session)
    options = set(pyfuse3.default_options) | {f"fsname={source}", "subtype=baifs"}
    if request.allow_other:
        options.add("allow_other")
    status_identity = {
        "session": request.session,
        "session_id": identity.session_id,
        "endpoint": identity.endpoint,
        "mountpoint": str(request.mountpoint),
        "state_dir": str(state),
        "log": str(request.log_file) if request.log_file else None,
    }
    unmounted_cleanly = False
    async with trio.open_nursery() as nursery:
        recovered = await start_filesystem(filesystem, nursery)
        filesystem.sync.stats.recovered_changes = recovered
        runs = RunManager(filesystem, state / "runs", keep=request.keep_runs)
        operations = Operations(filesystem, ControlTree(filesystem, runs, status_identity))
        runs.after_run = operations.forget_kernel_caches
        pyfuse3.init(operations, str(request.mountpoint), options)
        try:
            await nursery.start(runs.run_background)
            nursery.start_soon(keep_running, "the signal handler", lambda: _handle_signals(filesystem))
            message = f"mounted session {request.session} at {request.mountpoint}"
            if recovered:
                message += f"; recovered {recovered} change(s) an earlier mount had not uploaded"
                filesystem.sync.note_change()
            for earlier in pending_elsewhere(identity, state):
                log.warning("%s", earlier)
                message += f"; note: {earlier}"
            log.info("%s", message)
            ready(message)
            notify_systemd("READY=1")
            try:
                await pyfuse3.main()
            except Exception:
                log.exception("the FUSE loop failed; flushing what is pending, then exiting")
            notify_systemd("STOPPING=1")
            await filesystem.sync.stop()
            with trio.move_on_after(FINAL_SLOT_WAIT):
                await filesystem.executor.settle()
            nursery.cancel_scope.cancel()
            unmounted_cleanly = True
        finally:
            pyfuse3.close(unmount=unmounted_cleanly)
    await _final_flush(filesystem)


async def _handle_signals(filesystem: Filesystem) -> None:
    """SIGTERM or SIGINT: flush, then unmount; a second one: unmount now, changes stay journalled.

    SIGHUP reopens the log file (after an outside rotation), as daemons do;
    SIGUSR1 switches the log between debug and the level the mount started with.
    """
    ending = (signal.SIGTERM, signal.SIGINT)
    with trio.open_signal_receiver(*ending, signal.SIGHUP, signal.SIGUSR1) as signals:
        async for received in signals:
            if received in ending:
                break
            if received == signal.SIGHUP:
                reopen_logs()
                log.info("SIGHUP: log file reopened")
            else:
                log.warning("SIGUSR1: logging at %s now", toggle_debug_logging())
        log.info("%s: flushing, then unmounting", signal.Signals(received).name)
        async with trio.open_nursery() as nursery:

            async def flush_then_stop() -> None:
                try:
                    await filesystem.sync.flush_all(slot_timeout=FINAL_SLOT_WAIT)
                except (BaifsError, OSError) as error:
                    log.error("flush before unmount failed: %s; the changes stay in the journal", error)
                nursery.cancel_scope.cancel()

            nursery.start_soon(flush_then_stop)
            async for received in signals:
                log.warning("%s again: unmounting now", signal.Signals(received).name)
                nursery.cancel_scope.cancel()
    pyfuse3.terminate()


async def _final_flush(filesystem: Filesystem) -> None:
    """After the kernel let go: push what is left, or leave it in the journal and say so."""
    sync = filesystem.sync
    deadline = trio.current_time() + FINAL_FLUSH_PATIENCE
    delay = 1.0
    while sync.has_work and not sync.keep_pending:
        try:
            await sync.flush_all(slot_timeout=FINAL_SLOT_WAIT)
        except SessionTerminated as error:
            log.error("final flush: %s", error)
            break
        except SessionBusy as error:
            log.warning("final flush: %s; uploading what needs no run", error)
            try:
                await sync.flush_uploads(list(filesystem.namespace.pending))
            except (BaifsError, OSError) as upload_error:
                log.error("final uploads failed: %s", upload_error)
            break
        except (BaifsError, OSError) as error:
            if trio.current_time() + delay > deadline:
                log.error("final flush failed: %s; giving up", error)
                break
            log.error("final flush failed (%s); trying again in %.0f s", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)
    await sync.checkpoint()
    pending = filesystem.namespace.pending_changes()
    if pending:
        log.error(
            "%d change(s) %s; they are kept in %s for the next mount of this session (or 'baifs salvage')",
            pending,
            "were left pending as asked" if sync.keep_pending else "could not be uploaded",
            filesystem.journal.path.parent,
        )
    for change, refusal in sync.refusals.items():
        log.error("refused by the session %d time(s): %s: %s", refusal.attempts, change, refusal.said)
