"""The sync engine: when and how the overlay reaches the session, one transaction per flush.

Owns write-back (a flush ``write_back`` seconds after the last change, files
still open for writing left for later), ``fsync`` of one file, full flushes
for ``fsyncdir``, runs and unmount, and the transaction every flush is:

1. plan (`flush.plan`): reads the overlay, changes nothing;
2. upload the new content; once the session confirmed it (a 204, and a
   listing where a 204 proves nothing), the overlay records what the uploads
   did (`overlay.Overlay.confirm_uploads`);
3. run the script, if the plan has one, in the execution slot; the overlay
   records what its report confirms, step by step (`Overlay.confirm_script`);
4. checkpoint the journal.

Invariants:

- one flush at a time (``_flush_lock``); a flush that needs a script takes
  the session's execution slot *before* the flush lock, so waiting behind a
  user's long run never blocks an ``fsync``; while a run the mount started
  holds the slot, the script goes to that run's supervisor instead
  (`supervisor`); while another run holds it, write-back uploads what needs
  no script and leaves the rest pending;
- plans follow the session's profile (`profile`): nothing is uploaded into
  a virtual folder, and where uploads belong to another user than the
  container's, files are placed by the script; flushes wait (briefly) for
  discovery, and while no profile is known uploads are verified;
- nothing is committed that the session did not confirm, so a failure or a
  cancellation at any ``await`` loses nothing: the change stays pending as
  it was. An upload that may have landed without confirmation dooms its name
  where its node has left it (`Overlay.uncertain_uploads`); a staging file
  stays on disk until the uploads that read it are done;
- a script whose outcome is unknown (its answer lost, its caller cancelled,
  the session away) is *unresolved*: nothing new is planned until its run is
  concluded and its report read (for a script that moves objects, from the
  report file beside it in the session; for an inbox request, from its result
  files, or the run's end without them), then committed;
- while a flush changes the session, remote paths are in motion
  (`listing.RemoteMotion`): listings wait for it or keep serving the previous
  listing, and a listing that was in flight meanwhile is taken again;
- the write-back loop never ends but at `stop`: every failure is logged and
  retried with backoff (up to a minute); a session known to be terminated is
  not retried; `stop` lets a flush that is under way finish (one that only
  waits for the execution slot is called off);
- a change the session refuses (its step fails) stays pending, with the
  session's words (`refusals`); once the session refused the same changes
  `REFUSALS_BEFORE_HOLD` times in a row, write-back holds them: they are
  tried again at the next change, an explicit flush (``baifs sync``,
  ``baifs umount``) or the next mount, not on a timer.
"""

from __future__ import annotations

import logging
import math
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..api.errors import SessionBusy, SessionTerminated
from ..concurrency import gather_each
from ..errors import BaifsError
from .content import ContentStore
from .flush import FlushPlan, FlushReport, plan, plan_uploads
from .listing import Listings
from .model import Entry, Node
from .overlay import Overlay
from .profile import ProfileKeeper, SessionProfile
from .remote import MAX_UPLOAD_BYTES, BatchSteps, Outgoing, Remote, UploadsMissing, nameable
from .shell import StepResults
from .supervisor import Inbox, InboxClosed

log = logging.getLogger(__name__)

WRITE_BACK_RETRY_MAX = 60.0
#: Write-back stops retrying changes the session refused this many times in a row.
REFUSALS_BEFORE_HOLD = 3
#: The flush before a run gives up after this long without headway.
BARRIER_PATIENCE = 60.0
ProgressCallback = Callable[[int, int], None]


class FlushFailed(BaifsError):
    """Some changes of a flush could not be applied in the session; they stay pending."""


class FlushUnresolved(BaifsError):
    """An earlier flush's script has an outcome not known yet; nothing new is planned until it is."""


@dataclass
class SyncStats:
    flushes: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    scripts: int = 0
    flush_failures: int = 0
    last_flush_error: str = ""
    recovered_changes: int = 0
    #: removals not done because the session held something there the mount never saw.
    kept_in_session: int = 0


@dataclass
class Refusal:
    """A change the session refused at its last attempts, in its own words."""

    said: str
    attempts: int = 1
    since: float = field(default_factory=time.time)

    def as_dict(self, change: str) -> dict[str, Any]:
        return {"change": change, "said": self.said, "attempts": self.attempts, "since": self.since}


@dataclass
class Unresolved:
    """A script that may have run, and what its output said before it was lost."""

    plan: FlushPlan
    run_id: str
    output: dict[str, list[str]] = field(default_factory=lambda: {"stdout": [], "stderr": []})
    #: the inbox request that carries the script, when a supervised run's inbox does.
    request: tuple[Inbox, int] | None = None


class SyncEngine:
    def __init__(
        self,
        remote: Remote,
        overlay: Overlay,
        store: ContentStore,
        listings: Listings,
        profiles: ProfileKeeper,
        *,
        write_back: float,
    ) -> None:
        self.remote = remote
        self.scratch = remote.scratch
        self.overlay = overlay
        self.namespace = overlay.namespace
        self.store = store
        self.listings = listings
        self.profiles = profiles
        self.write_back = write_back
        #: the unmount leaves pending changes in the journal (``baifs umount --keep-pending``).
        self.keep_pending = False
        self.stats = SyncStats()
        #: files and bytes of the flush under way, for ``baifs status``.
        self.progress: dict[str, Any] = {}
        self._unresolved: Unresolved | None = None
        #: the changes the last script that ran failed, by step description.
        self.refusals: dict[str, Refusal] = {}
        self._flush_lock = trio.Lock()
        #: write-back flushes again although nothing changed (after a failure, a partial flush).
        self._again = False
        #: set while a flush's outcome is unknown, so write-back wakes to read it.
        self._outcome_unknown = trio.Event()
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._looping = False
        self._slot_wait: trio.CancelScope | None = None

    # -- write-back ---------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(
            self.namespace.pending_changes() or self.scratch.has_litter or self.unresolved is not None
        )

    async def run_write_back(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush a moment after changes stop, until `stop`; failures are logged and retried."""
        self._looping, self._stopped = True, trio.Event()
        task_status.started()
        failures = 0
        try:
            while not self._stop.is_set():
                if not (self.overlay.changed.is_set() or self._again or self.unresolved is not None):
                    await self._until_stop(self._work())
                    continue
                while (quiet := time.monotonic() - self.overlay.last_change) < self.write_back:
                    await self._until_stop(trio.sleep(self.write_back - quiet))
                    if self._stop.is_set():
                        return
                self.overlay.take_change()
                self._again = False
                counted = self.stats.flush_failures
                try:
                    report = await self.flush(skip_open_writers=True, stoppable=True)
                    failures = 0
                except FlushUnresolved as error:  # a run holds the slot; its end concludes the earlier one
                    log.info("write-back waits: %s", error)
                    self._again = True
                    await self._until_stop(trio.sleep(self.write_back))
                    continue
                except (BaifsError, OSError) as error:
                    if self.stats.flush_failures == counted:  # it failed before a transaction counted it
                        self.stats.flush_failures += 1
                        self.stats.last_flush_error = str(error)
                    if isinstance(error, SessionTerminated):
                        log.error(
                            "write-back stopped: %s; the changes stay pending (see 'baifs salvage')", error
                        )
                        await self._until_stop(trio.sleep_forever())
                        return
                    if isinstance(error, FlushFailed) and self.holding:
                        log.error(
                            "write-back holds %d change(s) the session refused %d times in a row; they "
                            "stay pending and are tried again at the next change, 'baifs sync' or the next "
                            "mount: %s",
                            len(self.refusals),
                            REFUSALS_BEFORE_HOLD,
                            error,
                        )
                        failures = 0
                        continue
                    failures = await self._back_off(error, failures)
                    continue
                if report.partial and self.namespace.pending_changes():
                    # A run held the execution slot: what needs a script is still to do.
                    self._again = True
                    await self._until_stop(trio.sleep(self.write_back))
        finally:
            self._looping = False
            self._stopped.set()

    async def _work(self) -> None:
        """Until something changed here, or a flush's outcome became unknown."""
        async with trio.open_nursery() as nursery:

            async def on(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on, self.overlay.changed)
            nursery.start_soon(on, self._outcome_unknown)

    async def _back_off(self, error: Exception, failures: int) -> int:
        """Wait longer after each failure in a row (up to a minute); the count of failures now."""
        failures += 1
        delay = min(WRITE_BACK_RETRY_MAX, self.write_back * 2**failures)
        log.error("write-back failed (%s); the changes stay pending; retrying in %.0f s", error, delay)
        self._again = True
        await self._until_stop(trio.sleep(delay))
        return failures

    @property
    def unresolved(self) -> Unresolved | None:
        """A script whose outcome is not known yet (listings then conclude nothing from a path gone)."""
        return self._unresolved

    @unresolved.setter
    def unresolved(self, unresolved: Unresolved | None) -> None:
        self._unresolved = unresolved
        self.listings.unresolved = unresolved is not None
        if unresolved is None:
            self._outcome_unknown = trio.Event()
        else:
            self._outcome_unknown.set()  # write-back reads it soon, whichever flush left it unknown

    def status(self) -> dict[str, Any]:
        """Write-back's side of ``baifs status``."""
        stats = self.stats
        return {
            "flush": dict(self.progress),
            "unresolved_flush": None if self.unresolved is None else self.unresolved.run_id,
            "flushes": {
                "completed": stats.flushes,
                "uploaded_files": stats.uploaded_files,
                "uploaded_bytes": stats.uploaded_bytes,
                "scripts": stats.scripts,
                "failures": stats.flush_failures,
                "last_error": stats.last_flush_error,
                "refused": [refusal.as_dict(change) for change, refusal in self.refusals.items()],
                "holding": self.holding,
                "kept_in_session": stats.kept_in_session,
            },
            "recovered_changes": stats.recovered_changes,
            "profile": self.profile.as_dict(),
        }

    @property
    def holding(self) -> bool:
        """Whether every change the session refuses was refused often enough in a row to hold."""
        return bool(self.refusals) and all(r.attempts >= REFUSALS_BEFORE_HOLD for r in self.refusals.values())

    def _note_refusals(self, refused: dict[str, str]) -> None:
        """The refusals of the script that just ran replace the earlier ones, counted on."""
        earlier = self.refusals
        self.refusals = {
            change: Refusal(said, earlier[change].attempts + 1, earlier[change].since)
            if change in earlier
            else Refusal(said)
            for change, said in refused.items()
        }

    async def _until_stop(self, wait: Awaitable[object]) -> None:
        """Await ``wait`` unless `stop` is asked for first."""
        async with trio.open_nursery() as nursery:

            async def waiting() -> None:
                await wait
                nursery.cancel_scope.cancel()

            async def stopping() -> None:
                await self._stop.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(waiting)
            nursery.start_soon(stopping)

    async def stop(self) -> None:
        """Stop write-back cooperatively: a flush under way finishes; one waiting for the slot does not."""
        self._stop.set()
        if self._slot_wait is not None:
            self._slot_wait.cancel()
        if self._looping:
            await self._stopped.wait()

    # -- flushes ------------------------------------------------------------

    async def flush(
        self,
        *,
        skip_open_writers: bool = False,
        progress: ProgressCallback | None = None,
        slot_timeout: float = math.inf,
        stoppable: bool = False,
    ) -> FlushReport:
        """Push pending changes to the session.

        While a run the mount started holds the execution slot, the flush's
        script goes to that run's supervisor (`supervisor.Inbox`). While
        another run holds it, a write-back flush (``skip_open_writers``)
        uploads what needs no script and returns; every other flush waits for
        the slot (`SessionBusy` after ``slot_timeout``). A ``stoppable`` flush
        (write-back's) is called off by `stop` while it only waits for the slot. A flush waiting
        for the slot goes to the mount's run's inbox once that opens (`Supervisor.take_slot`).
        """
        deadline = trio.current_time() + slot_timeout
        while True:
            inbox = self.remote.inbox()
            if inbox is not None:
                report = await self._flush_through(inbox, skip_open_writers, progress)
                if report is not None:
                    return report
            elif skip_open_writers and self.remote.busy:
                return await self.flush_uploads(
                    [n for n in self.namespace.pending if n.dirty and n.write_count == 0], progress
                )
            await self.profiles.wait()
            with trio.CancelScope() as waiting:
                if stoppable:
                    self._slot_wait = waiting
                try:
                    async with AsyncExitStack() as held:
                        left = max(0.0, deadline - trio.current_time())
                        if await self.remote.supervisor.take_slot(held, left, "a flush"):
                            self._slot_wait = None
                            return await self.flush_in_slot(
                                skip_open_writers=skip_open_writers, progress=progress
                            )
                finally:
                    if stoppable:
                        self._slot_wait = None
            if waiting.cancelled_caught:
                raise SessionBusy("the flush was called off while it waited for the execution slot")

    async def flush_uploads(self, nodes: list[Node], progress: ProgressCallback | None = None) -> FlushReport:
        """Upload what of ``nodes`` needs no script; everything else waits for a full flush."""
        unresolved = self.unresolved
        if unresolved is not None and self.remote.unconcluded_run == unresolved.run_id:
            raise FlushUnresolved("an earlier flush's run is not concluded yet; uploads wait for it")
        await self.profiles.wait()
        async with self._flush_lock:
            await self._resolve()
            report = await self._transact(lambda: plan_uploads(self.namespace, nodes, self.profile), progress)
            report.partial = True
            return report

    async def _flush_through(
        self, inbox: Inbox, skip_open_writers: bool, progress: ProgressCallback | None
    ) -> FlushReport | None:
        """A full flush whose script a going run's supervisor runs; None if the run ended first."""
        await self.profiles.wait()
        async with self._flush_lock:
            await self._resolve()
            try:
                return await self._transact(self._planner(skip_open_writers), progress, inbox)
            except InboxClosed:
                return None  # the script never ran: what it was to do is still pending

    async def flush_in_slot(
        self, *, skip_open_writers: bool = False, progress: ProgressCallback | None = None
    ) -> FlushReport:
        """A full flush by a caller that holds the session's execution slot (a run's barrier)."""
        async with self._flush_lock:
            await self._resolve()
            return await self._transact(self._planner(skip_open_writers), progress)

    async def barrier(self, patience: float = BARRIER_PATIENCE) -> None:
        """Everything pending onto the session before a run (whose slot the caller holds).

        Like write-back, a flush that fails is tried again while the session
        makes headway (changes get confirmed); it gives up after ``patience``
        seconds without any, and at once when the session refused a change or
        is terminated: asking again would not change its answer. A flush that
        left changes pending (an answer lost on the way left steps
        unconfirmed) is followed by another while that gets changes through.
        """
        delay, mark, moved_at = 0.5, self._headway(), trio.current_time()
        while True:
            before = self._headway()
            try:
                await self.flush_in_slot()
            except (FlushFailed, SessionTerminated):
                raise
            except (BaifsError, OSError) as error:
                if self._headway() != mark:
                    mark, moved_at = self._headway(), trio.current_time()
                elif trio.current_time() - moved_at + delay > patience:
                    raise
                log.warning("the flush before a run failed (%s); trying again in %.1f s", error, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 8.0)
                continue
            if not self.namespace.pending_changes() or self._headway() == before:
                return

    def _headway(self) -> tuple[int, ...]:
        """What moves while flushes get changes onto the session, even flushes that fail."""
        stats = self.stats
        return (self.namespace.pending_changes(), stats.flushes, stats.uploaded_files, stats.scripts)

    def _planner(self, skip_open_writers: bool) -> Callable[[], FlushPlan]:
        """How a full flush plans (again, after uploads showed a folder), files open for writing left out."""

        def planner() -> FlushPlan:
            open_writers = {n for n in self.namespace.pending if n.write_count > 0}
            return plan(
                self.namespace,
                self.profile,
                defer=open_writers if skip_open_writers else (),
                litter=self._litter(),
            )

        return planner

    async def flush_all(
        self, progress: ProgressCallback | None = None, *, slot_timeout: float = math.inf
    ) -> None:
        """Flush until nothing is pending (changes made meanwhile included), scratch removed.

        ``slot_timeout`` bounds the wait for the execution slot while a run
        holds it; a flush under way is waited for first, however long it takes.
        """
        for _ in range(10):
            await self._after_running_flush()  # what it does may leave work (an upload of a removed file)
            await self.scratch.idle()  # ranged reads under way leave parts to remove
            if not self.has_work:
                return
            await self.flush(progress=progress, slot_timeout=slot_timeout)

    async def fsync(self, node: Node, *, slot_timeout: float = math.inf) -> None:
        """Return once this file (and what it depends on) is on the session."""
        if not node.attached or node not in self.namespace.pending:
            return
        await self.profiles.wait()
        flush_plan = plan_uploads(self.namespace, [node], self.profile)
        if flush_plan.uploaded(node):
            try:
                await self.flush_uploads([node])
            except FlushUnresolved:  # the full flush below takes the slot, which concludes that run
                pass
        if node not in self.namespace.pending:
            return
        await self._after_running_flush()
        try:
            await self.flush(slot_timeout=slot_timeout)
        except FlushFailed:
            if node in self.namespace.pending:
                raise

    async def _after_running_flush(self) -> None:
        """Wait for a flush under way (write-back's) to end."""
        if self._flush_lock.locked():
            async with self._flush_lock:
                pass

    def _litter(self) -> list[bytes]:
        """Scratch in the session that nothing refers to any more, for the flush's script to remove."""
        referenced = [n.origin for n in self.namespace.pending if n.origin is not None]
        return sorted({*self.scratch.take_litter(), *self.scratch.take_leftovers(referenced)})

    # -- the transaction ----------------------------------------------------

    @property
    def profile(self) -> SessionProfile:
        return self.profiles.profile

    async def _transact(
        self, planner: Callable[[], FlushPlan], progress: ProgressCallback | None, inbox: Inbox | None = None
    ) -> FlushReport:
        """Plan, then carry the plan out; planned once more if uploads showed a folder not known."""
        try:
            return await self._carry_out(planner(), progress, inbox)
        except UploadsMissing as error:
            if self.profile.known or not self.profiles.learn_from_vanished(error.paths):
                raise
        return await self._carry_out(planner(), progress, inbox)

    async def _carry_out(
        self, flush_plan: FlushPlan, progress: ProgressCallback | None, inbox: Inbox | None
    ) -> FlushReport:
        """Upload, run the script (in the slot the caller holds), commit what the session confirmed."""
        report = FlushReport()
        if flush_plan.empty:
            return report
        try:
            with self.listings.moving():
                await self._upload(flush_plan, report, progress)
                if flush_plan.shell is not None:
                    await self._run_script(flush_plan, report, inbox)
        except BaseException as error:
            self.scratch.note_leftover(flush_plan.litter)
            if isinstance(error, BaifsError | OSError):
                self.stats.flush_failures += 1
                self.stats.last_flush_error = str(error)
            raise
        finally:
            self.progress = {}
        await self.checkpoint()
        self.stats.flushes += not report.refused
        self.stats.uploaded_files += report.uploaded_files
        self.stats.uploaded_bytes += report.uploaded_bytes
        self.stats.scripts += report.script_ran
        self._after_script(flush_plan, report)
        return report

    async def _upload(
        self, flush_plan: FlushPlan, report: FlushReport, progress: ProgressCallback | None
    ) -> None:
        """Send the plan's content (and its script file); commit the uploads once confirmed."""
        files = self._upload_files(flush_plan)
        script_file = flush_plan.script_file
        if script_file is not None and flush_plan.shell is not None:
            files.append(Outgoing.of(script_file, flush_plan.shell.render().encode()))
        if not files:
            return
        self.progress = {
            "files_total": len(flush_plan.uploads),
            "bytes_total": flush_plan.upload_bytes,
            "files_done": 0,
            "bytes_done": 0,
        }
        parts_left = {upload.target: max(1, len(upload.parts)) for upload in flush_plan.uploads}
        owner = {part: upload.target for upload in flush_plan.uploads for part in upload.parts}

        def on_batch(batch: Sequence[Outgoing]) -> None:
            for item in batch:
                target = owner.get(item.path, item.path)
                if target in parts_left:
                    self.progress["bytes_done"] += item.size
                    parts_left[target] -= 1
                    self.progress["files_done"] += parts_left[target] == 0
            if progress is not None:
                progress(self.progress["files_done"], self.progress["bytes_done"])

        try:
            with self.store.holding(flush_plan.stages):  # rm during the upload waits for it
                # Without a known profile, a listing shows uploads that vanished into a folder.
                listings = await self.remote.upload(files, on_batch=on_batch, verify=not self.profile.known)
        except BaseException:
            self.overlay.uncertain_uploads(flush_plan)
            if flush_plan.uses_tmp:
                self.scratch.note_leftover([flush_plan.tmp])
            raise
        self.overlay.confirm_uploads(flush_plan, listings)
        report.uploaded_files = len(flush_plan.uploads)
        report.uploaded_bytes = flush_plan.upload_bytes

    def _upload_files(self, flush_plan: FlushPlan) -> list[Outgoing]:
        """What to send: whole files, or parts of large ones, read from staging when sent."""
        files: list[Outgoing] = []
        for upload in flush_plan.uploads:
            stage = self.store.stage_path(upload.stage)
            if not upload.parts:
                files.append(Outgoing(upload.target, upload.size, _reader(stage, 0, upload.size)))
                continue
            for index, part in enumerate(upload.parts):
                offset = index * MAX_UPLOAD_BYTES
                length = min(MAX_UPLOAD_BYTES, upload.size - offset)
                files.append(Outgoing(part, length, _reader(stage, offset, length)))
        return files

    async def _run_script(self, flush_plan: FlushPlan, report: FlushReport, inbox: Inbox | None) -> None:
        """Run the plan's script (in the slot the caller holds, or through ``inbox``), commit what it did."""
        assert flush_plan.shell is not None
        shell = flush_plan.shell
        script_file = flush_plan.script_file
        self.overlay.note_script(flush_plan)
        command = shell.render() if script_file is None else f"sh {shlex.quote(script_file.decode('ascii'))}"
        if inbox is None:
            exit_code, results = await self._run_in_slot(flush_plan, report, command)
        else:
            exit_code, results = await self._run_in_inbox(flush_plan, report, command, inbox)
        report.script_ran = True
        if results.failed:
            log.error(
                "%d flush step(s) failed in the session (exit %s): %s",
                len(results.failed),
                exit_code,
                "; ".join(results.failed_descriptions()[:3]),
            )
        self.overlay.confirm_script(flush_plan, results, report)
        self._leave_tmp(flush_plan, report)
        await self._learn_placed(flush_plan, results)

    def _never_ran(self, flush_plan: FlushPlan, report: FlushReport) -> None:
        assert flush_plan.shell is not None
        self.unresolved = None
        self.overlay.confirm_script(flush_plan, StepResults.none_ran(flush_plan.shell.descriptions), report)
        self._leave_tmp(flush_plan, report)

    async def _run_in_slot(
        self, flush_plan: FlushPlan, report: FlushReport, command: str
    ) -> tuple[int | None, StepResults]:
        assert flush_plan.shell is not None
        run_id = secrets.token_hex(16)
        unresolved = Unresolved(flush_plan, run_id)

        async def collect(stream: str, text: str) -> None:
            unresolved.output.setdefault(stream, []).append(text)

        self.unresolved = unresolved
        try:
            outcome = await self.remote.run_held(BatchSteps(exec=command), collect, run_id, purpose="a flush")
        except BaseException:
            if self.remote.unconcluded_run != run_id:
                self._never_ran(flush_plan, report)  # it provably never ran
            raise
        self.unresolved = None
        if outcome.complete:
            stdout, stderr = ("".join(unresolved.output.get(s, [])) for s in ("stdout", "stderr"))
            return outcome.exit_code, StepResults.parse(stdout, stderr, flush_plan.shell.descriptions)
        log.warning("run %s: part of the flush's answer was lost; reading what it did", run_id)
        self.unresolved = unresolved
        results = await self._lost_outcome(unresolved)
        self.unresolved = None
        return outcome.exit_code, results

    async def _run_in_inbox(
        self, flush_plan: FlushPlan, report: FlushReport, command: str, inbox: Inbox
    ) -> tuple[int | None, StepResults]:
        """The script as a request to a going run's supervisor; unresolved until its results are read."""
        assert flush_plan.shell is not None
        number = inbox.reserve(command)
        self.unresolved = Unresolved(flush_plan, f"{inbox.box.decode()}.{number}", request=(inbox, number))
        try:
            await inbox.deliver()
            result = await inbox.outcome(number)
        except InboxClosed:
            self._never_ran(flush_plan, report)
            raise
        self.unresolved = None
        descriptions = flush_plan.shell.descriptions
        results = StepResults.parse(result.stdout, result.stderr, descriptions, complete=result.complete)
        return result.exit_code, results

    async def _learn_placed(self, flush_plan: FlushPlan, results: StepResults) -> None:
        """List where the script placed files, so their content is known by (size, mtime) from now on.

        Best effort: without it, a placed file's staging copy stays its
        content until a listing shows the file (`Overlay.retire_stage`).
        A directory the API cannot name is left out: its alias would need a
        script, and this flush holds the execution slot.
        """
        placed = [u for u in flush_plan.uploads if not u.direct and results.done(u.place_step)]
        parents = sorted({upload.path.rpartition(b"/")[0] for upload in placed})
        parents = [parent for parent in parents if nameable(parent)]
        listings: dict[bytes, list[Entry]] = {}

        async def take(parent: bytes) -> None:
            listings[parent] = await self.remote.list_dir(parent) or []

        try:
            await gather_each(take, parents, limit=4)
        except BaifsError as error:
            log.info("could not list where files were placed (%s); their staging copies stay", error)
            return
        self.overlay.confirm_placed(placed, listings)

    async def resolve(self) -> None:
        """Read and record what an unresolved script did, now: a caller that met a path it may have
        moved (a read) asks for it. A script sent through the slot has its run concluded first."""
        unresolved = self.unresolved
        if unresolved is None:
            return
        if unresolved.request is not None:  # through the inbox: its result files say it, no slot needed
            async with self._flush_lock:
                await self._resolve()
            return
        async with self.remote.slot(purpose="the outcome of an earlier flush"), self._flush_lock:
            await self._resolve()

    async def _resolve(self) -> None:
        """Find out and commit what an unresolved script did (its run is concluded by now)."""
        unresolved = self.unresolved
        if unresolved is None:
            return
        if self.remote.unconcluded_run == unresolved.run_id:
            raise FlushUnresolved(f"run {unresolved.run_id} of an earlier flush is not concluded yet")
        results = await self._lost_outcome(unresolved)
        self.unresolved = None
        report = FlushReport(script_ran=True)
        self.overlay.confirm_script(unresolved.plan, results, report)
        if unresolved.plan.uses_tmp:
            # Even a script that did every step may have been cut inside its own final
            # `rm -rf -- TMP TMP.*` (its file gone, a staged upload left): the next script
            # removes what is left, which costs one line.
            self.scratch.note_leftover([unresolved.plan.tmp])
        log.info("the outcome of run %s is known now and recorded", unresolved.run_id)
        await self.checkpoint()
        self._after_script(unresolved.plan, report, raise_failures=False)

    async def _lost_outcome(self, unresolved: Unresolved) -> StepResults:
        """What an unresolved script did: its report file if it has one, else the output that arrived.

        A script that runs from a file (one that moves objects) was in the
        session before it started, and removes itself only when every step
        succeeded: no script file means all done; otherwise the report in its
        directory lists the steps that happened.
        """
        flush_plan = unresolved.plan
        assert flush_plan.shell is not None
        descriptions = flush_plan.shell.descriptions
        if unresolved.request is not None:
            inbox, number = unresolved.request
            try:
                result = await inbox.outcome(number)
            except InboxClosed:
                return StepResults.none_ran(descriptions)
            return StepResults.parse(result.stdout, result.stderr, descriptions, complete=result.complete)
        script_file = flush_plan.script_file
        if script_file is None:
            stdout, stderr = ("".join(unresolved.output.get(s, [])) for s in ("stdout", "stderr"))
            return StepResults.parse(stdout, stderr, descriptions, complete=False)
        if script_file.rpartition(b"/")[2] not in await self.remote.list_scratch():
            return StepResults.all_ok(descriptions)
        try:
            (data,) = await self.remote.read_files([flush_plan.report_file])
        except BaifsError as error:
            log.info(
                "no report of run %s in the session (%s): none of its steps ran", unresolved.run_id, error
            )
            return StepResults.none_ran(descriptions)
        return StepResults.parse(data.decode("utf-8", "replace"), "", descriptions, complete=False)

    def _leave_tmp(self, flush_plan: FlushPlan, report: FlushReport) -> None:
        if report.left_tmp:
            self.scratch.note_leftover([flush_plan.tmp])

    def _after_script(
        self, flush_plan: FlushPlan, report: FlushReport, *, raise_failures: bool = True
    ) -> None:
        if report.vanished:
            log.warning(
                "%d object(s) disappeared from the session before the flush reached them",
                len(report.vanished),
            )
            self.listings.vanished(report.vanished)
        if report.kept:
            self.stats.kept_in_session += len(report.kept)
            for kept in report.kept:
                log.warning("%s", kept)
            self.listings.expire()  # what the session kept shows again
        if report.script_ran:
            self._note_refusals(report.refused)
        if report.refused:
            self.scratch.note_leftover(flush_plan.litter)
            self.stats.flush_failures += 1
            self.stats.last_flush_error = "; ".join(
                f"{change}: {said}" if said else change for change, said in list(report.refused.items())[:3]
            )
            self.listings.expire()
            if raise_failures:
                failed = len(report.refused)
                raise FlushFailed(f"the session refused {failed} change(s): {self.stats.last_flush_error}")

    async def checkpoint(self) -> None:
        """Replace the journal by the overlay as it is now; a full disk keeps the older journal."""
        await self.overlay.save_checkpoint()


def _reader(path: Path, offset: int, length: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    return read
