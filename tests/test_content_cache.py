"""The read cache's bookkeeping against the files it keeps on disk.

`ContentStore` keeps its total of cached bytes and its least-recently-used
order incrementally (so that a release costs the same at 100,000 files as
at 100). Random sequences of what the mount does to it (whole files
stored, chunks written, lookups of other versions, pins, moves of
directories, forgets, evictions) are checked after every step against a
recount: the total, the entries under each path, the files in the cache
directory, and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baifs.fs.content import CHUNK_BYTES, CacheEntry, ContentStore

pytestmark = pytest.mark.fast

PATHS = [b"a", b"a/x", b"a/y", b"a/b/z", b"ab", b"a0", b"c/x", b"c"]
#: where renames go: some free, some taken (an entry there is replaced).
TARGETS = [b"m", b"c/x", b"ab", b"c"]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("whole"), st.sampled_from(PATHS), st.integers(0, 3000), st.integers(0, 2)),
        st.tuples(st.just("chunk"), st.sampled_from(PATHS), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("pin"), st.sampled_from(PATHS), st.booleans(), st.just(0)),
        st.tuples(st.just("rename"), st.sampled_from(PATHS), st.sampled_from(TARGETS), st.just(0)),
        st.tuples(st.just("forget"), st.sampled_from(PATHS), st.just(0), st.just(0)),
        st.tuples(st.just("evict"), st.just(b""), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps=steps, limit=st.sampled_from([0, 2500, CHUNK_BYTES * 2, 10**12]))
def test_the_cache_accounting_matches_a_recount(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, bytes, Any, int]], limit: int
) -> None:
    root = tmp_path_factory.mktemp("store")
    store = ContentStore(root / "cache", root / "staging", limit)
    pinned: dict[bytes, CacheEntry] = {}
    for kind, path, first, second in steps:
        if kind == "whole":
            file = store.new_file()
            file.write_bytes(b"w" * first)
            store.add_whole(path, first, second, file)
        elif kind == "chunk":
            size = CHUNK_BYTES * 3 + 10
            entry = store.entry_for(path, size, second)
            store.write_chunk(entry, first, b"c" * min(CHUNK_BYTES, size - first * CHUNK_BYTES))
            store.chunk_written(entry, first)
        elif kind == "pin":
            entry = store._entries.get(path)
            if entry is not None and first and path not in pinned:
                entry.pins += 1
                pinned[path] = entry
            elif not first and path in pinned:
                pinned.pop(path).pins -= 1
        elif kind == "rename":
            store.rename(path, first)
        elif kind == "forget":
            store.forget(path)
        else:
            store.evict()
            unpinned = [e for e in store._entries.values() if not e.pins]
            assert store.cached_bytes <= limit or not unpinned
        entries = store._entries
        assert store.cached_bytes == sum(e.cached_bytes for e in entries.values())
        assert list(store._paths) == sorted(entries)
        assert all(path == entry.remote_path for path, entry in entries.items())
        assert {p.name for p in (root / "cache").iterdir()} == {e.file.name for e in entries.values()}
        for entry in entries.values():
            assert entry.file.stat().st_size == entry.size


def test_moving_a_directory_moves_exactly_its_entries(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "cache", tmp_path / "staging", 10**9)
    for path in (b"a", b"a/x", b"a/b/z", b"ab", b"a0", b"b/a/x"):
        file = store.new_file()
        file.write_bytes(path)
        store.add_whole(path, len(path), 1, file)
    store.rename(b"a", b"n")
    assert sorted(store._entries) == [b"a0", b"ab", b"b/a/x", b"n", b"n/b/z", b"n/x"]
    entry = store.lookup(b"n/b/z", 5, 1)
    assert entry is not None and entry.file.read_bytes() == b"a/b/z"
