"""Control files: names at the mount's root that belong to baifs, not to the session.

``.baifs-status`` is a read-only JSON document: pending uploads and namespace
changes, an ongoing flush's progress, cache use, requests per endpoint,
retries and recent errors. ``baifs status`` and ``baifs umount`` read it.

Control files live in a reserved inode range far above anything `model`
allocates, are never listed from or sent to the session, and are owned by
the mounting user. Commands go through extended attributes on the mount's
root (S3QL's pattern): setting ``user.baifs.flush`` flushes everything and
returns when it is on the session.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from .. import __version__
from .filesystem import Filesystem

STATUS_NAME = b".baifs-status"
STATUS_INODE = 0xFFFF_FFFF_0000_0001
FLUSH_XATTR = b"user.baifs.flush"
CONTROL_MODE = stat.S_IFREG | 0o444


def status(filesystem: Filesystem, identity: dict[str, Any]) -> dict[str, Any]:
    namespace = filesystem.namespace
    pending_files = [n for n in namespace.pending if n.dirty and n.attached]
    namespace_changes = len(namespace.doomed) + sum(
        1 for n in namespace.pending if n.attached and not (n.dirty and n.is_regular)
    )
    connection = filesystem.session.connection
    stats = filesystem.stats
    return {
        **identity,
        "version": __version__,
        "pid": os.getpid(),
        "time": time.time(),
        "pending": {
            "uploads": len(pending_files),
            "upload_bytes": sum(n.size for n in pending_files),
            "namespace_changes": namespace_changes,
            "paths": sorted(os.fsdecode(n.path) for n in list(namespace.pending)[:20] if n.attached),
        },
        "flush": dict(filesystem.flush_progress),
        "cache": {
            "bytes": filesystem.store.cached_bytes,
            "limit": filesystem.store.cache_limit,
            "staged_bytes": filesystem.store.staged_bytes,
        },
        "session_api": connection.stats.as_dict(),
        "flushes": {
            "completed": stats.flushes,
            "uploaded_files": stats.uploaded_files,
            "uploaded_bytes": stats.uploaded_bytes,
            "scripts": stats.scripts,
            "failures": stats.flush_failures,
            "last_error": stats.last_flush_error,
        },
        "recovered_changes": stats.recovered_changes,
        "phase_behaviour": filesystem.executor.phase_behaviour,
    }
