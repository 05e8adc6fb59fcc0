"""Batch executions in a session, driven to their end on every agent version.

A batch execution has three steps (clean, build, exec) and the agent reports
the end of each one in a separate response (reference §3.1, §3.5). Agents
disagree on what happens after ``clean-finished``/``build-finished``: older ones
keep the run current until ``finished`` is read ("resume"); newer ones conclude
the run and drop the frames that arrive before the next request ("detach"),
which can leave a multi-step run polling forever and block the session.

The strategy here (reference §11) sidesteps that: the three steps are composed
into one shell script that runs in the ``clean`` slot, so the whole output and
the exit code arrive before or with the first phase marker. Then:

- on a "resume" agent, ``continue`` is sent until ``finished`` (two more
  requests, each answered at once);
- on a "detach" agent, the run is already concluded; the executor waits 100 ms
  so the trailing markers are dropped instead of landing in the next run;
- while the behaviour is unknown, the executor sends one ``continue``: an
  immediate marker means "resume"; ``continued`` with no output means
  "detach", and the run is concluded by re-sending an all-empty batch under
  the same run id.

A run whose end was not read (a response lost after the server acted on
the request, a cancelled caller, a session that stopped answering, or a run
an earlier process left: `adopt`) is *unconcluded*: the session keeps it
current and would make every other run wait for it. The executor therefore
concludes it, by ``continue`` on the same run id until its marker arrives,
before it lets anyone else use the execution slot. A lost answer to the
initial ``batch`` request is followed the same way, so the command is never
sent twice and its remaining output still arrives; what the lost answer
carried is reported as missing (`BatchOutcome.complete`).

Invariants:
- one execution in flight per session: a run holds the session's execution
  slot (`BatchExecutor.slot`) for its whole life, concluding requests
  included, and no run starts while another is unconcluded;
- the run id is handed to ``runs.started`` (which records it durably) before
  the first request is sent, and ``runs.concluded`` is told that same id only
  once that run is concluded, so a run concluding in the background never
  clears the record of the run after it; if it cannot be recorded, nothing is
  sent;
- a run starts only once the run before it is read to its end, also within
  one holder of the slot (a flush, then a user's run);
- every run is driven until the session has concluded it, or raises
  `SessionWedged` naming the cause and stays unconcluded; a run never hangs
  silently;
- console output reaches the caller's sink as each response arrives;
- the initial ``batch`` request is never repeated (the command must not run
  twice); ``continue`` requests, which only read output, are retried.
"""

from __future__ import annotations

import logging
import math
import secrets
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .client import SessionClient
from .errors import APIError, BaifsError, EndpointUnreachable, ServerError, SessionBusy, SessionWedged

log = logging.getLogger(__name__)

ConsoleSink = Callable[[str, str], Awaitable[None]]
PHASE_MARKERS = ("clean-finished", "build-finished")
#: The exit code the runner reports when the build step failed (reference §3.1).
BUILD_FAILED_EXIT = 127
DETACH_SETTLE_SECONDS = 0.1
CONTINUE_ATTEMPTS = 3
#: What a real agent answers once its output queues lost a run: a run queued behind another
#: (another client's, or another mount's) was activated and broke them (reference gap 3).
LOST_QUEUE_TEXTS = ("is not found! (might be terminated", "OutputQueueMismatchError")
LOST_QUEUE_MESSAGE = (
    "the session's agent lost track of its runs: a run queued behind another (another client's or "
    "another mount's) broke its run queue, a known fault of Backend.AI agents. Files can still be "
    "read and written through the mount; runs cannot: start a new session (or have the agent restarted)"
)


def lost_queue(error: ServerError) -> bool:
    """Whether a 5xx is the agent's answer after its output queues lost a run."""
    return any(text in error.msg for text in LOST_QUEUE_TEXTS)


@dataclass(frozen=True)
class BatchSteps:
    """The three steps of a batch execution; an empty step is skipped."""

    exec: str
    build: str = ""
    clean: str = ""
    #: where the steps start, relative to /home/work ("" is /home/work itself, the runner's).
    cwd: str = ""

    def script(self) -> str:
        """One shell script with the runner's semantics for the three steps.

        Each step runs in a fresh ``/bin/sh -c``; clean's exit code is ignored;
        a failed build skips exec and ends with 127, saying so on stderr; exec sees
        ``_BACKEND_BATCH_MODE=1``. With ``cwd`` the steps start there (a
        directory that is not there fails the run with 1, before any step).
        """
        lines = [f"cd -- {shlex.quote(self.cwd)} || exit 1"] if self.cwd else []
        if self.clean.strip():
            lines.append(f"/bin/sh -c {shlex.quote(self.clean)}")
        if self.build.strip():
            failed = BUILD_FAILED_EXIT
            said = f'"baifs: the build step failed (exit $built); the command was not run (exit {failed})"'
            build = shlex.quote(self.build)
            lines.append(f"/bin/sh -c {build} || {{ built=$?; echo {said} >&2; exit {failed}; }}")
        if self.exec.strip():
            lines.append(f"_BACKEND_BATCH_MODE=1 exec /bin/sh -c {shlex.quote(self.exec)}")
        return "\n".join(lines) if lines else "true"


class ComposedSteps(Protocol):
    """What a run sends: one script for the ``clean`` slot (`BatchSteps`, or steps wrapped around them)."""

    def script(self) -> str: ...


@dataclass(frozen=True)
class BatchOutcome:
    run_id: str
    #: the command's exit code; None when the answer that carried it was lost.
    exit_code: int | None
    #: False when an answer was lost on the way: some output may be missing.
    complete: bool = True


class RunRecorder(Protocol):
    """Keeps the id of the run not yet concluded where a successor process finds it."""

    async def started(self, run_id: str) -> None: ...

    async def concluded(self, run_id: str) -> None: ...


class BatchExecutor:
    """Runs batch executions in one session, one at a time."""

    def __init__(
        self,
        session: SessionClient,
        *,
        request_timeout: float = 30.0,
        runs: RunRecorder | None = None,
    ) -> None:
        self.session = session
        self.request_timeout = request_timeout
        #: told each run's id before its first request and again once it is
        #: concluded, so a successor process can conclude a run this one abandoned.
        self.runs = runs
        #: whether a run's command is known to still go (`_await_marker`); None: never known.
        self.liveness: Callable[[str], Awaitable[bool]] | None = None
        #: "unknown", "resume" or "detach" (see the module docstring).
        self.phase_behaviour = "unknown"
        self._lock = trio.Lock()
        self._current_run: str | None = None
        #: a run whose end the session has not given us yet (see the module docstring).
        self._unconcluded: str | None = None
        self._nursery: trio.Nursery | None = None
        #: set once the last run's trailing markers are read (runs concluded in the background).
        self._concluding: trio.Event | None = None
        #: what the current run is for ("run 3", "a flush", ...), since when, and whether it answered.
        self.purpose = ""
        self.started_at: float | None = None
        self.answered = False
        #: tasks waiting for the execution slot, and for what.
        self.waiting: list[str] = []

    @property
    def current_run_id(self) -> str | None:
        return self._current_run

    @property
    def unconcluded_run(self) -> str | None:
        return self._unconcluded

    @property
    def busy(self) -> bool:
        """Whether a run (or a caller holding the slot) has the session's execution slot."""
        return self._lock.locked()

    def adopt(self, run_id: str) -> None:
        """A run an earlier process left going: it is concluded before the next run starts."""
        self._unconcluded = run_id

    def slot_state(self) -> dict[str, Any]:
        """Who holds the execution slot and who waits for it, for ``baifs status``."""
        holder = self._current_run or self._unconcluded
        return {
            "run": holder,
            "purpose": self.purpose if holder else "",
            "seconds": None
            if self.started_at is None or not holder
            else round(trio.current_time() - self.started_at, 1),
            "answered": self.answered,
            "waiting": list(self.waiting),
        }

    @asynccontextmanager
    async def slot(self, queue_timeout: float = math.inf, purpose: str = "") -> AsyncIterator[None]:
        """Hold the session's one execution slot; `SessionBusy` after ``queue_timeout``.

        A run left unconcluded is concluded first, within the same wait. A
        caller that must do other work between runs without another run
        slipping in (a flush, then a user's run) holds the slot across both
        and starts runs with `run_held`.
        """
        acquired = ready = False
        self.waiting.append(purpose or "a run")
        try:
            with trio.move_on_after(queue_timeout):
                await self._lock.acquire()
                acquired = True
                await self._after_previous()
                ready = True
        except BaseException:
            if acquired:
                self._lock.release()
            raise
        finally:
            self.waiting.remove(purpose or "a run")
        if not ready:
            if acquired:
                self._lock.release()
            holder = self._current_run or self._unconcluded
            raise SessionBusy(f"the session is still busy with run {holder} after {queue_timeout:.0f} s")
        try:
            yield
        finally:
            self._lock.release()

    async def run(
        self,
        steps: ComposedSteps,
        on_console: ConsoleSink | None = None,
        run_id: str | None = None,
        *,
        queue_timeout: float = math.inf,
        purpose: str = "",
    ) -> BatchOutcome:
        """Run ``steps`` after earlier runs; `SessionBusy` if that takes over ``queue_timeout``."""
        async with self.slot(queue_timeout, purpose):
            return await self.run_held(steps, on_console, run_id, purpose=purpose)

    async def run_held(
        self,
        steps: ComposedSteps,
        on_console: ConsoleSink | None = None,
        run_id: str | None = None,
        *,
        purpose: str = "",
    ) -> BatchOutcome:
        """Run ``steps`` in the slot the calling task already holds (see `slot`)."""
        if not self._lock.locked():
            raise RuntimeError("run_held needs the execution slot")
        await self._after_previous()
        run_id = run_id or secrets.token_hex(16)
        if self.runs is not None:
            await self.runs.started(run_id)  # before anything is sent: a full disk stops the run here
        self._current_run = self._unconcluded = run_id
        self.purpose, self.started_at, self.answered = purpose, trio.current_time(), False
        try:
            return await self._drive(steps, run_id, on_console)
        finally:
            self._current_run = None

    async def run_background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Where runs are concluded after their caller has its result (see `_drive`)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._unconcluded is not None:
                    nursery.start_soon(self._conclude_adopted)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None  # from now on runs are concluded by their callers

    async def settle(self) -> None:
        """Read the last run to its end if that is still under way in the background.

        Before the process ends: a run left current would cost the next mount
        seconds to conclude (or block the session for every other client).
        """
        if self._concluding is not None:
            await self._concluding.wait()
        if self._unconcluded is not None and not self._lock.locked():
            try:
                async with self.slot():
                    pass
            except BaifsError as error:
                log.warning("run %s is left for the next mount to conclude (%s)", self._unconcluded, error)

    async def _conclude_adopted(self) -> None:
        """Free the session of a run an earlier process left, without waiting for a caller."""
        try:
            async with self.slot():
                pass
        except BaifsError as error:
            log.warning("could not conclude run %s yet (%s); the next run will", self._unconcluded, error)

    async def _after_previous(self) -> None:
        """Wait for the previous run's trailing markers, and conclude a run left unconcluded."""
        if self._concluding is not None:
            await self._concluding.wait()
        if self._unconcluded is not None:
            await self._conclude_unconcluded(self._unconcluded)

    async def _concluded(self, run_id: str) -> None:
        if self._unconcluded == run_id:
            self._unconcluded = None
        if self.runs is not None:
            await self.runs.concluded(run_id)

    async def _conclude_unconcluded(self, run_id: str) -> None:
        """Read a run whose end we missed to its end, so the session takes new runs."""
        log.info("run %s: reading it to its end before the next run", run_id)
        self._current_run = run_id
        self.purpose, self.started_at = "an earlier run, read to its end", trio.current_time()
        try:
            await self._await_marker(run_id)
        finally:
            self._current_run = None
        await self._concluded(run_id)
        log.info("run %s: concluded", run_id)

    async def _await_marker(self, run_id: str, sink: ConsoleSink | None = None) -> int | None:
        """Poll until a phase marker arrives, then conclude the run; the exit code it carried.

        Two silent polls in a row mean either a quiet command or an agent that
        already concluded the run and lost its markers (reference §3.5), or a
        run that never started; an all-empty batch under the same run id ends
        the run in the last two cases and only queues a no-op behind the
        command in the first. A marker that follows that batch may be the
        batch's own, so its exit code is not trusted. A no-op queued behind a
        command would answer the *next* run in its place (its markers, exit 0,
        no output), so no batch is sent while `liveness` says the run's
        command still goes (a supervised run's heartbeat).
        """
        silent = 0
        probed = False
        while True:
            result = await self._poll(run_id)
            await _deliver(result, sink)
            status = result["status"]
            if status in PHASE_MARKERS or status == "finished":
                trusted = status == "clean-finished" and not probed
                if status != "finished":
                    await self._conclude(run_id)
                return _exit_code(result) if trusted else None
            silent = 0 if result.get("console") else silent + 1
            if silent == 2 and not probed and self.liveness is not None and await self.liveness(run_id):
                silent = 0  # a quiet command that goes on: wait for its end
            if silent == 2 and not probed:
                probed = True
                result = await self._empty_batch(run_id)
                if result["status"] in PHASE_MARKERS:
                    await self._conclude(run_id)
                    return None

    async def interrupt(self) -> None:
        """Ask the session to interrupt the command of the current run."""
        await self.session.interrupt()

    async def _start(self, run_id: str, options: dict[str, Any]) -> dict[str, Any] | None:
        """The initial request; None when its answer was lost after the session may have acted."""
        try:
            return await self.session.execute("batch", run_id, options=options, timeout=self.request_timeout)
        except EndpointUnreachable as error:
            if not error.delivered:
                await self._concluded(run_id)  # it never left this host: there is no run
                raise
            log.warning("run %s: the answer to its start was lost (%s); following the run", run_id, error)
        except ServerError as error:
            if lost_queue(error) and (wedged := await self._wedged(run_id, error)) is not None:
                raise wedged from error
            log.warning("run %s: the start was answered %s; following the run in case it went", run_id, error)
        except APIError:
            await self._concluded(run_id)  # refused: nothing runs
            raise
        return None

    async def _drive(self, steps: ComposedSteps, run_id: str, sink: ConsoleSink | None) -> BatchOutcome:
        options = {"clean": steps.script(), "build": None, "exec": None, "buildLog": False}
        log.debug("run %s: starting", run_id)
        result = await self._start(run_id, options)
        self.answered = True
        if result is None:
            exit_code = await self._await_marker(run_id, sink)
            await self._concluded(run_id)
            return BatchOutcome(run_id, exit_code, complete=False)
        complete = True
        while True:
            await _deliver(result, sink)
            status = result["status"]
            if status == "clean-finished":
                # Everything is known: the composed script ran in the clean step.
                # The trailing markers are read in the background when there is a
                # background (the next user of the slot waits for that), so the
                # caller has its result one or two round trips sooner.
                if self._nursery is None:
                    await self._conclude(run_id)
                    await self._concluded(run_id)
                else:
                    self._concluding = trio.Event()
                    self._nursery.start_soon(self._conclude_later, run_id, self._concluding)
                return BatchOutcome(run_id, _exit_code(result), complete)
            if status == "finished":
                await self._concluded(run_id)
                return BatchOutcome(run_id, _exit_code(result), complete)
            if status == "exec-timeout":
                raise SessionWedged(f"run {run_id}: the session reported exec-timeout")
            mode = "input" if status == "waiting-input" else "continue"
            result, lost = await self._poll_counting_losses(run_id, mode)
            complete = complete and not lost

    async def _wedged(self, run_id: str, error: ServerError) -> SessionWedged | None:
        """The agent's words for lost run queues, unless the session is ending (the agents say the
        same while a session is TERMINATING): then None, and the run is followed to the session's end."""
        status = str((await self.session.info()).get("status", ""))
        if status not in ("RUNNING", "RUNNING_DEGRADED"):
            log.info("run %s: %s while the session is %s", run_id, error.msg, status)
            return None
        return SessionWedged(f"run {run_id}: {LOST_QUEUE_MESSAGE} (the agent said: {error.msg})")

    async def _conclude_later(self, run_id: str, done: trio.Event) -> None:
        try:
            await self._conclude(run_id)
            await self._concluded(run_id)
        except BaifsError as error:
            log.warning("run %s: could not read it to its end yet (%s); the next run will", run_id, error)
        finally:
            done.set()

    async def _poll(self, run_id: str, mode: str = "continue") -> dict[str, Any]:
        result, _ = await self._poll_counting_losses(run_id, mode)
        return result

    async def _poll_counting_losses(self, run_id: str, mode: str = "continue") -> tuple[dict[str, Any], bool]:
        """A ``continue`` (or empty ``input``), retried a few times since it only reads.

        Also says whether an earlier attempt may have been answered and lost
        (and the output it carried with it).
        """
        lost = False
        for attempt in range(CONTINUE_ATTEMPTS):
            try:
                result = await self.session.execute(mode, run_id, timeout=self.request_timeout)
                return result, lost
            except (EndpointUnreachable, ServerError) as error:
                if isinstance(error, ServerError) and lost_queue(error):
                    if (wedged := await self._wedged(run_id, error)) is not None:
                        raise wedged from error
                lost = lost or not isinstance(error, EndpointUnreachable) or error.delivered
                if attempt + 1 == CONTINUE_ATTEMPTS:
                    # A bare 500 is how managers >= 26.1 report every agent failure; another 5xx
                    # (a gateway's 502 while the manager is down) is the session not answering.
                    if isinstance(error, ServerError) and error.status == 500 and not error.msg:
                        raise SessionWedged(
                            f"run {run_id}: every request for it is answered by a 500 that names no cause; "
                            f"most likely {LOST_QUEUE_MESSAGE}"
                        ) from error
                    raise SessionWedged(f"run {run_id}: the session stopped answering ({error})") from error
                log.warning("run %s: %s; polling again", run_id, error)
                await trio.sleep(1.0 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _conclude(self, run_id: str) -> None:
        """Bring the run past its trailing phase markers, whatever the agent does.

        The agent's behaviour is learnt only from an exchange where no answer
        was lost: a lost ``continue`` may have read ``finished`` itself, and
        the next one then looks like an agent that detached.
        """
        if self.phase_behaviour == "detach":
            await trio.sleep(DETACH_SETTLE_SECONDS)
            return
        result, lost = await self._poll_counting_losses(run_id)
        while result["status"] in PHASE_MARKERS or (
            result["status"] == "continued" and result.get("console")
        ):
            result, lost_again = await self._poll_counting_losses(run_id)
            lost = lost or lost_again
        if result["status"] == "finished":
            if self.phase_behaviour == "unknown":
                log.info("session %s: agent keeps runs current between phases", self.session.id_or_name)
            self.phase_behaviour = "resume"
            return
        if lost:
            log.info("run %s: an answer was lost while it ended; making sure it is concluded", run_id)
        else:
            log.info(
                "session %s: agent concludes runs at phase boundaries; adapting",
                self.session.id_or_name,
            )
            self.phase_behaviour = "detach"
        await self._end_with_empty_batch(run_id)

    async def _end_with_empty_batch(self, run_id: str) -> None:
        """Conclude a run that is current with nothing more to come, on either agent.

        An all-empty batch under its id emits the three markers. A "detach"
        agent concludes the run at the first; a "resume" one at ``finished``,
        which follows at once. If a ``continue`` after the first marker stays
        silent, the agent detached there and the ``continue`` itself made the
        run current again: one more empty batch ends that.
        """
        result = await self._empty_batch(run_id)
        while result["status"] == "continued":
            result = await self._poll(run_id)
        if self.phase_behaviour != "detach" and result["status"] != "finished":
            result = await self._poll(run_id)
            while result["status"] in PHASE_MARKERS or (
                result["status"] == "continued" and result.get("console")
            ):
                result = await self._poll(run_id)
            if result["status"] != "finished":
                await self._empty_batch(run_id)
        await trio.sleep(DETACH_SETTLE_SECONDS)

    async def _empty_batch(self, run_id: str) -> dict[str, Any]:
        """An all-empty batch under the run's id: it concludes a run an agent detached (§3.5)."""
        empty = {"clean": None, "build": None, "exec": None, "buildLog": False}
        return await self.session.execute("batch", run_id, options=empty, timeout=self.request_timeout)


async def _deliver(result: dict[str, Any], sink: ConsoleSink | None) -> None:
    if sink is None:
        return
    for item in result.get("console") or []:
        if isinstance(item, list) and len(item) == 2 and item[0] in ("stdout", "stderr"):
            await sink(item[0], str(item[1]))


def _exit_code(result: dict[str, Any]) -> int:
    code = result.get("exitCode")
    return int(code) if code is not None else -1
