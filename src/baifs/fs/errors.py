"""What a system call gets back when it fails, and how a wait for the session becomes that.

`FSError` carries an errno to the FUSE adapter. `bounded` awaits remote
work for a system call: the wait lasts while the session makes progress
(`watchdog`), and what the session answered becomes an errno: a run holding
the execution slot EAGAIN, a path the session refused its own errno,
anything else EIO (logged). `StaleContent` passes through unchanged: the
caller lists again and retries.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable
from typing import TypeVar

from ..api.errors import RemotePathError, SessionBusy
from ..errors import BaifsError
from .watchdog import Watchdog

log = logging.getLogger(__name__)

T = TypeVar("T")


class FSError(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


class StaleContent(BaifsError):
    """The remote file no longer is the version the listing reported."""


async def bounded(watchdog: Watchdog, awaitable: Awaitable[T]) -> T:
    """Await a remote operation for a system call, bounded by the session's progress."""
    try:
        with watchdog.bounded():
            return await awaitable
    except (FSError, StaleContent):
        raise
    except SessionBusy as error:
        log.warning("%s", error)
        raise FSError(errno.EAGAIN, str(error)) from error
    except RemotePathError as error:
        raise FSError(error.errno or errno.EIO, str(error)) from error
    except BaifsError as error:
        log.error("remote operation failed: %s", error)
        raise FSError(errno.EIO, str(error)) from error
