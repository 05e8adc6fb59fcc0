"""The pyfuse3 adapter: kernel requests in, `Filesystem` calls out, errnos back.

Thin by design: no HTTP and no policy here. What this layer owns is what the
kernel protocol demands:

- lookup counts (every entry returned by lookup, create, mkdir, symlink and
  each entry ``readdir`` accepts counts one; ``forget`` takes them back);
- stable ``readdir`` cookies: a directory handle holds the listing it was
  opened with, and a cookie is a position in that snapshot;
- attribute and entry timeouts, negative entries for names that do not exist;
- control files at the root (`control`) and extended attributes;
- the rule that no handler may take the mount down: `FSError` becomes its
  errno, any other exception is logged with its traceback and answered EIO.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from ..api.errors import BaifsError
from .control import CONTROL_MODE, FLUSH_XATTR, STATUS_INODE, STATUS_NAME, status
from .filesystem import HIDDEN_AT_ROOT, Filesystem, FSError, Handle
from .model import ROOT_INODE, Node

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
CONTROL_HANDLE_BASE = 1 << 40


def handler(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Map FSError to its errno and anything unexpected to a logged EIO."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        except BaifsError as error:
            log.error("%s: %s", method.__name__, error)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as error:
            log.error("%s: %s", method.__name__, error)
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", method.__name__, args[1:3])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, filesystem: Filesystem, identity: dict[str, Any]) -> None:
        super().__init__()
        self.fs = filesystem
        self.identity = identity
        self.options = filesystem.options
        self._dirs: dict[int, list[tuple[bytes, Node | None, bool]]] = {}
        self._controls: dict[int, bytes] = {}
        self._next_dir = 1
        self._started_ns = time.time_ns()
        filesystem.invalidate = self._invalidate

    # -- attributes -------------------------------------------------------

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = node.inode
        attributes.generation = 0
        attributes.entry_timeout = self.options.attr_timeout
        attributes.attr_timeout = self.options.attr_timeout
        mode = node.mode
        if self.options.umask is not None:
            mode &= ~self.options.umask
        attributes.st_mode = mode
        attributes.st_nlink = 2 if node.is_dir else 1
        attributes.st_uid = self.options.uid
        attributes.st_gid = self.options.gid
        attributes.st_rdev = 0
        attributes.st_size = len(node.target) if node.is_symlink and node.target else node.size
        attributes.st_blksize = 65536
        attributes.st_blocks = -(-node.size // 512)
        attributes.st_atime_ns = node.atime_ns
        attributes.st_mtime_ns = node.mtime_ns
        attributes.st_ctime_ns = node.ctime_ns
        return attributes

    def _control_attributes(self) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = STATUS_INODE
        attributes.entry_timeout = attributes.attr_timeout = self.options.attr_timeout
        attributes.st_mode = CONTROL_MODE
        attributes.st_nlink = 1
        attributes.st_uid = self.options.uid
        attributes.st_gid = self.options.gid
        attributes.st_blksize = 4096
        attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = self._started_ns
        return attributes

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._attributes(node)

    # -- lookups ----------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name == STATUS_NAME:
            return self._control_attributes()
        parent = self.fs.node(parent_inode)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(parent.parent or parent)
        try:
            return self._entry(await self.fs.lookup(parent, name))
        except FSError as error:
            if error.errno != errno.ENOENT:
                raise
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.options.negative_timeout
            return negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.fs.namespace.inodes.get(inode)
            if node is not None:
                node.lookups -= count
                self.fs.namespace.release_if_unused(node)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == STATUS_INODE:
            return self._control_attributes()
        return self._attributes(await self.fs.refresh(self.fs.node(inode)))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == STATUS_INODE:
            raise FSError(errno.EACCES)
        node = await self.fs.setattr(
            self.fs.node(inode),
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
        )
        return self._attributes(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(self.fs.node(inode))

    # -- directories ------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the directory: readdir cookies are positions in this snapshot."""
        directory = self.fs.node(inode)
        children = await self.fs.list_children(directory)
        entries: list[tuple[bytes, Node | None, bool]] = [
            (b".", directory, False),
            (b"..", directory.parent or directory, False),
        ]
        entries += [(n.name, n, True) for n in children]
        if inode == ROOT_INODE:
            entries.append((STATUS_NAME, None, False))
        number = self._next_dir
        self._next_dir += 1
        self._dirs[number] = entries
        return number

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            name, node, counted = entries[index]
            attributes = self._attributes(node) if node is not None else self._control_attributes()
            if not pyfuse3.readdir_reply(token, name, attributes, index + 1):
                return
            if counted and node is not None:
                node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._flush_everything()

    async def _flush_everything(self) -> None:
        self.fs.journal.sync()
        await self.fs.flush_all()

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_control(parent_inode, name)
        return self._entry(await self.fs.mkdir(self.fs.node(parent_inode), name, mode))

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_control(parent_inode, name)
        await self.fs.rmdir(self.fs.node(parent_inode), name)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_control(parent_inode, name)
        await self.fs.unlink(self.fs.node(parent_inode), name)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_control(parent_inode, name)
        return self._entry(await self.fs.symlink(self.fs.node(parent_inode), name, target))

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._refuse_control(parent_inode_old, name_old)
        self._refuse_control(parent_inode_new, name_new)
        await self.fs.rename(
            self.fs.node(parent_inode_old), name_old, self.fs.node(parent_inode_new), name_new, flags
        )

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise FSError(errno.EPERM)  # hard links: the session API cannot make them

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise FSError(errno.EPERM)
        self._refuse_control(parent_inode, name)
        number, handle = await self.fs.create(self.fs.node(parent_inode), name, mode, os.O_WRONLY)
        await self.fs.release(number)
        return self._entry(handle.node)

    def _refuse_control(self, parent_inode: int, name: bytes) -> None:
        """Reserved names at the root belong to baifs, not to the session."""
        if parent_inode == ROOT_INODE and name in HIDDEN_AT_ROOT:
            raise FSError(errno.EPERM)

    # -- files ------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == STATUS_INODE:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise FSError(errno.EACCES)
            number = CONTROL_HANDLE_BASE + len(self._controls) + 1
            while number in self._controls:
                number += 1
            self._controls[number] = (json.dumps(status(self.fs, self.identity), indent=2) + "\n").encode()
            return pyfuse3.FileInfo(fh=number, direct_io=True, keep_cache=False)
        number, handle = await self.fs.open(self.fs.node(inode), flags)
        return self._file_info(number, handle)

    def _file_info(self, number: int, handle: Handle) -> pyfuse3.FileInfo:
        node = handle.node
        keep = node.kernel_version == node.content_version
        node.kernel_version = node.content_version
        return pyfuse3.FileInfo(fh=number, keep_cache=keep, direct_io=False)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._refuse_control(parent_inode, name)
        number, handle = await self.fs.create(self.fs.node(parent_inode), name, mode, flags)
        return self._file_info(number, handle), self._entry(handle.node)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._controls:
            return self._controls[fh][off : off + size]
        return await self.fs.read(fh, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        return None

    @handler
    async def release(self, fh: int) -> None:
        if self._controls.pop(fh, None) is None:
            await self.fs.release(fh)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.fs.handles.get(fh)
        if handle is not None:
            await self.fs.fsync(handle.node)

    # -- extended attributes and the rest -------------------------------------

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode == ROOT_INODE and name == FLUSH_XATTR:
            await self._flush_everything()
            return
        raise FSError(errno.ENOTSUP)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ENOSYS makes the kernel answer every later getxattr with EOPNOTSUPP
        # itself, instead of asking before each write (security.capability).
        raise FSError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise FSError(errno.ENOTSUP)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 65536
        data.f_blocks = data.f_bfree = data.f_bavail = 1 << 30
        data.f_files = data.f_ffree = data.f_favail = 1 << 30
        data.f_namemax = 255
        return data

    # -- kernel cache invalidation ------------------------------------------

    def _invalidate(self, nodes: list[Node]) -> None:
        """Drop the kernel's entries for nodes that changed in the session (never blocks)."""
        for node in nodes:
            if node.parent is not None:
                pyfuse3.invalidate_entry_async(node.parent.inode, node.name, ignore_enoent=True)
