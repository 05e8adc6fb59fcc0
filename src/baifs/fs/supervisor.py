"""Runs the mount starts carry a supervisor, so the mount's own scripts need not wait for them.

A session runs one execution at a time, and a user's run may hold it for
hours. Every run the mount starts (``.run``, ``baifs run``) is therefore
wrapped in a small POSIX ``sh`` supervisor (`supervised_script`):

- the user's steps run in the foreground exactly as they would alone: same
  working directory, same standard output and error (the supervisor writes
  nothing to either), same exit code; an interrupt reaches them as it would
  alone (see `Supervisor.interrupt`);
- meanwhile a background loop serves an *inbox*: request scripts the mount
  uploads as ``.baifs-tmp/<box>.req.<n>`` (complete once their last line is
  ``# baifs-request <n>``), taken strictly in order, each run with ``sh`` and
  its results written as ``<box>.out.<n>``, ``<box>.err.<n>`` and, last,
  ``<box>.code.<n>`` (its presence says the request is done); each request
  also removes the results the mount has read since the one before;
- when the steps end, the loop finishes the request it is running, removes
  requests it has not taken, and only then does the supervisor exit: once the
  run has ended, a request without a ``code`` file never ran and never will
  (`InboxClosed`). The results left behind are litter the mount's next
  script removes, so nothing stays in ``/home/work``.

The mount's side is `Inbox` (one per supervised run) and `Supervisor`, which
knows the inbox of the mount's run that holds the execution slot
(`Supervisor.available`); the remote seam (`remote.RemoteTree.run`) sends a
script there while it is open, and the sync engine its flush scripts
(`sync.SyncEngine.flush`). Both talk to the session only through the seam.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..errors import BaifsError
from . import scratch

if TYPE_CHECKING:
    from .remote import BatchSteps, Remote
    from .scratch import Scratch

log = logging.getLogger(__name__)

#: How often the supervisor looks at its inbox, and the mount at the results (growing to the second).
LOOP_SLEEP = "0.1"
POLL_FIRST, POLL_MAX = 0.05, 0.5
#: How long after an interrupt the mount relays it through the inbox, if the steps still run.
RELAY_AFTER = 0.5
#: The supervisor's loop touches ``<box>.alive`` every second; unchanged this long, the loop is gone.
HEARTBEAT_STALE = 10.0


#: A request that interrupts the supervisor's child (the steps), not the inbox loop running it.
RELAY_INTERRUPT = """for entry in /proc/[0-9]*; do
  parent=$(sed -n 's/^PPid:[[:space:]]*//p' "$entry/status" 2>/dev/null)
  [ "$parent" = "$BAIFS_SUPERVISOR" ] && [ "${entry#/proc/}" != "$PPID" ] && kill -INT "${entry#/proc/}"
done
true"""


class InboxClosed(BaifsError):
    """The run ended before its supervisor took the request: it never ran, and never will."""


class InboxStalled(InboxClosed):
    """The supervisor's loop is gone (its heartbeat stopped) before it took the request."""


@dataclass(frozen=True)
class ScriptResult:
    exit_code: int | None
    stdout: str
    stderr: str
    #: False when the loop died while it ran the request: the output may stop short.
    complete: bool = True


def supervised_script(steps: BatchSteps, box: bytes, keep_tmp: bool = False) -> str:
    """The supervisor around ``steps`` (see the module docstring); ``box`` names its inbox files.

    At its end it removes ``.baifs-tmp`` if that is empty now, unless
    ``keep_tmp`` (the profile keeps it: uploads would remake it foreign).
    """
    prefix = scratch.inbox_prefix(box).decode("ascii")
    loop = f"""(
  trap 'stop=1' TERM
  stop=
  n=0
  while :; do
    request={prefix}.req.$n
    if [ -f "$request" ] && [ "$(tail -n 1 "$request")" = "# baifs-request $n" ]; then
      mv -f -- "$request" {prefix}.run.$n
      BAIFS_SUPERVISOR=$supervisor sh {prefix}.run.$n > {prefix}.out.$n 2> {prefix}.err.$n
      echo "$?" > {prefix}.code.$n.part
      mv -f -- {prefix}.code.$n.part {prefix}.code.$n
      rm -f -- {prefix}.run.$n
      n=$((n + 1))
      continue
    fi
    [ -n "$stop" ] && break
    kill -0 "$supervisor" 2>/dev/null || break
    sleep {LOOP_SLEEP} 2>/dev/null || sleep 1
  done
  rm -f -- {prefix}.req.*
) > /dev/null 2>&1 < /dev/null &"""
    return "\n".join(
        [
            f"mkdir -p -- {scratch.ROOT.decode()} 2>/dev/null",
            "supervisor=$$",
            loop,
            "inbox=$!",
            f"(trap 'exit 0' TERM; while kill -0 \"$inbox\" 2>/dev/null; do : > {prefix}.alive; "
            'sleep 1 & wait "$!"; done) > /dev/null 2>&1 &',
            "beat=$!",
            "trap : INT",
            "(",
            steps.script(),
            ")",
            "code=$?",
            'kill -TERM "$inbox" 2>/dev/null',
            'while kill -0 "$inbox" 2>/dev/null; do wait "$inbox"; done',
            'kill "$beat" 2>/dev/null',
            'while kill -0 "$beat" 2>/dev/null; do wait "$beat"; done',
            f"rm -f -- {prefix}.alive",
            *([] if keep_tmp else [f"rmdir -- {scratch.ROOT.decode()} 2>/dev/null"]),
            'exit "$code"',
        ]
    )


@dataclass(frozen=True)
class SupervisedSteps:
    """Steps wrapped in a supervisor, as the executor sends them."""

    steps: BatchSteps
    box: bytes
    keep_tmp: bool = False

    def script(self) -> str:
        return supervised_script(self.steps, self.box, self.keep_tmp)


@dataclass
class Inbox:
    """The mount's side of one supervised run's inbox."""

    remote: Remote
    scratch: Scratch
    box: bytes
    #: set once the run is over (its supervisor has exited).
    ended: trio.Event = field(default_factory=trio.Event)
    _next: int = 0
    #: requests reserved but not known to be in the session yet (sent again, in order, until they are).
    _unsent: dict[int, str] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    #: results each delivered request removes first: removed only once that request has run.
    _removing: dict[int, list[bytes]] = field(default_factory=dict)
    #: the heartbeat's last mtime, and when this mount saw it change; set once the loop is gone.
    _beat: tuple[int, float] | None = None
    dead: bool = False
    #: no request goes to it any more (`Supervisor.close`): what it read is any script's to remove.
    closed: bool = False

    def _read_results(self, paths: list[bytes]) -> None:
        """Result files read (or to remove again): the inbox's next request removes them while it
        is open, the next flush or ranged read once it is closed."""
        if self.closed:
            self.scratch.note_litter(paths)
        else:
            self.scratch.note_results(paths)

    def _name(self, kind: str, number: int) -> bytes:
        return scratch.inbox_file(self.box, kind, number)

    def reserve(self, script: str) -> int:
        """Number ``script`` as the next request; `deliver` sends it."""
        if self.ended.is_set():
            raise InboxClosed("the run has ended")
        number, self._next = self._next, self._next + 1
        self._unsent[number] = script
        return number

    async def deliver(self) -> None:
        """Send every reserved request, in order: the supervisor takes none until the one before is in.

        A request whose upload failed stays reserved and goes with the next
        delivery (sending it twice is harmless: the supervisor takes a number
        once). Each request first removes the results read since the one
        before; they count as removed only once it has run (`outcome`).
        """
        async with self._lock:
            for number in sorted(self._unsent):
                read = self.scratch.take_results()  # inbox names are ASCII
                removal = "".join(f"rm -f -- {shlex.quote(path.decode('ascii'))}\n" for path in read)
                body = f"{removal}{self._unsent[number].rstrip()}\n# baifs-request {number}\n".encode()
                try:
                    await self.remote.send([(self._name("req", number), body)])
                except BaseException:
                    self._read_results(read)
                    raise
                del self._unsent[number]
                self._removing[number] = read

    async def request(self, script: str) -> ScriptResult:
        """Run ``script`` through the inbox; `InboxClosed` if the run ended before it was taken."""
        number = self.reserve(script)
        await self.deliver()
        return await self.outcome(number)

    async def outcome(self, number: int) -> ScriptResult:
        """The results of request ``number`` once it is done; `InboxClosed` if it never will be.

        Unless it ran to its end, the results it was to remove are still to remove.
        """
        try:
            result = await self._until_done(number)
        except BaseException:
            self._read_results(self._removing.pop(number, []))
            raise
        removed = self._removing.pop(number, [])
        if not result.complete:
            self._read_results(removed)
        return result

    async def _until_done(self, number: int) -> ScriptResult:
        delay = POLL_FIRST
        while True:
            ended = self.ended.is_set()  # before the listing: an end seen now means no later change
            if number in self._unsent:
                if ended:
                    raise InboxClosed(f"the run ended before request {number} reached it")
                await self.deliver()
            names = await self.remote.list_scratch()
            if self._base("code", number) in names:
                return await self._read(number)
            if ended:
                raise InboxClosed(f"the run ended before it took request {number}")
            if not self._beating(names):
                self.dead = True
                log.warning("the supervisor of the mount's run stopped answering; scripts wait for the slot")
                self._read_results(
                    [
                        self._name("req", number),
                        self._name("run", number),
                        self._name("code", number) + b".part",
                    ]
                )
                if self._base("out", number) not in names:
                    raise InboxStalled(f"the supervisor is gone; request {number} was never taken")
                return await self._read(number, complete=False)
            with trio.move_on_after(delay):
                await self.ended.wait()
            delay = min(delay * 2, POLL_MAX)

    def _base(self, kind: str, number: int) -> bytes:
        return self._name(kind, number).rpartition(b"/")[2]

    def _beating(self, names: dict[bytes, int]) -> bool:
        """Whether the loop's heartbeat changed within `HEARTBEAT_STALE` seconds of this mount's clock."""
        mtime, now = names.get(scratch.heartbeat(self.box).rpartition(b"/")[2], -1), trio.current_time()
        if self._beat is None or self._beat[0] != mtime:
            self._beat = (mtime, now)
        return now - self._beat[1] < HEARTBEAT_STALE

    async def _read(self, number: int, *, complete: bool = True) -> ScriptResult:
        kinds = ("out", "err", "code") if complete else ("out", "err")
        paths = [self._name(kind, number) for kind in kinds]
        texts = [data.decode("utf-8", "replace") for data in await self.remote.read_files(paths)]
        self._read_results(paths)
        if not complete:
            return ScriptResult(None, texts[0], texts[1], complete=False)
        return ScriptResult(int(texts[2].strip() or "1"), texts[0], texts[1])


class Supervisor:
    """Which supervised run of the mount is going, and its inbox for the mount's scripts."""

    def __init__(self, remote: Remote, scratch: Scratch) -> None:
        self.remote = remote
        self.scratch = scratch
        #: the inbox of the mount's run that holds the execution slot, if one does.
        self.inbox: Inbox | None = None
        #: heartbeats looked at by `heartbeat`: run id -> (mtime, when it was seen to change).
        self._beats: dict[str, tuple[int, float]] = {}
        #: waits for the slot that an inbox opening calls off (`take_slot`).
        self._slot_waits: set[trio.CancelScope] = set()

    def open(self, run_id: str) -> Inbox:
        """The inbox of the supervised run ``run_id``, named after it (a later mount finds its heartbeat)."""
        inbox = Inbox(self.remote, self.scratch, scratch.box_of(run_id))
        self.inbox = inbox
        for waiting in self._slot_waits:
            waiting.cancel()
        return inbox

    async def take_slot(self, held: AsyncExitStack, queue_timeout: float, purpose: str) -> bool:
        """Take the session's execution slot into ``held``; False, without it, if an inbox opened
        meanwhile (or is `available` already): the script goes there instead.

        A run of the mount takes the slot, flushes what is pending, and only then opens its inbox:
        a script that came in between would otherwise wait for the slot until the run ends (hours),
        and a system call waiting for it fail with EAGAIN. `SessionBusy` after ``queue_timeout``.
        """
        with trio.CancelScope() as waiting:
            if self.available() is not None:
                waiting.cancel()
            self._slot_waits.add(waiting)
            try:
                await held.enter_async_context(self.remote.slot(queue_timeout, purpose))
            finally:
                self._slot_waits.discard(waiting)
        return not waiting.cancelled_caught

    async def heartbeat(self, run_id: str) -> bool:
        """Whether run ``run_id`` is a supervised run whose heartbeat says its steps still go.

        The first look at a heartbeat file counts as alive; after that it must
        change within `HEARTBEAT_STALE` seconds. A run without one (a flush
        script, a run of another client) is not known to go. When the
        listing fails, a heartbeat seen before counts as still going.
        """
        try:
            names = await self.remote.list_scratch()
        except BaifsError as error:
            log.info("could not look at the heartbeat of run %s (%s)", run_id, error)
            return run_id in self._beats
        alive = scratch.heartbeat(scratch.box_of(run_id)).rpartition(b"/")[2]
        if alive not in names:
            self._beats.pop(run_id, None)
            return False
        seen = self._beats.get(run_id)
        if seen is None or seen[0] != names[alive]:
            self._beats[run_id] = seen = (names[alive], trio.current_time())
        return trio.current_time() - seen[1] < HEARTBEAT_STALE

    def close(self, inbox: Inbox, *, ended: bool) -> None:
        """No new requests for ``inbox``; ``ended`` once its run is surely over (else see `conclude`)."""
        inbox.closed = True
        if self.inbox is inbox:
            self.inbox = None
            self.scratch.results_are_litter()
        if ended:
            inbox.ended.set()

    async def conclude(self, inbox: Inbox) -> None:
        """The run's end was not read: it is over once the session has concluded it (in the slot)."""
        delay = 1.0
        while True:
            try:
                async with self.remote.slot():
                    break
            except BaifsError as error:
                log.warning("the mount's run is not concluded yet (%s); trying again in %.0f s", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)
        inbox.ended.set()

    def available(self) -> Inbox | None:
        """The inbox to send a script to now, if the mount's own run holds the slot."""
        inbox = self.inbox
        usable = inbox is not None and not inbox.ended.is_set() and not inbox.dead
        return inbox if usable and self.remote.busy else None

    async def relay_interrupt(self, still_running: Callable[[], bool]) -> None:
        """After the session was asked to interrupt the mount's run: through the inbox, if that did not do.

        Agents signal only the shell they started. Without a supervisor that
        shell has become the user's command by ``exec``; here it is the
        supervisor, which waits for the steps, so a request signals the
        supervisor's child instead (the process that ``exec`` made the
        command), as the agent would have. `baifs serve` signals the whole
        process group itself, so the relay follows only when the steps still
        run ``RELAY_AFTER`` seconds later.
        """
        inbox = self.inbox
        if inbox is None:
            return
        await trio.sleep(RELAY_AFTER)
        if still_running() and not inbox.ended.is_set():
            log.info("relaying the interrupt through the run's supervisor")
            try:
                await inbox.request(RELAY_INTERRUPT)
            except BaifsError as error:
                log.warning("could not relay the interrupt (%s)", error)
