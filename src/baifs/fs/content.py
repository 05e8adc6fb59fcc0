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
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: Largest file fetched by one download: a 1 MiB tar minus headers, with margin.
DIRECT_DOWNLOAD_MAX = 1_040_000
#: Ranges of larger files are cut and downloaded in chunks of this size.
CHUNK_BYTES = 1_040_000


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


@dataclass
class CacheEntry:
    remote_path: bytes
    size: int
    mtime_ns: int
    file: Path
    chunks: set[int] = field(default_factory=set)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0

    @property
    def chunk_total(self) -> int:
        return chunk_count(self.size)

    @property
    def complete(self) -> bool:
        return len(self.chunks) >= self.chunk_total

    def missing_chunks(self, offset: int, length: int) -> list[int]:
        if self.size == 0 or length <= 0:
            return []
        first = offset // CHUNK_BYTES
        last = min(self.size - 1, offset + length - 1) // CHUNK_BYTES
        return [index for index in range(first, last + 1) if index not in self.chunks]


class ContentStore:
    def __init__(self, cache_dir: Path, staging_dir: Path, cache_limit: int) -> None:
        self.cache_dir = cache_dir
        self.staging_dir = staging_dir
        self.cache_limit = cache_limit
        self._entries: dict[bytes, CacheEntry] = {}
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
        entry.last_used = time.monotonic()
        return entry

    def entry_for(self, remote_path: bytes, size: int, mtime_ns: int) -> CacheEntry:
        """The entry to fill for this version of a file (an empty one if unknown)."""
        entry = self.lookup(remote_path, size, mtime_ns)
        if entry is None:
            name = hashlib.sha256(remote_path).hexdigest()[:32]
            entry = CacheEntry(remote_path, size, mtime_ns, self.cache_dir / name)
            with open(entry.file, "wb") as handle:
                handle.truncate(size)
            self._entries[remote_path] = entry
        return entry

    def store_chunk(self, entry: CacheEntry, index: int, data: bytes) -> None:
        """Write one chunk (or a whole small file as chunk 0) into its entry."""
        with open(entry.file, "r+b") as handle:
            handle.seek(index * CHUNK_BYTES)
            handle.write(data)
        entry.chunks.add(index)
        entry.last_used = time.monotonic()

    def forget(self, remote_path: bytes) -> None:
        entry = self._entries.get(remote_path)
        if entry is not None:
            self._drop(entry)

    def rename(self, old: bytes, new: bytes) -> None:
        """Remote objects moved by a flush keep their cached content."""
        moved = [
            (path, entry)
            for path, entry in self._entries.items()
            if path == old or path.startswith(old + b"/")
        ]
        for path, entry in moved:
            del self._entries[path]
            entry.remote_path = new + path[len(old) :]
            self._entries[entry.remote_path] = entry

    def _drop(self, entry: CacheEntry) -> None:
        self._entries.pop(entry.remote_path, None)
        entry.file.unlink(missing_ok=True)

    @property
    def cached_bytes(self) -> int:
        return sum(min(entry.size, len(entry.chunks) * CHUNK_BYTES) for entry in self._entries.values())

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits its limit."""
        total = self.cached_bytes
        if total <= self.cache_limit:
            return
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.cache_limit:
                break
            if entry.pins:
                continue
            total -= min(entry.size, len(entry.chunks) * CHUNK_BYTES)
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
        entry.chunks.update(range(entry.chunk_total))

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
