"""The pyfuse3 adapter: kernel requests in, `Filesystem` and `ControlTree` calls out, errnos back.

Thin by design: no HTTP and no policy here. What this layer owns is what the
kernel protocol demands:

- lookup counts (every entry returned by lookup, create, mkdir, symlink and
  each entry ``readdir`` accepts counts one; ``forget`` takes them back;
  control entries are permanent and not counted);
- stable ``readdir`` cookies: a directory handle holds the listing it was
  opened with, and a cookie is a position in that snapshot;
- attribute and entry timeouts, negative entries for names that do not
  exist (remembered by `kernel.KernelCache`, which drops them after a run);
- routing: a request about a control inode, name or descriptor goes to the
  control tree (`control`) once, everything else to `Filesystem`;
- the rule that no handler may take the mount down: `FSError` becomes its
  errno, a failed remote call EIO, and anything else is logged with its
  traceback and answered EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from ..errors import BaifsError
from .control import ControlEntry, ControlTree
from .core import MountOptions
from .errors import FSError
from .filesystem import Filesystem
from .handles import Handle, Handles
from .kernel import KernelCache
from .model import ROOT_INODE, Node

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


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


DirectoryEntry = tuple[bytes, Node | ControlEntry, bool]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        filesystem: Filesystem,
        handles: Handles,
        control: ControlTree,
        kernel: KernelCache,
        options: MountOptions,
        disk: Callable[[], tuple[int, int, int]],
    ) -> None:
        super().__init__()
        self.fs = filesystem
        self.handles = handles
        self.control = control
        self.kernel = kernel
        self.options = options
        #: the session's disk in 4 KiB blocks: total, free, available.
        self.disk = disk
        self._dirs: dict[int, list[DirectoryEntry]] = {}
        self._next_dir = 1

    # -- attributes -------------------------------------------------------

    def _attributes(self, item: Node | ControlEntry) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = item.inode
        attributes.generation = 0
        attributes.st_rdev = 0
        attributes.st_blksize = 65536
        if isinstance(item, ControlEntry):
            attributes.st_uid, attributes.st_gid = self.options.uid, self.options.gid
            attributes.entry_timeout = attributes.attr_timeout = 0
            attributes.st_mode = item.mode
            attributes.st_nlink = 2 if item.is_dir else 1
            attributes.st_size = item.size
            attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = item.mtime_ns
        else:
            attributes.st_uid, attributes.st_gid = self._owner(item)
            attributes.entry_timeout = attributes.attr_timeout = self.options.attr_timeout
            mode = item.mode
            if self.options.umask is not None:
                mode &= ~self.options.umask
            attributes.st_mode = mode
            attributes.st_nlink = item.link_count
            attributes.st_size = len(item.target) if item.is_symlink and item.target else item.size
            attributes.st_atime_ns = item.atime_ns
            attributes.st_mtime_ns = item.mtime_ns
            attributes.st_ctime_ns = item.ctime_ns
        attributes.st_blocks = self._blocks(attributes.st_mode, attributes.st_size)
        return attributes

    @staticmethod
    def _blocks(mode: int, size: int) -> int:
        """512-byte units as a local disk of 4 KiB blocks allocates them, so ``du`` adds up as there:
        whole blocks for a file's content, one for a directory, none for a link's short target."""
        if stat.S_ISDIR(mode):
            return 8
        if stat.S_ISREG(mode):
            return -(-size // 4096) * 8
        return 0

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        if node.parent is not None:
            self.kernel.present(node.parent.inode, node.name)
        return self._attributes(node)

    # -- lookups ----------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.control.owns_name(parent_inode, name):
            return self._attributes(self.control.lookup(parent_inode, name))
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
            self.kernel.absent(parent_inode, name)
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.options.negative_timeout
            return negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.fs.forget(inode, count)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.control.owns(inode):
            return self._attributes(self.control.entry(inode))
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
        if self.control.owns(inode):
            changes_owner = fields.update_mode or fields.update_uid or fields.update_gid
            return self._attributes(self.control.setattr(inode, only_size=not changes_owner))
        node = self.fs.node(inode)
        owner = None
        if fields.update_uid or fields.update_gid:  # the kernel checked who may (default_permissions)
            uid, gid = self._owner(node)
            owner = (attr.st_uid if fields.update_uid else uid, attr.st_gid if fields.update_gid else gid)
        node = await self.fs.setattr(
            node,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            owner=owner,
        )
        return self._attributes(node)

    def _owner(self, node: Node) -> tuple[int, int]:
        """Who owns a node: the mount's configured owner, unless chown changed it here."""
        return node.owner or (self.options.uid, self.options.gid)

    def _made_by(self, node: Node, ctx: pyfuse3.RequestContext) -> Node:
        """A new object belongs to whoever made it, as on a local disk (kept for the mount's life).

        The mount's own user makes objects of the configured owner (``--uid``);
        another user (only possible with ``--allow-other``) owns what they make,
        with the group of a setgid directory where it is made in one.
        """
        if ctx.uid in (os.getuid(), self.options.uid):
            return node
        gid = ctx.gid
        if node.parent is not None and node.parent.mode & stat.S_ISGID:
            gid = self._owner(node.parent)[1]
        node.owner = (ctx.uid, gid)
        return node

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.control.owns(inode):
            return self.control.readlink(inode)
        return await self.fs.readlink(self.fs.node(inode))

    # -- directories ------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the directory: readdir cookies are positions in this snapshot."""
        entries: list[DirectoryEntry]
        if self.control.owns(inode):
            above = self.control.parent_of(inode)
            parent: Node | ControlEntry = (
                self.fs.namespace.root if above == ROOT_INODE else self.control.entry(above)
            )
            entries = [(b".", self.control.entry(inode), False), (b"..", parent, False)]
            entries += [(entry.name, entry, False) for entry in self.control.children(inode)]
        else:
            directory = self.fs.node(inode)
            children = await self.fs.list_children(directory)
            entries = [(b".", directory, False), (b"..", directory.parent or directory, False)]
            # The control files are reached by name only, never listed: tree tools (rsync -a, tar, find,
            # git status) must not pick them up, as S3QL hides its control file.
            entries += [(node.name, node, True) for node in children]
        number = self._next_dir
        self._next_dir += 1
        self._dirs[number] = entries
        return number

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            name, item, counted = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(item), index + 1):
                return
            if counted and isinstance(item, Node):
                item.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.flush_everything()

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_control(parent_inode, name)
        return self._entry(self._made_by(await self.fs.mkdir(self.fs.node(parent_inode), name, mode), ctx))

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
        return self._entry(
            self._made_by(await self.fs.symlink(self.fs.node(parent_inode), name, target), ctx)
        )

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
        self.kernel.present(parent_inode_new, name_new)

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise FSError(errno.EPERM)  # hard links: the session API cannot make them

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._refuse_control(parent_inode, name)
        parent = self.fs.node(parent_inode)
        if stat.S_ISFIFO(mode):
            return self._entry(self._made_by(await self.fs.mkfifo(parent, name, mode), ctx))
        if not stat.S_ISREG(mode):
            # Sockets need a process bound to them, devices a privileged container: neither is
            # something the session's scripts can make for a mount.
            raise FSError(errno.EPERM)
        number, handle = await self.fs.create(parent, name, mode, os.O_WRONLY)
        await self.handles.release(number)
        return self._entry(self._made_by(handle.node, ctx))

    def _refuse_control(self, parent_inode: int, name: bytes) -> None:
        """Reserved names at the root and everything under them belong to baifs, not to the session."""
        if self.control.owns_name(parent_inode, name):
            raise FSError(errno.EPERM)

    # -- files ------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.control.owns(inode):
            number = self.control.open(inode, flags, ctx.pid)
            return pyfuse3.FileInfo(fh=number, direct_io=True, keep_cache=False)
        number, handle = await self.handles.open(self.fs.node(inode), flags)
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
        return self._file_info(number, handle), self._entry(self._made_by(handle.node, ctx))

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.control.owns_handle(fh):
            return self.control.read(fh, off, size)
        return await self.handles.read(fh, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.control.owns_handle(fh):
            return self.control.write(fh, off, buf)
        return await self.handles.write(fh, off, buf)

    @handler
    async def flush(self, fh: int) -> None:
        """close(): a run request written to ``.run`` is submitted here, so a bad one fails close()."""
        if self.control.owns_handle(fh):
            self.control.flush(fh)

    @handler
    async def release(self, fh: int) -> None:
        if self.control.owns_handle(fh):
            self.control.release(fh)
        else:
            await self.handles.release(fh)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.control.owns_handle(fh):
            self.control.flush(fh)
            return
        handle = self.handles.get(fh)
        if handle is not None:
            await self.fs.fsync(handle.node)

    # -- extended attributes and the rest -------------------------------------

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.control.setxattr(inode, name, value)  # baifs's commands are the only attributes

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ENOSYS makes the kernel answer every later getxattr with EOPNOTSUPP
        # itself, instead of asking before each write (security.capability).
        raise FSError(errno.ENOSYS)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise FSError(errno.ENOSYS)  # none, and the kernel stops asking (ls -l asks for every file)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise FSError(errno.ENOTSUP)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The session's disk as ``df`` in it reported at discovery; until then, the local staging space."""
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        total, free, available = self.disk()
        data.f_blocks, data.f_bfree, data.f_bavail = total, free, available
        data.f_files = data.f_ffree = data.f_favail = 1 << 30  # the session's inode count is not known
        data.f_namemax = 255
        return data
