"""Talking to a running mount from another process: status, flush, unmount.

A mount answers through its control files: ``.baifs-status`` (read) and the
``user.baifs.flush`` extended attribute on its root (set; returns when
everything is on the session). ``baifs status``, ``sync``, ``umount`` and
``run`` use these, so they need no socket and work with any mount a user can
see.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from . import controlfiles
from .errors import BaifsError
from .processes import running
from .timestamps import moment


class NotAMount(BaifsError):
    pass


def find_mount(start: Path) -> Path:
    """The baifs mount containing ``start``."""
    try:
        path = start.resolve()
    except FileNotFoundError:  # a relative start, and the working directory was removed
        raise NotAMount(
            "the current directory no longer exists (removed, or its mount went away); "
            'enter it again (cd "$PWD") or name the mount'
        ) from None
    for candidate in (path, *path.parents):
        if os.path.ismount(candidate) and (candidate / controlfiles.STATUS).exists():
            return candidate
    raise NotAMount(f"{path} is not inside a baifs mount")


#: How long a mount's status may take to read when looking for the mounts of a server.
STATUS_PATIENCE = 3.0


def baifs_mounts() -> list[Path]:
    """Every baifs mount this process can see (from ``/proc/self/mounts``, dead ones included)."""
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "fuse.baifs":
                found.append(Path(_unescape_mounts_field(fields[1])))
    return found


def _unescape_mounts_field(field: str) -> str:
    """A path as ``/proc/mounts`` writes it: space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mounts_served_by(endpoint: str) -> list[Path]:
    """The mounts whose session is at ``endpoint``, and those that do not answer in time (they may be)."""
    from .fs.state import normalised_endpoint

    wanted = normalised_endpoint(endpoint)
    readings: dict[Path, list[str | None]] = {path: [] for path in baifs_mounts()}
    # Daemon threads: a read that hangs on a stuck mount must not keep this process alive.
    readers = [
        threading.Thread(target=lambda p=path, into=into: into.append(_status_endpoint(p)), daemon=True)
        for path, into in readings.items()
    ]
    deadline = time.monotonic() + STATUS_PATIENCE
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
    served = []
    for path, into in readings.items():
        seen = into[0] if into else wanted  # a mount that does not answer may be waiting on this server
        if seen is not None and normalised_endpoint(seen) == wanted:
            served.append(path)
    return served


def _status_endpoint(mountpoint: Path) -> str | None:
    try:
        return str(json.loads((mountpoint / controlfiles.STATUS).read_text())["endpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # dead (ENOTCONN), or not a mount of this baifs


def read_status(mountpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((mountpoint / controlfiles.STATUS).read_text())
    except FileNotFoundError:
        raise NotAMount(f"{mountpoint} is not a baifs mount") from None
    except OSError as error:
        raise NotAMount(
            f"{mountpoint} does not answer ({error.strerror}): its daemon died or hangs; detach it with "
            f"'baifs umount --force {mountpoint}' (pending changes stay for the next mount)"
        ) from None


#: A flush that keeps failing is given up once nothing moved for this long.
FLUSH_PATIENCE = 120.0


def _progress_mark(status: dict[str, Any]) -> tuple[Any, ...]:
    """What moves while a flush makes headway, even one that fails and is tried again."""
    pending, flushing = status["pending"], status.get("flush") or {}
    return (
        pending["uploads"],
        pending["upload_bytes"],
        pending["namespace_changes"],
        flushing.get("bytes_done"),
        status["flushes"]["completed"],
    )


class FlushInterrupted(BaifsError):
    """Ctrl-C while waiting for a flush: the mount stays, and goes on uploading."""

    exit_status = 130


def flush(mountpoint: Path, console: Console, label: str = "uploading") -> None:
    """Flush everything in the mount, showing files, bytes, rate and time left as they go.

    On a terminal this is a progress bar; otherwise a plain line every few
    seconds. A flush that fails (the session failed a request after its
    retries) is asked for again while it makes headway; it is given up once
    nothing moved for `FLUSH_PATIENCE` seconds, when the session is
    terminated, when a run holds the execution slot (EAGAIN), or when the
    session refused the same changes again (a permission, a full disk:
    asking once more would not change its answer). Ctrl-C
    stops waiting at once (`FlushInterrupted`): the mount stays up and
    goes on uploading in the background.
    """
    status = read_status(mountpoint)
    pending = status["pending"]
    if not pending["uploads"] and not pending["namespace_changes"]:
        return
    mark, moved_at = _progress_mark(status), time.monotonic()
    try:
        with _FlushDisplay(console, label, pending) as display:
            while True:
                error = _flush_once(mountpoint, display.show)
                if error is None:
                    break
                status = read_status(mountpoint)
                remote = status.get("remote") or {}
                if error.errno == errno.EAGAIN or remote.get("terminated"):
                    raise BaifsError(_flush_failure(mountpoint, error, status))
                refused = status["flushes"].get("refused") or []
                if refused and all(r["attempts"] >= REFUSALS_TO_GIVE_UP for r in refused):
                    raise BaifsError(_refused(mountpoint, refused))
                if _progress_mark(status) != mark:
                    mark, moved_at = _progress_mark(status), time.monotonic()
                elif time.monotonic() - moved_at > FLUSH_PATIENCE:
                    raise BaifsError(_flush_failure(mountpoint, error, status))
                display.retrying(error.strerror or str(error))
                time.sleep(1)
    except KeyboardInterrupt:
        raise FlushInterrupted(
            f"interrupted: {mountpoint} is still mounted; uploads continue in the background "
            f"(baifs status {mountpoint})"
        ) from None
    console.print(
        f"{label}: {pending['uploads']} file(s), {pending['upload_bytes']:,} bytes and "
        f"{pending['namespace_changes']} namespace change(s) are on the session",
        soft_wrap=True,
    )


class _FlushDisplay:
    """A rich progress bar on a terminal (files, bytes, rate, time left); plain lines elsewhere."""

    PLAIN_EVERY = 5.0

    def __init__(self, console: Console, label: str, pending: dict[str, Any]) -> None:
        self.console = console
        self.label = label
        self.pending = pending
        self.progress: Progress | None = None
        self.task: Any = None
        self.started = time.monotonic()
        self.said_at = 0.0

    def __enter__(self) -> _FlushDisplay:
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[files]}"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.__enter__()
            total = max(self.pending["upload_bytes"], 1)
            self.task = self.progress.add_task(self.label, total=total, files=self._files(0, None))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def _files(self, done: int, total: int | None) -> str:
        return f"{done}/{total if total is not None else self.pending['uploads']} files"

    def show(self, flushing: dict[str, Any]) -> None:
        done, total = flushing.get("bytes_done", 0), max(flushing.get("bytes_total", 0), 1)
        files = self._files(flushing.get("files_done", 0), flushing.get("files_total"))
        if self.progress is not None:
            self.progress.update(self.task, total=total, completed=done, files=files)
            return
        now = time.monotonic()
        if now - self.said_at < self.PLAIN_EVERY:
            return
        self.said_at = now
        rate = done / max(now - self.started, 1e-3)
        left = f", about {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        self.console.print(
            f"{self.label}: {files}, {decimal(done)} of {decimal(total)}, {decimal(int(rate))}/s{left}",
            soft_wrap=True,
        )

    def retrying(self, cause: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=f"{self.label} (retrying: {cause})")
        else:
            self.console.print(f"{self.label}: retrying ({cause})", soft_wrap=True)


#: Sets the flush attribute in a process of its own (see `_flush_once`); prints the errno on failure.
_FLUSH_CHILD = (
    "import os, sys\n"
    "try:\n"
    "    os.setxattr(sys.argv[1], sys.argv[2], b'1')\n"
    "except OSError as error:\n"
    "    print(error.errno, error.strerror)\n"
    "    sys.exit(1)\n"
)


def _flush_once(mountpoint: Path, show: Any) -> OSError | None:
    """Ask the mount to flush everything, showing progress; the error, if any.

    The request is made by a child process in a session of its own: a
    process blocked in a FUSE call cannot exit before the call returns, so
    Ctrl-C leaves this command at once while the child (and the flush) go
    on in the background.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _FLUSH_CHILD, str(mountpoint), controlfiles.FLUSH_XATTR],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    while child.poll() is None:
        time.sleep(0.25)
        flushing = read_status(mountpoint).get("flush") or {}
        if flushing:
            show(flushing)
    if child.returncode == 0:
        return None
    number, _, text = (child.stdout.read() if child.stdout else "").strip().partition(" ")
    code = int(number) if number.isdigit() else errno.EIO
    return OSError(code, text or os.strerror(code))


def _refusal(refusal: dict[str, Any]) -> str:
    said = refusal["said"] or "no message"
    return f"{refusal['change']} ({refusal['attempts']} time(s) in a row): the session said: {said}"


#: A change the session refused this many times in a row is not asked for again by a flush command.
REFUSALS_TO_GIVE_UP = 2


def _refused(mountpoint: Path, refused: list[dict[str, Any]]) -> str:
    lines = [
        f"the session refused {len(refused)} change(s); {mountpoint} stays mounted, and they stay pending:"
    ]
    lines += [f"  {_refusal(refusal)}" for refusal in refused]
    lines.append(
        f"Fix the cause in the session and run 'baifs sync {mountpoint}', or unmount keeping them for the "
        f"next mount and 'baifs salvage': baifs umount --keep-pending {mountpoint}"
    )
    return "\n".join(lines)


def _flush_failure(mountpoint: Path, error: OSError, status: dict[str, Any]) -> str:
    remote = status.get("remote") or {}
    if remote.get("terminated"):
        cause = f"{remote['terminated']}; recover the changes with 'baifs salvage'"
    elif error.errno == errno.EAGAIN:
        cause = (
            "a run holds the session's execution slot, and some changes need it; wait for the run, "
            "or unmount with --lazy (the changes stay in the journal for the next mount)"
        )
    else:
        cause = str(status["flushes"].get("last_error") or remote.get("last_failure") or error.strerror)
    return (
        f"flush failed ({cause}); the changes stay pending: "
        f"see 'baifs status {mountpoint}' and the mount's log"
    )


def force_unmount(mountpoint: Path) -> None:
    """Detach a mount without asking its daemon anything (it may be dead)."""
    fusermount = shutil.which("fusermount3") or "fusermount3"
    result = subprocess.run([fusermount, "-uz", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BaifsError(f"detaching {mountpoint} failed: {result.stderr.strip()}")


#: How long unmount tries again while the mount is busy (something had a file open for an instant).
BUSY_PATIENCE = 3.0


def unmount(mountpoint: Path, *, lazy: bool, keep_pending: bool = False, timeout: float = 600.0) -> None:
    """Unmount and wait for the daemon to exit (it flushes what is left first, unless ``keep_pending``)."""
    pid = read_status(mountpoint).get("pid")
    if keep_pending:
        try:
            os.setxattr(mountpoint, controlfiles.KEEP_PENDING_XATTR, b"1")
        except OSError as error:
            raise BaifsError(
                f"{mountpoint} did not take the request to keep its pending changes ({error.strerror}); "
                f"if its daemon is dead, detach it with 'baifs umount --force {mountpoint}'"
            ) from None
    fusermount = shutil.which("fusermount3") or "fusermount3"
    # A file open for an instant (a `baifs run` following its output, a shell's completion)
    # makes the mount busy only for that instant: try again for a moment before saying so.
    deadline = time.monotonic() + BUSY_PATIENCE
    while True:
        result = subprocess.run(
            [fusermount, "-uz" if lazy else "-u", str(mountpoint)], capture_output=True, text=True
        )
        if result.returncode == 0 or "busy" not in result.stderr.lower() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if result.returncode != 0:
        detail = result.stderr.strip()
        if "busy" in detail.lower():
            raise BaifsError(
                f"{mountpoint} is busy: a program has a file or its working directory in it. "
                "Close it, or detach now and finish when it lets go: baifs umount --lazy"
            )
        raise BaifsError(f"unmounting {mountpoint} failed: {detail}")
    if pid is None or lazy:
        return
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not running(int(pid)):  # exited (a zombie is its parent's, or init's, to reap)
                return
            time.sleep(0.05)
    except KeyboardInterrupt:
        raise FlushInterrupted(
            f"interrupted: {mountpoint} is unmounted; its daemon (pid {pid}) finishes what is left "
            "in the background (see its log)"
        ) from None
    raise BaifsError(f"the mount daemon (pid {pid}) is still running after {timeout:.0f} s; see its log")


def _remote_state(remote: dict[str, Any]) -> str:
    if remote.get("terminated"):
        return (
            f"TERMINATED: {remote['terminated']}; what is cached still reads, pending changes are kept "
            "(recover them with 'baifs salvage')"
        )
    state = "reachable"
    if not remote.get("reachable", True):
        state = f"away for {remote.get('away_for_seconds')} s ({remote.get('last_failure')})"
    rate = remote.get("rate") or {}
    if rate.get("paused_for_seconds"):
        state += (
            f"; RATE LIMITED: the manager refused this keypair's requests (429); nothing is sent for "
            f"{rate['paused_for_seconds']:.0f} s more"
        )
    elif rate.get("limit"):
        left, limit, window = rate["remaining"], rate["limit"], rate["window_seconds"]
        state += f"; rate limit: {left} of {limit} requests left in {window:g} s"
    if remote.get("unresolved_flush"):
        state += f"; the outcome of flush run {remote['unresolved_flush']} is not known yet"
    elif remote.get("unconcluded_run"):
        state += f"; run {remote['unconcluded_run']} is still to be read to its end"
    return state


#: After this long without a first answer, a run of ours is probably queued behind another client's.
UNANSWERED_SECONDS = 5


def _slot(slot: dict[str, Any]) -> str:
    """Who holds the session's one execution slot, and what waits for it."""
    if not slot.get("run"):
        state = "free"
    else:
        state = f"held by {slot.get('purpose') or 'a run'} of this mount for {slot.get('seconds')} s"
        if slot.get("inbox"):
            state += " (its supervisor runs the mount's scripts meanwhile)"
        elif not slot.get("answered") and (slot.get("seconds") or 0) > UNANSWERED_SECONDS:
            state += ", not started by the session yet: another client's run holds the session"
    if slot.get("waiting"):
        state += "; waiting for it: " + ", ".join(slot["waiting"])
    return state


def _profile(profile: dict[str, Any]) -> str:
    """What the mount learnt of the session: folders, upload ownership, the agent's behaviour."""
    if not profile.get("source"):
        return "not known yet (discovery waits for the session; uploads are verified meanwhile)"
    folders = ", ".join(profile["folders"]) or "none"
    if profile["folders"] and profile.get("folders_from"):
        folders += f" (from {profile['folders_from']})"
    owned: dict[bool | None, str] = {
        True: "the container user",
        False: "another user: the mount's files are placed by runs",
        None: "an unknown user",
    }
    return (
        f"virtual folders: {folders}; uploads belong to {owned[profile.get('uploads_owned')]}"
        f" (container uid {profile.get('container_uid')}); agent phases: {profile.get('phase_behaviour')}; "
        f"upload names: {profile.get('upload_names')}; {_learnt(profile)}"
    )


def _learnt(profile: dict[str, Any]) -> str:
    when = moment(profile.get("learnt_at"))
    at = f" on {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))}" if when else ""
    return {
        "discovered": f"discovered{at}",
        "last mount": f"discovered by an earlier mount{at}",
        "vanished uploads": "guessed from uploads that did not arrive (discovery pending)",
    }.get(profile["source"], profile["source"])


def format_status(document: dict[str, Any]) -> str:
    """``baifs status`` for a person: what is pending, what the mount did, what went wrong."""
    pending, cache = document["pending"], document["cache"]
    api, flushes = document["session_api"], document["flushes"]
    remote = document.get("remote") or {}
    lines = [
        f"session     {document['session']} ({document['session_id']}) at {document['endpoint']}",
        f"mountpoint  {document['mountpoint']} (daemon pid {document['pid']})",
        f"log         {document.get('log') or 'standard error of the daemon'}",
        f"remote      {_remote_state(remote)}",
        f"profile     {_profile(document.get('profile') or {})}",
        f"slot        {_slot(document.get('slot') or {})}",
        f"pending     {pending['uploads']} upload(s), {pending['upload_bytes']:,} bytes; "
        f"{pending['namespace_changes']} namespace change(s)",
    ]
    lines += [f"            {path}" for path in pending["paths"]]
    if pending.get("more_paths"):
        lines.append(f"            … and {pending['more_paths']:,} more")
    if document["flush"]:
        flushing = document["flush"]
        lines.append(
            f"flushing    {flushing['files_done']}/{flushing['files_total']} files, "
            f"{flushing['bytes_done']:,}/{flushing['bytes_total']:,} bytes"
        )
    lines += [
        f"cache       {cache['bytes']:,} of {cache['limit']:,} bytes; {cache['staged_bytes']:,} bytes staged",
        f"flushes     {flushes['completed']} done, {flushes['uploaded_files']} files uploaded, "
        f"{flushes['scripts']} scripts, {flushes['failures']} failed",
        "requests    " + (", ".join(f"{name} {count}" for name, count in api["requests"].items()) or "none"),
        f"retries     {api['retries']}",
    ]
    if document.get("recovered_changes"):
        lines.append(
            f"recovered   {document['recovered_changes']} change(s) an earlier mount had not uploaded"
        )
    for copy in document.get("conflict_copies", []):
        lines.append(f"conflict    {copy}: this machine's version of a file the session changed meanwhile")
    for refusal in flushes.get("refused", []):
        lines.append(f"refused     {_refusal(refusal)}")
    if flushes.get("holding"):
        lines.append(
            "            write-back holds these: they are tried at the next change, 'baifs sync' or the "
            "next mount"
        )
    if flushes.get("kept_in_session"):
        lines.append(
            f"kept        {flushes['kept_in_session']} removal(s) not done: the session held something "
            "there the mount never saw (see the log)"
        )
    if flushes["last_error"] and not flushes.get("refused"):
        lines.append(f"last flush error: {flushes['last_error']}")
    lines += [f"error       {error}" for error in api["last_errors"]]
    return "\n".join(lines)
