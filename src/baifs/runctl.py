"""``baifs run``: start a batch run through a mount's ``.run`` and follow it to its end.

The client side of the control files (`baifs.fs.control`):

- submit: open ``.run``, write the request as TOML, ``fsync`` (the mount
  submits the request then, and refuses a bad one with EINVAL), and read the
  same descriptor back: it answers with the status of *this* run, so
  concurrent submitters never mix up their run numbers;
- follow: copy new bytes of ``.runs/N/stdout`` and ``stderr`` to this
  process's standard output and error as they grow, until the run's status
  says it is finished or failed;
- interrupt: on Ctrl-C, set ``user.baifs.interrupt`` on ``.run`` to the run's
  number; the mount asks the session to interrupt the command.

This module imports nothing heavy: a run's overhead is mostly the run.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from . import controlfiles
from .errors import BaifsError

#: Exit status when the mount could not carry a run out (like ssh's 255).
RUN_FAILED_EXIT = 255
POLL_FIRST = 0.01
POLL_MAX = 0.2


class RunRefused(BaifsError):
    """The mount refused the run request; the message says why."""


class MountGone(BaifsError):
    """The mount stopped answering while a run was submitted or followed."""


def command_line(words: list[str]) -> str:
    """One word is a shell command as it stands; several are quoted and joined."""
    return words[0] if len(words) == 1 else shlex.join(words)


def request_text(exec_command: str, build: str = "", clean: str = "") -> bytes:
    """The TOML request for ``.run`` (JSON strings are valid TOML basic strings)."""
    steps = {"clean": clean, "build": build, "exec": exec_command}
    return "".join(
        f"{key} = {json.dumps(value, ensure_ascii=False)}\n" for key, value in steps.items()
    ).encode()


def submit(mountpoint: Path, request: bytes) -> dict[str, Any]:
    """Submit a run request; returns the new run's status (with its number)."""
    descriptor = os.open(mountpoint / controlfiles.RUN, os.O_RDWR | os.O_TRUNC)
    try:
        os.write(descriptor, request)
        try:
            os.fsync(descriptor)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSPC):
                raise
            reason = json.loads((mountpoint / controlfiles.RUN).read_bytes()).get("last_rejected")
            raise RunRefused(f"the mount refused the run: {reason or error.strerror}") from None
        return json.loads(os.pread(descriptor, 1 << 20, 0))
    finally:
        os.close(descriptor)


class Follower:
    """Copies a run's output as it grows and waits for its end."""

    def __init__(self, mountpoint: Path, number: int, stdout: BinaryIO, stderr: BinaryIO) -> None:
        self.mountpoint = mountpoint
        self.number = number
        self.directory = mountpoint / controlfiles.RUNS / str(number)
        self.targets = {"stdout": stdout, "stderr": stderr}
        self.offsets = {"stdout": 0, "stderr": 0}
        self.interrupts = 0

    def status(self) -> dict[str, Any]:
        return json.loads((self.directory / "status").read_bytes())

    def pump(self) -> bool:
        """Copy what is new in stdout and stderr; whether anything was."""
        moved = False
        for stream, target in self.targets.items():
            with open(self.directory / stream, "rb") as handle:
                handle.seek(self.offsets[stream])
                data = handle.read()
            if data:
                target.write(data)
                target.flush()
                self.offsets[stream] += len(data)
                moved = True
        return moved

    def interrupt(self, signal_number: int, frame: object) -> None:
        self.interrupts += 1
        if self.interrupts > 1:
            raise KeyboardInterrupt
        try:
            os.setxattr(
                self.mountpoint / controlfiles.RUN, controlfiles.INTERRUPT_XATTR, str(self.number).encode()
            )
        except OSError as error:
            print(f"baifs: could not interrupt run {self.number}: {error.strerror}", file=sys.stderr)

    def wait(self) -> dict[str, Any]:
        """Follow the run to its end; returns its final status."""
        delay = POLL_FIRST
        while True:
            status = self.status()
            moved = self.pump()
            if status["state"] in ("finished", "failed"):
                self.pump()
                return status
            delay = POLL_FIRST if moved else min(POLL_MAX, delay * 1.5)
            time.sleep(delay)


def stdin_has_input() -> bool:
    """Whether standard input is a pipe or a non-empty file (input a batch run cannot be given)."""
    try:
        info = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (
        stat.S_ISFIFO(info.st_mode)
        or stat.S_ISSOCK(info.st_mode)
        or (stat.S_ISREG(info.st_mode) and info.st_size > 0)
    )


def run(mountpoint: Path, words: list[str], *, build: str = "", clean: str = "") -> int:
    """``baifs run``: the run's exit code (130 after Ctrl-C, 255 when the mount could not run it)."""
    if stdin_has_input():
        # A batch run has no standard input (the session API has no way to give it one), and a
        # stream cannot be staged ahead (it may never end): say so rather than drop it unseen.
        print(
            "baifs: standard input is not passed to the run (a batch run has none); put the data in "
            "the mount and redirect in the command: baifs run -- 'sort < data.txt'",
            file=sys.stderr,
        )
    try:
        status = submit(mountpoint, request_text(command_line(words), build, clean))
        follower = Follower(mountpoint, int(status["number"]), sys.stdout.buffer, sys.stderr.buffer)
        previous = signal.signal(signal.SIGINT, follower.interrupt)
        try:
            final = follower.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    except OSError as error:
        raise MountGone(
            f"the mount at {mountpoint} stopped answering ({error.strerror or error}); see 'baifs status'"
        ) from None
    if final.get("output_note"):
        print(f"baifs: run {follower.number}: {final['output_note']}", file=sys.stderr)
    if final["state"] == "failed":
        print(f"baifs: run {follower.number} failed: {final['error']}", file=sys.stderr)
        return 130 if follower.interrupts else RUN_FAILED_EXIT
    if follower.interrupts:
        return 130
    code = int(final["exit_code"])
    return code if 0 <= code <= 255 else RUN_FAILED_EXIT
