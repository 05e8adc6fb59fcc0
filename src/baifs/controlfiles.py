"""The names of a mount's control files and attributes, shared by the mount, the commands and the tests.

A mount shows, at its root, files that belong to baifs rather than to the
session (`baifs.fs.control` serves them; `baifs.mountctl` and
`baifs.runctl` use them from outside the mount)::

    .baifs-status      read-only JSON: the mount's state
    .run               write a command to start a run; read: the latest run's status
    .runs/N/           one directory per run kept, and ``latest``

Commands other than runs go through extended attributes (S3QL's pattern).
This module holds names only, and imports nothing, so every side can use it.
"""

STATUS = ".baifs-status"
RUN = ".run"
RUNS = ".runs"
LATEST = "latest"
#: Set on the mount's root: returns once everything pending is on the session.
FLUSH_XATTR = "user.baifs.flush"
#: Set on the root before an unmount: the daemon ends without its final flush, changes kept.
KEEP_PENDING_XATTR = "user.baifs.keep-pending"
#: Set on ``.run`` to a run's number: interrupts that run in the session.
INTERRUPT_XATTR = "user.baifs.interrupt"
#: Every control name at the mount's root.
AT_ROOT = (STATUS, RUN, RUNS)
