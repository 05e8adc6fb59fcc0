"""The composition root: the one place that builds a mount's parts and runs their life.

`MountCore` builds, over a session and its state directory, every part and
hands each what it uses (no part builds another, none is given the whole):

    Remote ── the session: listings, uploads, downloads, scripts, the slot
               (`RemoteTree` for a real session, `over_session`)
    ContentStore, Journal, Namespace, Overlay ── what is known and pending here
    Listings, ReadAhead, Fetcher, Handles ── reading the session, open files
    SyncEngine ── write-back, flushes as transactions
    Filesystem ── the POSIX rules on names
    RunManager, ControlTree ── runs, and the control files
    KernelCache or NoKernel ── what the parts tell the kernel

and owns their life, which ``baifs mount``, ``baifs salvage replay`` and the
tests all go through:

1. `start`: the journal an earlier mount left is replayed (`recovery`) and
   checkpointed, then the background work starts: concluding runs, listings,
   downloads, write-back, the watchdog, discovery of the session's profile
   (when none is known), the run queue;
2. `stop`: write-back stops cooperatively (a flush under way finishes, one
   waiting for the execution slot is called off) and the last run is read
   to its end, for at most `FINAL_SLOT_WAIT`; then the caller cancels the
   background;
3. `final_flush`: what is left is pushed, trying again while the session
   fails, or left in the journal and said so;
4. `close`: the journal is closed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..api.errors import SessionBusy, SessionTerminated
from ..concurrency import keep_running
from ..errors import BaifsError
from .content import ContentStore
from .control import ControlTree
from .fetch import Fetcher
from .filesystem import Filesystem
from .handles import Handles
from .journal import Journal
from .kernel import KernelCache, KernelNotifier, NoKernel
from .listing import Listings
from .model import Namespace
from .overlay import Overlay
from .profile import ProfileKeeper
from .readahead import ReadAhead
from .recovery import Recovery
from .remote import Remote, RemoteTree
from .runs import DEFAULT_KEEP, RunManager
from .state import RunMarker
from .sync import SyncEngine
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..api.client import SessionClient

log = logging.getLogger(__name__)

#: How long stopping waits for the execution slot (a run may hold it for hours).
FINAL_SLOT_WAIT = 30.0
#: The final flush keeps trying for this long while the session fails.
FINAL_FLUSH_PATIENCE = 300.0


@dataclass
class MountOptions:
    attr_timeout: float = 1.0
    dir_ttl: float = 5.0
    negative_timeout: float = 1.0
    write_back: float = 1.5
    cache_limit: int = 2 * 1024**3
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int | None = None


class MountCore:
    """Every part of one mount of a session, and their life (see the module docstring)."""

    def __init__(
        self,
        remote: Remote,
        state: Path,
        cache: Path,
        options: MountOptions,
        *,
        fuse: bool = False,
        keep_runs: int = DEFAULT_KEEP,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.state = state
        self.options = options
        self.remote = remote
        self.store = ContentStore(cache, state / "staging", options.cache_limit)
        self.journal = Journal(state)
        self.profiles = ProfileKeeper(state)
        self.namespace = Namespace()
        self.overlay = Overlay(self.namespace, self.journal, self.store)
        self.kernel: KernelNotifier = KernelCache(self.namespace) if fuse else NoKernel()
        self.watchdog = Watchdog(self.remote.health)
        self.listings = Listings(self.remote, self.overlay, self.kernel, ttl=options.dir_ttl)
        self.fetcher = Fetcher(self.remote, self.store)
        self.readahead = ReadAhead(self.namespace, self.listings, self.fetcher)
        self.sync = SyncEngine(
            self.remote, self.overlay, self.store, self.listings, self.profiles, write_back=options.write_back
        )
        self.handles = Handles(
            self.overlay,
            self.store,
            self.fetcher,
            self.listings,
            self.readahead,
            self.watchdog,
            self.sync.resolve,
        )
        self.filesystem = Filesystem(
            self.overlay, self.listings, self.readahead, self.handles, self.sync, self.watchdog
        )
        self.runs = RunManager(
            self.remote,
            self.remote.supervisor,
            self.sync,
            self.listings,
            self.kernel,
            self.profiles,
            state / "runs",
            keep=keep_runs,
        )
        self.control = ControlTree(
            self.runs,
            self.overlay,
            self.sync,
            self.remote,
            self.store,
            self.filesystem.flush_everything,
            identity or {},
        )

    @classmethod
    def over_session(
        cls, session: SessionClient, state: Path, cache: Path, options: MountOptions, **parts: Any
    ) -> MountCore:
        """A mount of a real session: its remote seam records each run's id in the state directory,
        and a run an earlier process left going is concluded before the next one."""
        marker = RunMarker(state)
        remote = RemoteTree(session, runs=marker)
        left = marker.load()
        if left is not None:
            log.info("run %s was left going by an earlier process; it is concluded before the next run", left)
            remote.adopt(left)
        return cls(remote, state, cache, options, **parts)

    async def start(self, nursery: trio.Nursery) -> int:
        """Replay the journal, then start the background work; the number of changes recovered.

        A session's folders and container user are fixed when it is created, so
        a profile discovered once serves every later mount of the session;
        otherwise discovery starts here, in the background.
        """
        recovery = Recovery(self.filesystem, self.listings, self.overlay, self.remote, self.remote.scratch)
        recovered = await recovery.run(self.journal.read())
        await self.overlay.save_checkpoint()
        self.sync.stats.recovered_changes = recovered
        if recovered:
            self.overlay.note_change()
        await nursery.start(self.remote.run_background)
        await nursery.start(self.listings.run)
        nursery.start_soon(keep_running, "the download workers", self.fetcher.run_workers)
        nursery.start_soon(keep_running, "write-back", self.sync.run_write_back)
        nursery.start_soon(keep_running, "the watchdog", self.watchdog.run)
        if not self.profiles.profile.known:
            nursery.start_soon(keep_running, "discovery", lambda: self.profiles.keep_discovering(self.remote))
        await nursery.start(self.runs.run_background)
        return recovered

    async def stop(self) -> None:
        """Write-back stops cooperatively; the last run is read to its end (within `FINAL_SLOT_WAIT`)."""
        await self.sync.stop()
        with trio.move_on_after(FINAL_SLOT_WAIT):
            await self.remote.settle()

    async def final_flush(self) -> None:
        """After the background stopped: push what is left, or leave it in the journal and say so."""
        sync = self.sync
        deadline = trio.current_time() + FINAL_FLUSH_PATIENCE
        delay = 1.0
        while sync.has_work and not sync.keep_pending:
            try:
                await sync.flush_all(slot_timeout=FINAL_SLOT_WAIT)
            except SessionTerminated as error:
                log.error("final flush: %s", error)
                break
            except SessionBusy as error:
                log.warning("final flush: %s; uploading what needs no run", error)
                try:
                    await sync.flush_uploads(list(self.namespace.pending))
                except (BaifsError, OSError) as upload_error:
                    log.error("final uploads failed: %s", upload_error)
                break
            except (BaifsError, OSError) as error:
                if trio.current_time() + delay > deadline:
                    log.error("final flush failed: %s; giving up", error)
                    break
                log.error("final flush failed (%s); trying again in %.0f s", error, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
        await self.overlay.save_checkpoint()
        pending = self.namespace.pending_changes()
        if pending:
            log.error(
                "%d change(s) %s; they are kept in %s for the next mount of this session "
                "(or 'baifs salvage')",
                pending,
                "were left pending as asked" if sync.keep_pending else "could not be uploaded",
                self.state,
            )
        for change, refusal in sync.refusals.items():
            log.error("refused by the session %d time(s): %s: %s", refusal.attempts, change, refusal.said)

    def close(self) -> None:
        self.journal.close()

    def disk_blocks(self) -> tuple[int, int, int]:
        """The session's disk in 4 KiB blocks (total, free, available), as ``df`` in it reported at
        discovery (free counts what root may still use, as df's "used" is total - free); until
        then, the local staging space."""
        disk = self.profiles.profile.disk_kib
        if disk is not None:
            return disk[0] // 4, (disk[0] - disk[1]) // 4, disk[2] // 4
        local = os.statvfs(self.store.staging_dir)
        return (
            local.f_blocks * local.f_frsize // 4096,
            local.f_bfree * local.f_frsize // 4096,
            local.f_bavail * local.f_frsize // 4096,
        )
