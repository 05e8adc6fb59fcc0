"""The names baifs makes in the session, and what of them is left to remove.

Everything baifs stages in the session lives in ``/home/work/.baifs-tmp``
(`ROOT`), flat where the upload API writes it and in directories of their
own where scripts write:

    <token>.uN, <token>.uN.000000    a flush's content, uploaded to be placed
    <token>.sh                       a flush's script (one that moves objects)
    <token>/                         what the script makes: parked objects mN, its report
    read-<token>/N                   chunks a ranged read cut for download
    alias-<token>                    a name the API can carry, for one that it cannot
    run-<box>.{req,run,out,err,code,alive}.N   a supervised run's inbox and heartbeat

Two more kinds of name stand outside it: discovery's probe at the root
(`PROBE_PREFIX`), and a copy placed beside its target before it is renamed
over it (`beside`). `RESERVED_AT_ROOT` is every name at the root that
belongs to baifs (this directory and the control files): listings hide them
and the mount refuses to change them.

`Scratch` keeps what is left to remove, by who may remove it:

- *litter*: read parts and aliases once their request is answered, and the
  results of a closed inbox; the next flush or ranged read removes them;
- *results* of the open inbox, already read: its next request removes them,
  or, once the run has ended, any script (they become litter then);
- *leftovers*: directories (and staged uploads) of flushes that failed or
  whose outcome was unknown; such a directory may hold an object a script
  parked there, which a node's origin then names, so only a flush removes
  it, once nothing refers to it any more;
- names *in use* (a ranged read's parts, an alias, while their request
  goes) are none of these until they are done (`using`).

Every path here is bytes relative to /home/work, as everywhere above the
remote seam (`remote`).
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

import trio

from .. import controlfiles
from .model import is_ancestor_or_self, join

ROOT = b".baifs-tmp"
PROBE_PREFIX = b".baifs-probe-"
#: Names at the root of the session the mount never shows nor changes.
RESERVED_AT_ROOT = frozenset({ROOT, *(name.encode() for name in controlfiles.AT_ROOT)})
SCRIPT_SUFFIX = b".sh"
REPORT_NAME = b"report"


def new_token() -> bytes:
    return secrets.token_hex(6).encode()


def flush_dir(token: bytes) -> bytes:
    """Where a flush's script keeps what it makes (parked objects, its report)."""
    return join(ROOT, token)


def staged(token: bytes, name: bytes) -> bytes:
    """Uploaded content waiting for a script: flat in `ROOT`, named by the flush's token."""
    return flush_dir(token) + b"." + name


def flush_script(token: bytes) -> bytes:
    return staged(token, SCRIPT_SUFFIX[1:])


def flush_report(token: bytes) -> bytes:
    return join(flush_dir(token), REPORT_NAME)


def parked(token: bytes, index: int) -> bytes:
    return join(flush_dir(token), f"m{index}".encode())


def beside(target: bytes, token: bytes, index: int) -> bytes:
    """A name beside ``target`` for a copy that is then renamed over it."""
    parent = target.rpartition(b"/")[0]
    return join(parent, b".baifs-" + token + f"-u{index}".encode())


def read_dir(token: bytes) -> bytes:
    return join(ROOT, b"read-" + token)


def alias(token: bytes) -> bytes:
    return join(ROOT, b"alias-" + token)


def box_of(run_id: str) -> bytes:
    """The name of a supervised run's inbox files, from its run id."""
    return b"run-" + run_id[:12].encode("ascii")


def inbox_prefix(box: bytes) -> bytes:
    return join(ROOT, box)


def inbox_file(box: bytes, kind: str, number: int) -> bytes:
    """One file of an inbox: ``kind`` is req, run, out, err or code."""
    return inbox_prefix(box) + f".{kind}.{number}".encode()


def heartbeat(box: bytes) -> bytes:
    return inbox_prefix(box) + b".alive"


def is_probe(name: bytes) -> bool:
    return name.startswith(PROBE_PREFIX)


class Scratch:
    """What of baifs's names in the session is left to remove (see the module docstring)."""

    def __init__(self) -> None:
        self._litter: set[bytes] = set()
        self._results: set[bytes] = set()
        self._leftovers: set[bytes] = set()
        self._in_use: set[bytes] = set()
        self._idle = trio.Event()
        self._idle.set()

    @property
    def has_litter(self) -> bool:
        """Whether a script is owed to the session to remove something (an open inbox's results
        are not: its next request removes them)."""
        return bool(self._litter or self._leftovers or self._in_use)

    def note_litter(self, paths: Iterable[bytes]) -> None:
        self._litter.update(paths)

    def take_litter(self) -> list[bytes]:
        """Litter for the script about to run; what it then does not remove is noted again (a
        ranged read's with `note_litter`, a flush's with `note_leftover`)."""
        litter, self._litter = sorted(self._litter), set()
        return litter

    def note_results(self, paths: Iterable[bytes]) -> None:
        self._results.update(paths)

    def take_results(self) -> list[bytes]:
        """Results of the open inbox already read, for its next request to remove."""
        results, self._results = sorted(self._results), set()
        return results

    def results_are_litter(self) -> None:
        """The inbox closed: its results are any script's to remove now."""
        self._litter.update(self._results)
        self._results.clear()

    def note_leftover(self, paths: Iterable[bytes]) -> None:
        self._leftovers.update(paths)

    def take_leftovers(self, referenced: Collection[bytes]) -> list[bytes]:
        """Leftovers no path in ``referenced`` (the origins of pending nodes) lies under."""
        free = {
            leftover
            for leftover in self._leftovers
            if not any(is_ancestor_or_self(leftover, path) for path in referenced)
        }
        self._leftovers -= free
        return sorted(free)

    @contextmanager
    def using(self, path: bytes) -> Iterator[None]:
        """``path`` is in use while the block runs, and litter afterwards, however it ends."""
        if not self._in_use:
            self._idle = trio.Event()
        self._in_use.add(path)
        try:
            yield
        finally:
            self._in_use.discard(path)
            self._litter.add(path)
            if not self._in_use:
                self._idle.set()

    async def idle(self) -> None:
        """Until no name is in use (what was is litter by then)."""
        await self._idle.wait()
