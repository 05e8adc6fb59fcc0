"""Running tasks side by side without letting trio's exception groups reach callers.

trio wraps every failure that leaves a nursery in an ``ExceptionGroup``, even a
single one. Callers in baifs branch on the project's own exception classes
(``except BaifsError``), which an ``ExceptionGroup`` passes straight through:
one failed upload among four parallel requests would then end a background
loop, and with it the mount. Every place that runs tasks side by side goes
through `gather`, which owns the rule:

- the first task that fails cancels the others, and its exception is raised
  as it is (the failures of siblings cancelled because of it are not
  errors of their own);
- a cancellation from outside still propagates as trio's ``Cancelled``, so the
  cancel scope that asked for it absorbs it;
- at most ``limit`` tasks run at once.

`keep_running` is the last line of defence of a background loop: a loop
handles the failures it expects itself; anything else is logged with its
traceback and the loop starts again, so no bug in one task ends the mount.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)
RESTART_DELAY = 1.0
T = TypeVar("T")


async def gather(tasks: Iterable[Callable[[], Awaitable[object]]], *, limit: float = math.inf) -> None:
    """Run ``tasks`` concurrently; raise the first failure alone, after the rest stopped."""
    failures: list[Exception] = []
    limiter = trio.CapacityLimiter(limit)

    async def guarded(task: Callable[[], Awaitable[object]], nursery: trio.Nursery) -> None:
        try:
            async with limiter:
                await task()
        except Exception as error:
            if not failures:
                failures.append(error)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(guarded, task, nursery)
    if failures:
        raise failures[0]


async def gather_each(
    function: Callable[[T], Awaitable[object]], items: Iterable[T], *, limit: float = math.inf
) -> None:
    """`gather` of ``function(item)`` for every item."""
    await gather((functools.partial(function, item) for item in items), limit=limit)


async def keep_running(name: str, loop: Callable[[], Awaitable[object]]) -> None:
    """Run a background loop; if it fails unexpectedly, log it and start it again."""
    while True:
        try:
            await loop()
            return
        except Exception:
            log.exception("%s failed unexpectedly; starting it again", name)
            await trio.sleep(RESTART_DELAY)
