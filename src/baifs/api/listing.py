"""Directory listings of the session API: parsing and producing them.

A listing (`GET /session/{id}/files`, reference §4.3) describes one directory
level as a JSON *text* inside the JSON response: a list of objects with
``filename``, ``mode`` (an ``ls``-style string made by `stat.filemode`),
``size`` and float ``ctime``/``mtime``/``atime``. A missing path is not an
HTTP error: the response is 200 with an empty ``files`` and a Python traceback
in ``errors``.

This module owns the translation between that shape and `RemoteEntry`, in both
directions (the local server produces listings with `entry_json`).
Invariants: every ``st_mode`` that `parse_mode` returns has exactly one file
type bit set, and `parse_mode(stat.filemode(m)) == m` for every mode of a file
type that `stat.filemode` can print; every `RemoteEntry` that `parse_listing`
returns has a name a directory can hold (not empty, ``.`` or ``..``, no ``/``
or NUL), unique in its listing, a size and times that fit the kernel's 64-bit
fields; an entry that breaks this is skipped and logged, and the rest of
the directory is served.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass

from .errors import ProtocolError, RemotePathError, errno_from_traceback

log = logging.getLogger(__name__)

#: The largest value of the kernel's signed 64-bit size and time fields.
INT64_MAX = 2**63 - 1

FILE_TYPES: dict[str, int] = {
    "-": stat.S_IFREG,
    "d": stat.S_IFDIR,
    "l": stat.S_IFLNK,
    "c": stat.S_IFCHR,
    "b": stat.S_IFBLK,
    "p": stat.S_IFIFO,
    "s": stat.S_IFSOCK,
}

# (position in the string, character, bits it sets); s/t also set the x bit.
_PERMISSION_CHARS: tuple[tuple[int, dict[str, int]], ...] = (
    (1, {"r": stat.S_IRUSR}),
    (2, {"w": stat.S_IWUSR}),
    (3, {"x": stat.S_IXUSR, "s": stat.S_IXUSR | stat.S_ISUID, "S": stat.S_ISUID}),
    (4, {"r": stat.S_IRGRP}),
    (5, {"w": stat.S_IWGRP}),
    (6, {"x": stat.S_IXGRP, "s": stat.S_IXGRP | stat.S_ISGID, "S": stat.S_ISGID}),
    (7, {"r": stat.S_IROTH}),
    (8, {"w": stat.S_IWOTH}),
    (9, {"x": stat.S_IXOTH, "t": stat.S_IXOTH | stat.S_ISVTX, "T": stat.S_ISVTX}),
)


def parse_mode(text: str) -> int:
    """``-rwsr-xr-x`` → ``st_mode``; ProtocolError for anything malformed."""
    if len(text) != 10 or text[0] not in FILE_TYPES:
        raise ProtocolError(f"malformed mode string {text!r} in a listing")
    mode = FILE_TYPES[text[0]]
    for position, meanings in _PERMISSION_CHARS:
        char = text[position]
        if char == "-":
            continue
        if char not in meanings:
            raise ProtocolError(f"malformed mode string {text!r} in a listing")
        mode |= meanings[char]
    return mode


def seconds_to_ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    """One entry of a listing. ``name`` uses surrogate escapes for non-UTF-8 bytes."""

    name: str
    mode: int
    size: int
    ctime_ns: int
    mtime_ns: int
    atime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


def parse_listing(body: object, path: str) -> list[RemoteEntry]:
    """Entries of a list response body; RemotePathError when ``errors`` reports one."""
    if not isinstance(body, dict) or "files" not in body:
        raise ProtocolError(f"list response for {path!r} has no 'files' field")
    files_text = body.get("files") or ""
    errors_text = body.get("errors") or ""
    if not files_text.strip():
        if errors_text.strip():
            raise RemotePathError(errno_from_traceback(errors_text), path, errors_text.strip())
        return []
    try:
        raw_entries = json.loads(files_text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"list response for {path!r} has unparsable 'files'") from exc
    if not isinstance(raw_entries, list):
        raise ProtocolError(f"list response for {path!r} has 'files' that is not a list")
    entries: list[RemoteEntry] = []
    names: set[str] = set()
    skipped: list[str] = []
    for raw in raw_entries:
        try:
            entry = parse_entry(raw)
            if entry.name in names:
                raise ValueError(f"a second entry named {entry.name!r}")
        except (KeyError, TypeError, ValueError, ProtocolError) as error:
            skipped.append(f"{_describe(raw)}: {error}")
            continue
        names.add(entry.name)
        entries.append(entry)
    if skipped:
        log.warning(
            "listing of %r: skipped %d entr%s no directory can hold (%s)",
            path,
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""),
        )
    return entries


def parse_entry(raw: object) -> RemoteEntry:
    """One listing entry; ValueError (or KeyError, TypeError) for one no directory can hold."""
    if not isinstance(raw, dict):
        raise TypeError("not an object")
    name = raw["filename"]
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"the name {name!r}")
    size = raw["size"]
    if isinstance(size, bool) or not isinstance(size, int | float) or not 0 <= size <= INT64_MAX:
        raise ValueError(f"the size {size!r}")
    return RemoteEntry(
        name=name,
        mode=parse_mode(raw["mode"]),
        size=int(size),
        ctime_ns=_time_ns(raw["ctime"]),
        mtime_ns=_time_ns(raw["mtime"]),
        atime_ns=_time_ns(raw["atime"]),
    )


def _time_ns(seconds: object) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"the time {seconds!r}")
    nanoseconds = seconds_to_ns(seconds)
    if not -INT64_MAX <= nanoseconds <= INT64_MAX:
        raise ValueError(f"the time {seconds!r}")
    return nanoseconds


def _describe(raw: object) -> str:
    name = raw.get("filename") if isinstance(raw, dict) else None
    return repr(name)[:80] if name is not None else repr(raw)[:80]


def entry_json(name: str, st: os.stat_result) -> dict[str, object]:
    """One listing entry as the agent's list script writes it."""
    return {
        "filename": name,
        "mode": stat.filemode(st.st_mode),
        "size": st.st_size,
        "ctime": st.st_ctime,
        "mtime": st.st_mtime,
        "atime": st.st_atime,
    }
