"""File contents on the local disk: the read cache and the staging area.

Two directories with different rules:

- **staging** (under the mount's state directory) holds content written here
  and not yet on the session. A staging file is never evicted and survives a
  crash of the daemon; the journal says which path each one belongs to.
- **cache** holds copies of remote content, keyed by remote path and
  validated by the size and mtime the listing reported. Files too large for
  one download are cached in chunks of `CHUNK_BYTES` inside a sparse file,
  with the set of chunks present. Clean cache entries are evicted, least
  recently used first, when the cache passes its size limit; entries in use
  by open files are kept.

Invariants: a cache entry is returned only for the exact (size, mtime) it was
stored with; staging files are only removed by `discard_stage`, after the
content is on the session or the file was deleted, and never while a flush
reads them (`holding`): a file deleted while its upload is under way is
removed when that upload is done.

Costs, whatever the number of entries: a lookup, a stored chunk and the
accounting of ``cached_bytes`` are O(1) (the total is kept, not recomputed);
eviction is amortized O(1) per entry it drops (entries sit in least recently
used order, and a pinned one it meets moves to the back); moving a remote
directory's entries is O(log n + k) for its k cached files (a sorted index of
paths).
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from sortedcontainers import SortedList  # type: ignore[import-untyped]

#: Largest file fetched by one download: a 1 MiB tar minus headers, with margin.
DIRECT_DOWNLOAD_MAX = 1_040_000
#: Ranges of larger files are cut and downloaded in chunks of this size.
CHUNK_BYTES = 1_040_000


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


class CacheEntry:
    """One version (size, mtime) of a remote file, whole or in chunks, in a file of the cache."""

    __slots__ = ("remote_path", "size", "mtime_ns", "file", "present", "pins")

    def __init__(self, remote_path: bytes, size: int, mtime_ns: int, file: Path) -> None:
        self.remote_path = remote_path
        self.size = size
        self.mtime_ns = mtime_ns
        self.file = file
        #: the chunks present, as a bit set (bit i: chunk i).
        self.present = 0
        #: open descriptors reading it: a pinned entry is never evicted.
        self.pins = 0

    @property
    def chunk_total(self) -> int:
        return chunk_count(self.size)

    def has(self, index: int) -> bool:
        return bool(self.present >> index & 1)

    @property
    def complete(self) -> bool:
        return self.present.bit_count() >= self.chunk_total

    @property
    def cached_bytes(self) -> int:
        return min(self.size, self.present.bit_count() * CHUNK_BYTES)

    def missing_chunks(self, offset: int, length: int) -> list[int]:
        if self.size == 0 or length <= 0:
            return []
        first = offset // CHUNK_BYTES
        last = min(self.size - 1, offset + length - 1) // CHUNK_BYTES
        return [index for index in range(first, last + 1) if not self.has(index)]


class ContentStore:
    def __init__(self, cache_dir: Path, staging_dir: Path, cache_limit: int) -> None:
        self.cache_dir = cache_dir
        self.staging_dir = staging_dir
        self.cache_limit = cache_limit
        #: entries by remote path, least recently used first.
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        #: the same paths, sorted: the entries under a directory are a range.
        self._paths: SortedList = SortedList()
        self._cached_bytes = 0
        self._file_names = itertools.count()
        #: staging files being read by a flush, and how many flushes read each.
        self._held: Counter[str] = Counter()
        #: held staging files discarded meanwhile: removed when the last hold ends.
        self._discarded: set[str] = set()
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- the read cache ---------------------------------------------------

    def lookup(self, remote_path: bytes, size: int, mtime_ns: int) -> CacheEntry | None:
        entry = self._entries.get(remote_path)
        if entry is None:
            return None
        if entry.size != size or entry.mtime_ns != mtime_ns:
            self._drop(entry)
            return None
        self._entries.move_to_end(remote_path)
        return entry

    def new_file(self) -> Path:
        """A name in the cache no entry has had (safe to fill from a worker thread)."""
        return self.cache_dir / format(next(self._file_names), "x")

    def write_new_file(self, data: bytes) -> Path:
        """A new cache file holding ``data``, for `add_whole` (file I/O only: run it in a worker thread)."""
        file = self.new_file()
        file.write_bytes(data)
        return file

    def entry_for(self, remote_path: bytes, size: int, mtime_ns: int) -> CacheEntry:
        """The entry to fill chunk by chunk for this version of a file (an empty one if unknown)."""
        entry = self.lookup(remote_path, size, mtime_ns)
        if entry is None:
            entry = self._add(CacheEntry(remote_path, size, mtime_ns, self.new_file()))
            with open(entry.file, "wb") as handle:
                handle.truncate(size)
        return entry

    def add_whole(self, remote_path: bytes, size: int, mtime_ns: int, file: Path) -> CacheEntry:
        """A small file written whole into ``file`` (from `new_file`) becomes the entry for its version."""
        stale = self._entries.get(remote_path)
        if stale is not None:
            self._drop(stale)
        entry = self._add(CacheEntry(remote_path, size, mtime_ns, file))
        self._mark_present(entry, (1 << entry.chunk_total) - 1)
        return entry

    @staticmethod
    def write_chunk(entry: CacheEntry, index: int, data: bytes) -> None:
        """Write one chunk into its entry's file (file I/O only: run it in a worker thread)."""
        with open(entry.file, "r+b") as handle:
            handle.seek(index * CHUNK_BYTES)
            handle.write(data)

    def chunk_written(self, entry: CacheEntry, index: int) -> None:
        """A chunk written by `write_chunk` is present (unless the entry was dropped meanwhile)."""
        if self._entries.get(entry.remote_path) is entry:
            self._mark_present(entry, entry.present | 1 << index)
            self._entries.move_to_end(entry.remote_path)

    def forget(self, remote_path: bytes) -> None:
        entry = self._entries.get(remote_path)
        if entry is not None:
            self._drop(entry)

    def rename(self, old: bytes, new: bytes) -> None:
        """Remote objects moved by a flush keep their cached content."""
        inside = list(self._paths.irange(old + b"/", old + b"0", inclusive=(True, False)))
        for path in ([old] if old in self._entries else []) + inside:
            entry = self._entries[path]
            self._remove(entry)
            replaced = self._entries.get(new + path[len(old) :])
            if replaced is not None:
                self._drop(replaced)
            entry.remote_path = new + path[len(old) :]
            self._add(entry)

    def _add(self, entry: CacheEntry) -> CacheEntry:
        self._entries[entry.remote_path] = entry
        self._paths.add(entry.remote_path)
        self._cached_bytes += entry.cached_bytes
        return entry

    def _remove(self, entry: CacheEntry) -> None:
        del self._entries[entry.remote_path]
        self._paths.remove(entry.remote_path)
        self._cached_bytes -= entry.cached_bytes

    def _mark_present(self, entry: CacheEntry, present: int) -> None:
        self._cached_bytes -= entry.cached_bytes
        entry.present = present
        self._cached_bytes += entry.cached_bytes

    def _drop(self, entry: CacheEntry) -> None:
        if self._entries.get(entry.remote_path) is entry:
            self._remove(entry)
        entry.file.unlink(missing_ok=True)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits its limit.

        A pinned entry (an open file reads it) moves to the back: it is in
        use, and the next eviction does not step over it again.
        """
        for _ in range(len(self._entries)):
            if self._cached_bytes <= self.cache_limit:
                return
            path, entry = next(iter(self._entries.items()))
            if entry.pins:
                self._entries.move_to_end(path)
            else:
                self._drop(entry)

    # -- the staging area -------------------------------------------------

    def new_stage(self) -> str:
        name = secrets.token_hex(12)
        (self.staging_dir / name).touch(mode=0o600)
        return name

    def stage_path(self, stage: str) -> Path:
        return self.staging_dir / stage

    def stage_from(self, source: Path | None, length: int | None = None) -> str:
        """A staging file holding a copy of ``source`` (or nothing), cut to ``length``."""
        stage = self.new_stage()
        target = self.stage_path(stage)
        try:
            if source is not None:
                shutil.copyfile(source, target)
            if length is not None:
                os.truncate(target, length)
        except OSError:
            self.discard_stage(stage)
            raise
        return stage

    def refill_stage(self, stage: str, source: Path | None) -> None:
        """Rewrite a staging file in place with a copy of ``source`` (or nothing): descriptors
        open on it see the new content."""
        with open(self.stage_path(stage), "r+b") as target:
            target.truncate(0)
            if source is not None:
                with open(source, "rb") as origin:
                    shutil.copyfileobj(origin, target, 1 << 20)

    def adopt_stage(self, stage: str, remote_path: bytes, size: int, mtime_ns: int) -> None:
        """Content written here is now on the session: it becomes the cached copy.

        A staging area on another file system than the cache cannot be
        renamed into it; the content is then dropped (and downloaded if read).
        """
        entry = self.entry_for(remote_path, size, mtime_ns)
        if self._held[stage]:  # a flush still reads it: drop it when that is done
            self._drop(entry)
            self.discard_stage(stage)
            return
        try:
            self.stage_path(stage).replace(entry.file)
        except OSError:
            self._drop(entry)
            self.discard_stage(stage)
            return
        self._mark_present(entry, (1 << entry.chunk_total) - 1)

    def discard_stage(self, stage: str) -> None:
        if self._held[stage]:
            self._discarded.add(stage)
        else:
            self.stage_path(stage).unlink(missing_ok=True)

    @contextmanager
    def holding(self, stages: Collection[str]) -> Iterator[None]:
        """Keep these staging files on disk while the block runs (a flush reads them)."""
        self._held.update(stages)
        try:
            yield
        finally:
            self._held.subtract(stages)
            for stage in stages:
                if self._held[stage] <= 0:
                    del self._held[stage]
                    if stage in self._discarded:
                        self._discarded.discard(stage)
                        self.stage_path(stage).unlink(missing_ok=True)

    def stages(self) -> set[str]:
        return {path.name for path in self.staging_dir.iterdir() if not path.name.startswith(".")}

    @property
    def staged_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.staging_dir.iterdir())

    def status(self) -> dict[str, int]:
        """The cache and the staging area, for ``baifs status``."""
        return {"bytes": self.cached_bytes, "limit": self.cache_limit, "staged_bytes": self.staged_bytes}
