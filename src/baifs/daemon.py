"""Running a mount in the foreground or as a background daemon.

``baifs mount`` returns only when the mount works or has failed: the parent
process forks a daemon, waits on a pipe for its last line (``ready <message>``
or ``error <message>``), prints it and exits 0 or 1; ``progress <message>``
lines before it (a session being started) are printed as they come. The daemon leaves the
terminal's session, takes ``/dev/null`` as standard input and writes its log
(standard output and error included) to the log file.

Invariants: the parent never reports success before the daemon has mounted;
a daemon that dies before saying anything is reported with the tail of its
log; credentials stay in memory across the fork and never reach argv.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import trio

from .errors import BaifsError
from .fs.mount import MountRequest, run_mount
from .logs import setup_logging

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 8


def run_foreground(request: MountRequest) -> int:
    """Mount and serve in this process until unmounted (for systemd and debugging)."""

    def say(message: str) -> None:
        print(f"baifs: {message}", file=sys.stderr, flush=True)

    trio.run(run_mount, request, say, say)
    return 0


def run_detached(request: MountRequest, log_file: Path) -> int:
    """Fork a daemon that mounts; return once it reports ready (0) or failed (1)."""
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os._exit(_daemon(request, log_file, write_end))
    os.close(write_end)
    kind, message = "", ""
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            kind, _, message = line.decode(errors="replace").strip().partition(" ")
            if kind == "progress":
                print(f"baifs: {message}", file=sys.stderr, flush=True)
            else:
                break
    if kind == "ready":
        print(f"baifs: {message} (log: {log_file})", file=sys.stderr)
        return 0
    if kind == "error":
        print(f"baifs: error: {message}", file=sys.stderr)
        return 1
    os.waitpid(pid, 0)
    tail = log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log_file.exists() else []
    print(
        f"baifs: error: the mount daemon exited before mounting; its log ({log_file}) ends:", file=sys.stderr
    )
    for tail_line in tail:
        print(f"  {tail_line}", file=sys.stderr)
    return 1


def _daemon(request: MountRequest, log_file: Path, report_fd: int) -> int:
    """The daemon's life; returns its exit status."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    output = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(null)
    os.close(output)
    setup_logging(logging.getLevelName(logging.getLogger().level).lower(), log_file)  # rotated by size
    reported = False

    def report(kind: str, message: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(report_fd, f"{kind} {message}\n".encode())
            os.close(report_fd)

    def progress(message: str) -> None:
        if not reported:
            os.write(report_fd, f"progress {message}\n".encode())

    try:
        trio.run(run_mount, request, lambda message: report("ready", message), progress)
        return 0
    except BaifsError as error:
        log.error("%s", error)
        report("error", str(error))
        return 1
    except BaseException as error:
        traceback.print_exc()
        report("error", f"unexpected {type(error).__name__}: {error} (see the log)")
        return 1
    finally:
        if not reported:
            os.close(report_fd)
