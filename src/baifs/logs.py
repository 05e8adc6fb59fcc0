"""Where baifs logs, and how a running daemon's log is rotated, reopened and made verbose.

- Commands log to standard error, or to ``--log-file``. A file is rotated
  by size (`ROTATE_BYTES`, `ROTATE_KEEP` old files), so a mount that runs for
  months cannot fill the disk with its log.
- A mount's default log is ``<state>/logs/mount-<name>-<hash>.log``: the
  hash of the whole mountpoint path keeps two mounts whose mountpoints share
  a name apart.
- `reopen_logs` (a daemon's SIGHUP) closes the files; the next record opens
  them again by name, after an outside tool (logrotate) moved them.
- `toggle_debug_logging` (a daemon's SIGUSR1) switches between debug and
  the level the process started with.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ROTATE_BYTES = 10 * 1024 * 1024
ROTATE_KEEP = 3
NOISY = ("httpx", "httpcore", "hypercorn.error")

_started_level = logging.INFO


def setup_logging(level: str, log_file: Path | None) -> None:
    global _started_level
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8"
        )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _started_level = logging.getLevelName(level.upper())
    _set_level(_started_level)


def _set_level(level: int) -> None:
    logging.getLogger().setLevel(level)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))


def mount_log_path(state_dir: Path, mountpoint: Path) -> Path:
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:8]
    return state_dir / "logs" / f"mount-{mountpoint.name or 'root'}-{digest}.log"


def reopen_logs() -> None:
    """Close the log files; each is opened again by name at its next record."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()


def toggle_debug_logging() -> str:
    """Debug if the process logs less, else back to its starting level; the level now in force."""
    root = logging.getLogger()
    level = logging.DEBUG if root.level != logging.DEBUG else _started_level
    if level == logging.DEBUG and _started_level == logging.DEBUG:
        level = logging.INFO
    _set_level(level)
    return logging.getLevelName(level).lower()
