"""Small files replaced whole: a reader sees the old content or the new, never a part.

The content goes to a temporary name beside the target (synced first when
``fsync`` asks for it), which then replaces the target by rename; on any
failure the temporary file goes and the target is left as it was.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_atomically(path: Path, data: bytes, *, fsync: bool = False, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``; OSError (a full disk) leaves ``path`` as it was."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            if fsync:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
