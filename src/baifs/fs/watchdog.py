"""How long a system call may wait for the session: bounded by the remote's progress.

A system call that needs the session (a listing for ``ls``, content for
``cat``, an upload for ``fsync``) waits while the session makes progress, and
gives up once it has made none for `STALL_SECONDS`: a remote that accepts
connections and never answers costs a caller 20 s, not the minutes of every
retry of every request. Progress is `RemoteHealth.progress`: any answer from
the session, and upload content going out, so a large ``fsync`` on a slow
link keeps waiting as long as bytes move.

`Watchdog.bounded` wraps the wait in a cancel scope whose deadline the
watchdog's one ticker task pushes forward whenever progress moved; a caller
cut off raises `RemoteStalled` and the work it had started is cancelled with
it (the sync engine loses nothing to cancellation; background work, such as
write-back and downloads queued for workers, goes on).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

from ..errors import BaifsError

#: How long a system call waits for a session that makes no progress at all.
STALL_SECONDS = 20.0
#: A session that made no progress this long while a call waited for it counts as away.
AWAY_SECONDS = 4.0
TICK_SECONDS = 1.0


class Progress(Protocol):
    """What the watchdog reads of the remote's health (`baifs.api.client.RemoteHealth`)."""

    @property
    def progress(self) -> int: ...

    @property
    def away(self) -> bool: ...

    def failed(self, reason: str) -> None: ...


class RemoteStalled(BaifsError):
    """The session made no progress for `STALL_SECONDS` while a system call waited for it."""


class Watchdog:
    def __init__(self, health: Progress, stall: float = STALL_SECONDS) -> None:
        self.health = health
        self.stall = stall
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The ticker: push every waiting caller's deadline forward while the remote makes progress.

        A remote that made no progress for `AWAY_SECONDS` while callers wait
        counts as away (`RemoteHealth.failed`), so what the mount knows is
        served at once instead of after a wait.
        """
        seen = self.health.progress
        moved_at = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(TICK_SECONDS)
            now = trio.current_time()
            if self.health.progress != seen:
                seen, moved_at = self.health.progress, now
                for scope in self._scopes:
                    scope.deadline = max(scope.deadline, now + self.stall)
            elif self._scopes and now - moved_at >= AWAY_SECONDS and not self.health.away:
                self.health.failed(f"no answer for {now - moved_at:.0f} s")
            elif not self._scopes:
                moved_at = now

    @contextmanager
    def bounded(self, what: str = "the session") -> Iterator[None]:
        """Run the block; `RemoteStalled` once the remote made no progress for ``stall`` seconds."""
        scope = trio.CancelScope(deadline=trio.current_time() + self.stall)
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise RemoteStalled(f"{what} made no progress for {self.stall:.0f} s; giving up on this call")
