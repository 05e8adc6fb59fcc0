"""Batch executions of one local session: the kernel runner and the agent's run queue.

Models the two halves a real session has (reference §3):

- the *runner* executes batch tasks one at a time: clean, build, exec, each a
  fresh ``/bin/sh -c`` with cwd ``/home/work`` and ``HOME=/home/work``,
  confined by the `sandbox` as the container user, and
  emits ``clean-finished``, ``build-finished`` and ``finished`` markers about
  10 ms apart; a failed build skips exec and finishes with 127; ``*`` selects
  the heuristics;
- the *agent* keeps one current run, with an output queue. The runner's
  records (console chunks and markers) go to that queue; each execute request collects them for up
  to 2 s and answers ``continued`` or the marker it reached. A request for
  another run id waits until the current run is concluded.

With ``queued_run_wedge`` (every real agent, reference gap 3) a run that
had to wait for another is activated the way `AbstractCodeRunner` does it:
``next_output_queue`` pops the waiter's entry, so when the activated run's
first answer is not ``finished``, ``resume_output_queue`` fails
(``KeyError``, answered as "The container for kernel … is not found!"), every
later request for that run fails, and every other run waits for good.

A run is concluded when a request reads ``finished``, or, with
``detach_at_phase_end`` (agents ≥ 25.12, reference §3.5), when it reads any
phase marker. In that mode records emitted while no run is current are
dropped, and a later ``continue`` attaches a fresh queue that may wait forever:
the frame loss the client has to survive.

Invariants: at most one process runs per session; a terminated session fails
every waiting request instead of leaving it blocked.
"""

from __future__ import annotations

import codecs
import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .sandbox import Command, Sandbox

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 2.0
MARKER_GAP = 0.01
READ_CHUNK = 4096
TERMINAL = ("clean-finished", "build-finished", "finished")


class SessionTerminated(Exception):
    pass


class RunWedged(RuntimeError):
    """The agent's output queues lost a run (``queued_run_wedge``); the text is the agent's."""


@dataclass
class OutputQueue:
    run_id: str
    send: trio.MemorySendChannel[tuple[str, Any]] = field(init=False)
    receive: trio.MemoryReceiveChannel[tuple[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel(math.inf)


class Kernel:
    def __init__(
        self, work_dir: Path, sandbox: Sandbox, *, detach_at_phase_end: bool, queued_run_wedge: bool = False
    ) -> None:
        sandbox.prepare(work_dir)
        self.work_dir = work_dir
        self.sandbox = sandbox
        self.detach_at_phase_end = detach_at_phase_end
        self.queued_run_wedge = queued_run_wedge
        #: the run the agent's queues lost, once ``queued_run_wedge`` struck.
        self._wedged: str | None = None
        self.num_queries = 0
        self._current: OutputQueue | None = None
        self._changed = trio.Event()
        self._task_lock = trio.Lock()
        self._process: Command | None = None
        self._terminated = False
        self._tasks = trio.CancelScope()

    async def serve_tasks(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The runner's home: run in the server's nursery until the session ends."""
        with self._tasks:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()

    async def execute(self, mode: str, run_id: str, options: dict[str, Any] | None) -> dict[str, Any]:
        self._check_alive()
        if run_id == self._wedged:
            raise RunWedged(f"OutputQueueMismatchError: the output queue of run {run_id} is gone")
        queue, waited = await self._attach(run_id)
        if mode == "batch":
            self.num_queries += 1
            self._nursery.start_soon(self._run_task, dict(options or {}))
        result = await self._next_result(queue)
        if waited and self.queued_run_wedge and result["status"] != "finished":
            self._wedged = run_id  # nothing concludes it now: every other run waits for good
            raise RunWedged(
                f"The container for kernel {self.work_dir.parent.name} is not found! "
                "(might be terminated--try it again)"
            )
        return result

    def interrupt(self) -> None:
        if self._process is not None:
            self._process.signal_group(signal.SIGINT)

    def terminate(self) -> None:
        self._terminated = True
        if self._process is not None:
            self._process.signal_group(signal.SIGKILL)
        if self._current is not None:
            self._current.send.close()
        self._tasks.cancel()
        self._notify()

    def _check_alive(self) -> None:
        if self._terminated:
            raise SessionTerminated()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _attach(self, run_id: str) -> tuple[OutputQueue, bool]:
        """The run's output queue, and whether the run had to wait for another to get it."""
        waited = False
        while self._current is not None and self._current.run_id != run_id:
            waited = True
            await self._changed.wait()
            self._check_alive()
        if self._current is None:
            self._current = OutputQueue(run_id)
        return self._current, waited

    def _conclude(self, queue: OutputQueue) -> None:
        if self._current is queue:
            self._current = None
        self._notify()

    async def _next_result(self, queue: OutputQueue) -> dict[str, Any]:
        console: list[tuple[str, list[str]]] = []
        status, exit_code = "continued", None
        with trio.move_on_after(FLUSH_TIMEOUT):
            while True:
                try:
                    kind, payload = await queue.receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise SessionTerminated() from None
                if kind in TERMINAL:
                    status, exit_code = kind, payload
                    if kind == "finished" or self.detach_at_phase_end:
                        self._conclude(queue)
                    break
                if console and console[-1][0] == kind:
                    console[-1][1].append(payload)
                else:
                    console.append((kind, [payload]))
        return {
            "status": status,
            "runId": queue.run_id,
            "exitCode": exit_code,
            "options": None,
            "files": [],
            "console": [[kind, "".join(chunks)] for kind, chunks in console],
        }

    def _emit(self, kind: str, payload: Any) -> None:
        if self._current is not None:
            self._current.send.send_nowait((kind, payload))

    async def _run_task(self, options: dict[str, Any]) -> None:
        async with self._task_lock:
            try:
                self._emit("clean-finished", await self._clean(options.get("clean")))
                await trio.sleep(MARKER_GAP)
                build_code = await self._build(options.get("build"))
                self._emit("build-finished", build_code)
                await trio.sleep(MARKER_GAP)
                exit_code = 127 if build_code != 0 else await self._exec(options.get("exec"))
                self._emit("finished", exit_code)
            except OSError as error:
                log.error("runner failed: %s", error)
                self._emit("finished", -1)

    async def _clean(self, command: str | None) -> int:
        if not command or command == "*":
            return 0
        return await self._run(command, batch_mode=False)

    async def _build(self, command: str | None) -> int:
        if not command:
            return 0
        if command == "*":
            return await self._run("make", batch_mode=False) if (self.work_dir / "Makefile").exists() else 0
        return await self._run(command, batch_mode=False)

    async def _exec(self, command: str | None) -> int:
        if not command:
            return 0
        if command == "*":
            if not (self.work_dir / "main.py").exists():
                return 127
            command = "python3 main.py"
        return await self._run(command, batch_mode=True)

    async def _run(self, command: str, *, batch_mode: bool) -> int:
        launch = self.sandbox.launch(self.work_dir, command, batch_mode=batch_mode)
        process = Command(launch)
        self._process = process
        try:
            async with trio.open_nursery() as nursery:
                for kind, stream in process.streams.items():
                    nursery.start_soon(self._pipe, stream, kind)
            return await process.wait()
        finally:
            self._process = None
            if process.running:
                await process.kill()

    async def _pipe(self, stream: trio.abc.ReceiveStream, kind: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async with stream:
            while chunk := await stream.receive_some(READ_CHUNK):
                text = decoder.decode(chunk)
                if text:
                    self._emit(kind, text)
        tail = decoder.decode(b"", final=True)
        if tail:
            self._emit(kind, tail)
