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

Invariants:
- one execution in flight per session (`BatchExecutor` holds a lock for the
  whole life of a run, concluding requests included);
- every run is driven until the session has concluded it, or raises
  `SessionWedged` naming the cause; a run never hangs silently;
- console output reaches the caller's sink as each response arrives;
- the initial ``batch`` request is never repeated (the command must not run
  twice); ``continue`` requests, which only read output, are retried.
"""

from __future__ import annotations

import logging
import secrets
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .client import SessionClient
from .errors import APIError, EndpointUnreachable, SessionWedged

log = logging.getLogger(__name__)

ConsoleSink = Callable[[str, str], Awaitable[None]]
PHASE_MARKERS = ("clean-finished", "build-finished")
#: The exit code the runner reports when the build step failed (reference §3.1).
BUILD_FAILED_EXIT = 127
DETACH_SETTLE_SECONDS = 0.1
CONTINUE_ATTEMPTS = 3


@dataclass(frozen=True)
class BatchSteps:
    """The three steps of a batch execution; an empty step is skipped."""

    exec: str
    build: str = ""
    clean: str = ""

    def script(self) -> str:
        """One shell script with the runner's semantics for the three steps.

        Each step runs in a fresh ``/bin/sh -c``; clean's exit code is ignored;
        a failed build skips exec and ends with 127; exec sees
        ``_BACKEND_BATCH_MODE=1``.
        """
        lines = []
        if self.clean.strip():
            lines.append(f"/bin/sh -c {shlex.quote(self.clean)}")
        if self.build.strip():
            lines.append(f"/bin/sh -c {shlex.quote(self.build)} || exit {BUILD_FAILED_EXIT}")
        if self.exec.strip():
            lines.append(f"_BACKEND_BATCH_MODE=1 exec /bin/sh -c {shlex.quote(self.exec)}")
        return "\n".join(lines) if lines else "true"


@dataclass(frozen=True)
class BatchOutcome:
    run_id: str
    exit_code: int


class BatchExecutor:
    """Runs batch executions in one session, one at a time."""

    def __init__(self, session: SessionClient, *, request_timeout: float = 30.0) -> None:
        self.session = session
        self.request_timeout = request_timeout
        #: "unknown", "resume" or "detach" (see the module docstring).
        self.phase_behaviour = "unknown"
        self.runs_started = 0
        self._lock = trio.Lock()
        self._current_run: str | None = None

    @property
    def current_run_id(self) -> str | None:
        return self._current_run

    async def run(
        self, steps: BatchSteps, on_console: ConsoleSink | None = None, run_id: str | None = None
    ) -> BatchOutcome:
        async with self._lock:
            run_id = run_id or secrets.token_hex(16)
            self._current_run = run_id
            try:
                return await self._drive(steps, run_id, on_console)
            finally:
                self._current_run = None

    async def interrupt(self) -> None:
        """Ask the session to interrupt the command of the current run."""
        await self.session.interrupt()

    async def _drive(self, steps: BatchSteps, run_id: str, sink: ConsoleSink | None) -> BatchOutcome:
        options = {"clean": steps.script(), "build": None, "exec": None, "buildLog": False}
        self.runs_started += 1
        log.debug("run %s: starting", run_id)
        result = await self.session.execute("batch", run_id, options=options, timeout=self.request_timeout)
        while True:
            await _deliver(result, sink)
            status = result["status"]
            if status == "clean-finished":
                exit_code = _exit_code(result)
                await self._conclude(run_id)
                return BatchOutcome(run_id, exit_code)
            if status == "finished":
                return BatchOutcome(run_id, _exit_code(result))
            if status == "exec-timeout":
                raise SessionWedged(f"run {run_id}: the session reported exec-timeout")
            mode, code = ("input", "") if status == "waiting-input" else ("continue", "")
            result = await self._poll(run_id, mode, code)

    async def _poll(self, run_id: str, mode: str = "continue", code: str = "") -> dict[str, Any]:
        """A ``continue`` (or ``input``) request, retried a few times since it only reads."""
        for attempt in range(CONTINUE_ATTEMPTS):
            try:
                return await self.session.execute(mode, run_id, code=code, timeout=self.request_timeout)
            except (EndpointUnreachable, APIError) as error:
                if attempt + 1 == CONTINUE_ATTEMPTS:
                    raise SessionWedged(f"run {run_id}: the session stopped answering ({error})") from error
                log.warning("run %s: %s; polling again", run_id, error)
                await trio.sleep(1.0 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _conclude(self, run_id: str) -> None:
        """Bring the run past its trailing phase markers, whatever the agent does."""
        if self.phase_behaviour == "detach":
            await trio.sleep(DETACH_SETTLE_SECONDS)
            return
        result = await self._poll(run_id)
        while result["status"] in PHASE_MARKERS or (
            result["status"] == "continued" and result.get("console")
        ):
            result = await self._poll(run_id)
        if result["status"] == "finished":
            if self.phase_behaviour == "unknown":
                log.info("session %s: agent keeps runs current between phases", self.session.id_or_name)
            self.phase_behaviour = "resume"
            return
        log.info(
            "session %s: agent concludes runs at phase boundaries; adapting",
            self.session.id_or_name,
        )
        self.phase_behaviour = "detach"
        empty = {"clean": None, "build": None, "exec": None, "buildLog": False}
        result = await self.session.execute("batch", run_id, options=empty, timeout=self.request_timeout)
        while result["status"] == "continued":
            result = await self._poll(run_id)
        await trio.sleep(DETACH_SETTLE_SECONDS)


async def _deliver(result: dict[str, Any], sink: ConsoleSink | None) -> None:
    if sink is None:
        return
    for item in result.get("console") or []:
        if isinstance(item, list) and len(item) == 2 and item[0] in ("stdout", "stderr"):
            await sink(item[0], str(item[1]))


def _exit_code(result: dict[str, Any]) -> int:
    code = result.get("exitCode")
    return int(code) if code is not None else -1
