"""Reading remote content into the cache: batched downloads, prefetch, ranged reads.

Small files (up to `DIRECT_DOWNLOAD_MAX` bytes) come whole, five to a download
request. Wanted files wait in one queue; up to `parallel` workers each take up
to five of them, files someone is waiting for first, then prefetched ones.
`prefetch` queues files a scan will read next (`readahead` decides what is
a scan), so a directory of files costs about one request per five files.
Everything reaches the session through the remote seam (`remote`).

Larger files are read in chunks of `CHUNK_BYTES`, through a script in the
session (a run of its own, or a request to the supervisor of the mount's run
that holds the execution slot: `remote.RemoteTree.run` decides) that checks
the file's size and mtime (to the nanosecond) against the listing before and after it takes
the chunks, so every chunk of a cache entry is of one version. A
single chunk (the first read of a file, or a random access) travels inline,
base64 in the run's output: one run, nothing left behind. A wider window is
cut with ``dd`` into parts under ``.baifs-tmp/read-<token>/``, which are then
downloaded five to a request, several requests at a time, and removed by the
next script that runs in the session (`scratch.Scratch.using`). Sequential reads widen the window
fourfold up to `MAX_WINDOW_CHUNKS` and fetch the next window ahead while the
current one is read; a reader waits only for the chunks it needs, each
usable as soon as it arrives. Reading the first kilobyte of a 1 GB file
therefore moves one chunk, not the gigabyte.

Invariant: content is stored only under the (size, mtime) the listing gave;
when the session reports something else the file changed remotely, and
`StaleContent` tells the caller to list again.
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..api.archive import single_member
from ..api.errors import ServerError, SessionWedged
from ..concurrency import gather_each
from . import scratch
from .content import CHUNK_BYTES, DIRECT_DOWNLOAD_MAX, CacheEntry, ContentStore
from .errors import StaleContent
from .model import Node, join, same_mtime
from .remote import MAX_DOWNLOAD_PATHS, Remote
from .shell import ShellScript

log = logging.getLogger(__name__)

#: What one scan queues ahead at most; a later miss in the same scan queues more.
PREFETCH_FILES = 64
PREFETCH_BYTES = 32 * 1024 * 1024
#: The widest ranged read: this many chunks cut and downloaded by one run.
MAX_WINDOW_CHUNKS = 32
#: How long a ranged read waits for the session's execution slot (then EAGAIN).
RANGE_QUEUE_TIMEOUT = 20.0
#: Ranged reads whose output was lost on the way are read again this many times.
RANGE_ATTEMPTS = 2


@dataclass
class Want:
    remote_path: bytes
    size: int
    mtime_ns: int
    demanded: bool
    taken: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass
class RangeState:
    """Ranged reads of one version of a large file: what is on its way, where reading goes."""

    entry: CacheEntry
    in_flight: dict[int, trio.Event] = field(default_factory=dict)
    window: int = 1
    error: BaseException | None = None


class Fetcher:
    def __init__(self, remote: Remote, store: ContentStore, *, parallel: int = 4) -> None:
        self.remote = remote
        self.scratch = remote.scratch
        self.store = store
        self.parallel = parallel
        self._wants: dict[bytes, Want] = {}
        #: the wants in the order workers take them; a want may sit in both.
        self._demanded: deque[Want] = deque()
        self._prefetched: deque[Want] = deque()
        self._idle_workers = trio.lowlevel.ParkingLot()
        self._ranges: dict[tuple[bytes, int, int], RangeState] = {}
        self._nursery: trio.Nursery | None = None
        #: downloads of cut parts in flight, across every file being read.
        self._part_downloads = trio.CapacityLimiter(parallel)

    async def run_workers(self) -> None:
        """The download workers, and the home of background ranged reads."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.parallel):
                nursery.start_soon(self._worker)

    # -- small files ------------------------------------------------------

    async def whole_small(self, node: Node) -> CacheEntry:
        """Bring a small file into the cache, ahead of anything only prefetched."""
        assert node.origin is not None
        entry = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
        if entry is not None and entry.complete:
            return entry
        want = self._want(node, demanded=True)
        await want.done.wait()
        if want.error is not None:
            raise want.error
        entry = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
        if entry is None or not entry.complete:
            raise StaleContent(f"{node.origin!r} changed while it was read")
        return entry

    def prefetch(self, nodes: Iterable[Node]) -> None:
        """Queue small files, in the order given (a scan's), within bounds."""
        files = size = 0
        for sibling in nodes:
            if files >= PREFETCH_FILES or size >= PREFETCH_BYTES:
                return
            if self._prefetchable(sibling):
                self._want(sibling, demanded=False)
                files += 1
                size += sibling.remote_size

    def _prefetchable(self, node: Node) -> bool:
        if (
            not node.is_regular
            or node.stage is not None
            or node.origin is None
            or node.remote_size > DIRECT_DOWNLOAD_MAX
        ):
            return False
        entry = self.store.lookup(node.origin, node.remote_size, node.remote_mtime_ns)
        return entry is None or not entry.complete

    def _want(self, node: Node, *, demanded: bool) -> Want:
        assert node.origin is not None
        want = self._wants.get(node.origin)
        if want is None or want.done.is_set():
            want = Want(node.origin, node.remote_size, node.remote_mtime_ns, demanded)
            self._wants[node.origin] = want
            (self._demanded if demanded else self._prefetched).append(want)
        elif demanded and not want.demanded:
            want.demanded = True
            self._demanded.append(want)  # ahead of the prefetched queue, where it also waits
        self._idle_workers.unpark()
        return want

    def _take_batch(self) -> list[Want]:
        """Up to five waiting files, demanded ones first (queues hold stale wants; they are skipped)."""
        batch: list[Want] = []
        for queue in (self._demanded, self._prefetched):
            while queue and len(batch) < MAX_DOWNLOAD_PATHS:
                want = queue.popleft()
                if not want.taken and not want.done.is_set():
                    want.taken = True
                    batch.append(want)
        return batch

    async def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch:
                await self._download(batch)
            else:
                await self._idle_workers.park()

    async def _download(self, batch: list[Want]) -> None:
        try:
            archives = await self.remote.download([want.remote_path for want in batch])
        except ServerError as error:
            if len(batch) > 1:
                log.info("download of %d files failed (%s); fetching them one by one", len(batch), error)
                for want in batch:
                    await self._download([want])
                return
            self._finish(batch[0], error)
            return
        except BaseException as error:
            for want in batch:
                self._finish(want, error)
            if not isinstance(error, Exception):
                raise
            return
        try:
            unpacked = await trio.to_thread.run_sync(self._unpack, batch, archives)
        except BaseException as error:  # cancelled before the thread took it: nobody may wait forever
            for want in batch:
                self._finish(want, error)
            raise
        for want, outcome in zip(batch, unpacked, strict=True):
            if isinstance(outcome, Exception):
                self._finish(want, outcome)
            else:
                self.store.add_whole(want.remote_path, want.size, want.mtime_ns, outcome)
                self._finish(want, None)

    def _unpack(self, batch: list[Want], archives: list[memoryview]) -> list[Path | Exception]:
        """Each archive's file written into a new cache file, or why not (in a worker thread: I/O only)."""
        unpacked: list[Path | Exception] = []
        for want, archive in zip(batch, archives, strict=True):
            try:
                _, data = single_member(archive)
                if len(data) != want.size:
                    raise StaleContent(
                        f"{want.remote_path!r} has {len(data)} bytes, the listing said {want.size}"
                    )
                unpacked.append(self.store.write_new_file(data))
            except Exception as error:
                unpacked.append(error)
        return unpacked

    def _finish(self, want: Want, error: BaseException | None) -> None:
        want.error = error
        want.done.set()
        if self._wants.get(want.remote_path) is want:
            del self._wants[want.remote_path]

    async def link_target(self, node: Node) -> bytes:
        """The target of a remote symlink."""
        assert node.origin is not None
        target = await self.remote.read_link(node.origin)
        if target is None:
            raise StaleContent(f"{node.origin!r} is no longer a symlink")
        return target

    # -- large files ------------------------------------------------------

    async def ensure_range(self, entry: CacheEntry, offset: int, length: int) -> None:
        """Bring the chunks covering a byte range into the cache.

        A read that continues the previous one is sequential: its window
        grows (4×, up to `MAX_WINDOW_CHUNKS`) and the next window is fetched
        ahead, in the background, while this one is read. Each chunk is usable
        as soon as it arrives.
        """
        state = self._range_state(entry)
        needed = entry.missing_chunks(offset, length)
        first = needed[0] if needed else offset // CHUNK_BYTES
        # Sequential: the chunk before is here or on its way. Robust to the
        # kernel's readahead, which sends several reads at once, out of order.
        sequential = first > 0 and (entry.has(first - 1) or first - 1 in state.in_flight)
        if not sequential:
            state.window = 1
            self._request(entry, state, needed)
        else:
            state.window = min(state.window * 4, MAX_WINDOW_CHUNKS)
            frontier = first
            while frontier < entry.chunk_total and (entry.has(frontier) or frontier in state.in_flight):
                frontier += 1
            if frontier - first < state.window:  # less than a window ahead: fetch the next one
                self._request(entry, state, range(frontier, min(entry.chunk_total, frontier + state.window)))
        await self._wait_for(entry, state, needed)

    async def ensure_all(self, entry: CacheEntry) -> None:
        state = self._range_state(entry)
        missing = entry.missing_chunks(0, entry.size)
        self._request(entry, state, missing)
        await self._wait_for(entry, state, missing)

    def _range_state(self, entry: CacheEntry) -> RangeState:
        key = (entry.remote_path, entry.size, entry.mtime_ns)
        state = self._ranges.get(key)
        if state is None or state.entry is not entry:
            state = self._ranges[key] = RangeState(entry)
        return state

    def _request(self, entry: CacheEntry, state: RangeState, indices: Iterable[int]) -> None:
        """Start fetching the chunks that are neither cached nor on their way, in windows."""
        wanted = [i for i in indices if not entry.has(i) and i not in state.in_flight]
        for start in range(0, len(wanted), MAX_WINDOW_CHUNKS):
            window = wanted[start : start + MAX_WINDOW_CHUNKS]
            for index in window:
                state.in_flight[index] = trio.Event()
            assert self._nursery is not None
            self._nursery.start_soon(self._fetch_window, entry, state, window)

    async def _wait_for(self, entry: CacheEntry, state: RangeState, indices: list[int]) -> None:
        for index in indices:
            event = state.in_flight.get(index)
            if event is not None:
                await event.wait()
            if not entry.has(index):
                raise state.error or StaleContent(f"chunk {index} of {entry.remote_path!r} did not arrive")

    async def _fetch_window(self, entry: CacheEntry, state: RangeState, indices: list[int]) -> None:
        def arrived(index: int) -> None:
            event = state.in_flight.pop(index, None)
            if event is not None:
                event.set()

        try:
            await self._read_chunks(entry, indices, arrived)
        except Exception as error:
            state.error = error
            log.info("reading %r in the session failed: %s", entry.remote_path, error)
        finally:
            for index in indices:
                arrived(index)
            if entry.complete:
                self._ranges.pop((entry.remote_path, entry.size, entry.mtime_ns), None)

    async def _read_chunks(
        self, entry: CacheEntry, indices: list[int], arrived: Callable[[int], None]
    ) -> None:
        """One chunk travels inline in the run's output; several are cut in the session and downloaded.

        Through a supervised run's inbox output travels as a file, which a
        chunk in base64 would make larger than a download can carry: parts
        are always cut then.
        """
        if len(indices) == 1 and self.remote.inbox() is None:
            await self._run_read(entry, indices, None, arrived)
            return
        staging = scratch.read_dir(scratch.new_token())
        with self.scratch.using(staging):  # then litter, removed by the next script that runs
            await self._run_read(entry, indices, staging, arrived)
            await self._download_parts(entry, staging, indices, arrived)

    async def _run_read(
        self, entry: CacheEntry, indices: list[int], staging: bytes | None, arrived: Callable[[int], None]
    ) -> None:
        """The run that checks the file, then prints its one chunk or cuts the chunks into ``staging``.

        Leftover parts of earlier reads are removed by the same run; they stay
        litter if it fails.
        """
        shell = ShellScript()
        path = shell.word(entry.remote_path)
        leftovers = self.scratch.take_litter()
        for leftover in leftovers:
            shell.raw(f"rm -rf -- {shell.word(leftover)}")
        # The file's size and mtime to the nanosecond, before and after the chunks are
        # taken: chunks of one cache entry are of one version (a same-size rewrite within
        # the second of the listed mtime included). A stat without sub-second times
        # prints no dot; then seconds are compared.
        check = f"stat -L -c 'BAIFS-STAT %s %.9Y' -- {path} || exit 1"
        shell.raw(check)
        if staging is None:
            shell.raw(f"echo 'BAIFS-CHUNK {indices[0]}'")
            shell.raw(f"dd if={path} bs={CHUNK_BYTES} skip={indices[0]} count=1 2>/dev/null | base64")
        else:
            shell.raw(f"mkdir -p -- {shell.word(staging)} || exit 1")
            for index in indices:
                part = shell.word(join(staging, str(index).encode()))
                shell.raw(
                    f"dd if={path} of={part} bs={CHUNK_BYTES} skip={index} count=1 2>/dev/null || exit 1"
                )
        shell.raw(check)
        output: list[str] = []

        async def collect(stream: str, text: str) -> None:
            if stream == "stdout":
                output.append(text)

        try:
            for _ in range(RANGE_ATTEMPTS):
                output.clear()
                outcome = await self.remote.run(
                    shell.render(), collect, purpose="a ranged read", queue_timeout=RANGE_QUEUE_TIMEOUT
                )
                if outcome.complete:
                    break
                log.info("reading %r: the session's answer was lost; reading again", entry.remote_path)
            else:
                raise SessionWedged(f"reading {entry.remote_path!r}: the session's answers keep getting lost")
        except BaseException:
            self.scratch.note_litter(leftovers)
            raise
        if outcome.exit_code != 0:
            raise StaleContent(f"could not read {entry.remote_path!r} in the session")
        inline = _parse_chunks("".join(output), entry.size, entry.mtime_ns)
        for index, data in inline.items():
            await self._store_chunk(entry, index, data)
            arrived(index)

    async def _download_parts(
        self, entry: CacheEntry, staging: bytes, indices: list[int], arrived: Callable[[int], None]
    ) -> None:
        batches = [indices[i : i + MAX_DOWNLOAD_PATHS] for i in range(0, len(indices), MAX_DOWNLOAD_PATHS)]

        async def fetch(batch: list[int]) -> None:
            async with self._part_downloads:
                archives = await self.remote.download([join(staging, str(index).encode()) for index in batch])
            for index, archive in zip(batch, archives, strict=True):
                _, data = await trio.to_thread.run_sync(single_member, archive)
                expected = min(CHUNK_BYTES, entry.size - index * CHUNK_BYTES)
                if len(data) != expected:
                    raise StaleContent(f"part {index} of {entry.remote_path!r} has {len(data)} bytes")
                await self._store_chunk(entry, index, data)
                arrived(index)

        await gather_each(fetch, batches)

    async def _store_chunk(self, entry: CacheEntry, index: int, data: bytes) -> None:
        await trio.to_thread.run_sync(self.store.write_chunk, entry, index, data)
        self.store.chunk_written(entry, index)


def _stat_mtime_ns(text: str) -> tuple[int, bool]:
    """``%.9Y`` of stat as nanoseconds, and whether it had sub-second digits."""
    seconds, dot, fraction = text.partition(".")
    if not dot or not fraction.isdigit():
        return int(seconds) * 1_000_000_000, False
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0")[:9]), True


def _parse_chunks(output: str, expected_size: int, expected_mtime_ns: int) -> dict[int, bytes]:
    """Chunks printed by a ranged read, after checking the file is still the one listed.

    Each ``BAIFS-STAT`` line (before and after the chunks were taken) must
    show the listed size and mtime: to the listing's precision where stat
    gives sub-second times, else to the second.
    """
    chunks: dict[int, bytes] = {}
    current: int | None = None
    encoded: list[str] = []

    def close() -> None:
        if current is not None:
            chunks[current] = base64.b64decode("".join(encoded))

    for line in output.splitlines():
        if line.startswith("BAIFS-STAT "):
            size_text, mtime_text = line.split()[1:3]
            size, (mtime_ns, precise) = int(size_text), _stat_mtime_ns(mtime_text)
            same = (
                same_mtime(expected_mtime_ns, mtime_ns)
                if precise
                else mtime_ns // 1_000_000_000 == expected_mtime_ns // 1_000_000_000
            )
            if size != expected_size or not same:
                raise StaleContent(f"the file has changed in the session ({size} bytes, mtime {mtime_text})")
        elif line.startswith("BAIFS-CHUNK "):
            close()
            current, encoded = int(line.split()[1]), []
        else:
            encoded.append(line.strip())
    close()
    return chunks
