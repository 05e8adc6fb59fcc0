"""How times appear in what people read: ISO 8601 with the local zone, to the second.

Documents baifs writes for people and scripts (``.baifs-status``, ``.run``,
``.runs/N/status``, the saved session profile) hold times in this one form;
`moment` reads it back, and the epoch seconds older versions wrote too.
"""

from __future__ import annotations

from datetime import datetime


def stamp(epoch: float | None) -> str | None:
    """``2026-12-03T12:04:41+00:00`` for epoch seconds (None stays None)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def moment(value: str | float | None) -> float | None:
    """Epoch seconds from a `stamp` (or from the epoch seconds an older baifs wrote)."""
    if value is None or isinstance(value, (int, float)):
        return value
    return datetime.fromisoformat(value).timestamp()
