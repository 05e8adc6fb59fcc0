"""Whether another process (a mount daemon, a `baifs serve`) still runs.

A process that exited but was not reaped yet (a zombie: its parent is, say,
a test or a shell that has not waited) counts as ended: it holds no mount,
no port and no lock any more.
"""

from __future__ import annotations


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
