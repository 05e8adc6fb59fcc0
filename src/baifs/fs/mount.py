"""The life of a mount: checks, state, the FUSE loop, and a shutdown that loses nothing.

Order of events:

1. fail fast, before touching the mountpoint: the endpoint answers, the keys
   are accepted, the session exists and is RUNNING (or is created with
   ``--create``), the mountpoint is an empty directory and nothing else
   mounts this session from this machine (a lock in the state directory);
2. build the mount's parts (`core.MountCore`) and replay the journal an
   earlier mount left, so the tree shows what was written before a crash,
   and say so when an earlier session of the same name left changes this
   one cannot take;
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
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from .. import config
from ..api.errors import (
    BaifsError,
)
from ..concurrency import keep_running
from ..locks import DirectoryLock, DirectoryLocked
from ..logs import reopen_logs, toggle_debug_logging
from .core import FINAL_SLOT_WAIT, MountCore, MountOptions
from .kernel import KernelCache
from .operations import Operations
from .remote import CREATE_TIMEOUT, open_session
from .runs import DEFAULT_KEEP
from .salvage import pending_elsewhere
from .state import StateIdentity, StateOfAnother, session_identity, session_state

log = logging.getLogger(__name__)


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
    connection, session, info = await open_session(
        request.credentials,
        request.session,
        create_image=request.create_image,
        create_timeout=request.create_timeout,
        progress=progress,
    )
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
            status_identity = {
                "session": request.session,
                "session_id": identity.session_id,
                "endpoint": identity.endpoint,
                "mountpoint": str(request.mountpoint),
                "state_dir": str(state),
                "log": str(request.log_file) if request.log_file else None,
            }
            core = MountCore.over_session(
                session,
                state,
                cache,
                request.options,
                fuse=True,
                keep_runs=request.keep_runs,
                identity=status_identity,
            )
            try:
                await _serve(core, request, identity, state, ready)
            finally:
                core.close()
        finally:
            lock.release()


async def _serve(
    core: MountCore,
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
    unmounted_cleanly = False
    async with trio.open_nursery() as nursery:
        recovered = await core.start(nursery)
        assert isinstance(core.kernel, KernelCache)
        operations = Operations(
            core.filesystem, core.handles, core.control, core.kernel, request.options, core.disk_blocks
        )
        pyfuse3.init(operations, str(request.mountpoint), options)
        try:
            nursery.start_soon(keep_running, "the signal handler", lambda: _handle_signals(core))
            message = f"mounted session {request.session} at {request.mountpoint}"
            if recovered:
                message += f"; recovered {recovered} change(s) an earlier mount had not uploaded"
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
            await core.stop()
            nursery.cancel_scope.cancel()
            unmounted_cleanly = True
        finally:
            pyfuse3.close(unmount=unmounted_cleanly)
    await core.final_flush()


async def _handle_signals(core: MountCore) -> None:
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
                    await core.sync.flush_all(slot_timeout=FINAL_SLOT_WAIT)
                except (BaifsError, OSError) as error:
                    log.error("flush before unmount failed: %s; the changes stay in the journal", error)
                nursery.cancel_scope.cancel()

            nursery.start_soon(flush_then_stop)
            async for received in signals:
                log.warning("%s again: unmounting now", signal.Signals(received).name)
                nursery.cancel_scope.cancel()
    pyfuse3.terminate()
