"""The fast tier: the control tree of a mount's parts, over the in-memory session.

`ControlTree` answers the kernel's requests about ``.run``, ``.runs/`` and
``.baifs-status`` (the FUSE adapter only routes them): lookups by a table
of names, descriptors, and the ``.run`` protocol. These tests call it as the
adapter does, on a `MountCore` built over `fakeremote.FakeRemote`.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from fakeremote import FakeRemote

from baifs import controlfiles
from baifs.fs.control import RUN_INODE, STATUS_INODE
from baifs.fs.core import MountCore, MountOptions
from baifs.fs.errors import FSError
from baifs.fs.model import ROOT_INODE

pytestmark = pytest.mark.fast


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[MountCore]:
    built = MountCore(FakeRemote(tmp_path / "work"), tmp_path / "state", tmp_path / "cache", MountOptions())
    async with trio.open_nursery() as nursery:
        await built.start(nursery)
        yield built
        await built.stop()
        nursery.cancel_scope.cancel()
    built.close()


async def test_a_lookup_renders_only_the_document_it_names(core: MountCore) -> None:
    """Looking up ``.run`` (every ``echo ... > .run`` does) costs O(1), whatever is pending."""
    root = core.namespace.root
    for index in range(2000):
        core.overlay.create(root, f"f{index}".encode(), 0o100644, stage=core.store.new_stage())
    rendered = []
    status = core.control.status
    core.control.status = lambda: rendered.append(1) or status()  # type: ignore[method-assign]
    entry = core.control.lookup(ROOT_INODE, controlfiles.RUN.encode())
    assert entry.inode == RUN_INODE and not rendered
    assert core.control.lookup(ROOT_INODE, controlfiles.STATUS.encode()).inode == STATUS_INODE
    assert rendered == [1]
    document = json.loads(core.control.read(core.control.open(STATUS_INODE, os.O_RDONLY, 0), 0, 1 << 20))
    assert document["pending"]["uploads"] == 2000 and len(document["pending"]["paths"]) == 20


async def test_names_under_the_control_tree_are_looked_up_exactly(core: MountCore) -> None:
    runs = core.control.lookup(ROOT_INODE, controlfiles.RUNS.encode())
    for name in (b"1", b"01", b"latest", b"..x", b"\xff"):
        with pytest.raises(FSError) as refused:
            core.control.lookup(runs.inode, name)
        assert refused.value.errno == errno.ENOENT
    with pytest.raises(FSError):
        core.control.lookup(ROOT_INODE, b".baifs-tmp")  # reserved, and not a control file


async def test_a_request_that_can_never_be_valid_fails_its_write_and_says_why(core: MountCore) -> None:
    handle = core.control.open(RUN_INODE, os.O_WRONLY | os.O_TRUNC, os.getpid())
    with pytest.raises(FSError) as refused:
        core.control.write(handle, 0, b"exec = 5\n")
    assert refused.value.errno == errno.EINVAL
    core.control.release(handle)
    said = json.loads(core.control.read(core.control.open(RUN_INODE, os.O_RDONLY, 0), 0, 1 << 20))
    assert "must be strings" in said["last_rejected"] and said["latest"] is None
