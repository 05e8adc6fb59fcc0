"""A session's state directory on this machine: where it is, whose it is, and the run marker.

Layout of ``<state root>/mounts/<key>/`` (the key hashes the session's
identity, `session_identity`: its container id, or where the session shows
none, its name at the normalised endpoint; never how the endpoint is
spelled, so a restarted local server on a new port, a trailing slash or
``localhost`` for ``127.0.0.1`` find the same state):

    session.json     who this state belongs to: endpoint, session name and id,
                     the last mountpoint and mount time (for ``baifs salvage``)
    lock             held by the mount that serves the session (one per machine, `locks`)
    journal.jsonl    the pending changes (`journal`)
    staging/         their content (`content`)
    current-run      the id of a batch run not yet concluded (`RunMarker`)
    profile.json     what discovery learnt of the session (`profile`)
    runs/            the records of runs started from the mount (`runs`)

The parts that live in it are built by the composition root (`core`).

Invariants: the run marker is written (to a temporary name, synced, renamed)
before a run's first request and removed only once the run it names is
concluded (the conclusion of an earlier run leaves a later run's marker); a
marker that is empty or damaged is ignored with a warning; a marker that
cannot be written stops the run before anything is sent (`LocalStateError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from ..api.errors import LocalStateError
from ..errors import BaifsError
from ..files import replace_atomically

log = logging.getLogger(__name__)

CURRENT_RUN_FILE = "current-run"
IDENTITY_FILE = "session.json"
#: What a run id read back from the marker must look like (the executor makes 32 hex digits).
RUN_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def state_root() -> Path:
    from .. import config

    return config.state_dir() / "mounts"


def state_key(session_id: str) -> str:
    """The name of a session's state directory, from `session_identity`."""
    return hashlib.sha256(f"session\0{session_id}".encode()).hexdigest()[:16]


def normalised_endpoint(endpoint: str) -> str:
    """An endpoint as one text however it is written: scheme and host in lower case, the
    default port dropped, no trailing slash, loopback names as ``127.0.0.1``."""
    parts = urlsplit(endpoint.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if host in ("localhost", "::1", "ip6-localhost"):
        host = "127.0.0.1"
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(scheme)
    address = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{address}{parts.path.rstrip('/')}"


def session_identity(info: dict[str, Any], name: str, endpoint: str) -> str:
    """Who a session is, as the session itself shows it: its container id where its information
    gives one, else its name at the (normalised) endpoint."""
    container = info.get("containerId")
    if isinstance(container, str) and container.strip():
        return container.strip()
    return f"{normalised_endpoint(endpoint)}#{name}"


class StateOfAnother(BaifsError):
    """A state directory at a session's key records another session (it is left alone)."""


def session_state(identity: StateIdentity, root: Path | None = None) -> Path:
    """The session's state directory on this machine, found by its identity.

    A directory an older baifs keyed by the endpoint's spelling is taken
    over (renamed) when its ``session.json`` names this session and the
    directory of the new key does not exist; of several, the most recently
    mounted, and the others stay (``baifs salvage list`` shows them).
    """
    root = root or state_root()
    state = root / state_key(identity.session_id)
    recorded = StateIdentity.load(state)
    if recorded is not None and recorded.session_id != identity.session_id:
        raise StateOfAnother(
            f"{state} records session {recorded.session_id}, not {identity.session_id}; it was left alone"
        )
    if state.exists():
        return state
    earlier = [
        (found.mounted_at, directory)
        for directory in state_directories(root)
        if (found := StateIdentity.load(directory)) is not None and found.session_id == identity.session_id
    ]
    if earlier:
        _, directory = max(earlier)
        try:
            directory.rename(state)
        except OSError as error:
            log.warning("could not take over the earlier state %s (%s); it stays there", directory, error)
        else:
            log.info(
                "state of session %s taken over from %s (keyed by endpoint)", identity.session_id, directory
            )
    return state


class RunMarker:
    """The id of the batch run in progress, kept in the state directory for a successor."""

    def __init__(self, state: Path) -> None:
        self.path = state / CURRENT_RUN_FILE

    async def started(self, run_id: str) -> None:
        await self._change(self._write, run_id)

    async def concluded(self, run_id: str) -> None:
        await self._change(self._remove, run_id)

    async def _change(self, change: Callable[[str], None], run_id: str) -> None:
        try:
            await trio.to_thread.run_sync(change, run_id)
        except OSError as error:
            raise LocalStateError(error, f"the run marker {self.path}") from error

    def _remove(self, run_id: str) -> None:
        if self.load() == run_id:
            self.path.unlink(missing_ok=True)

    def _write(self, run_id: str) -> None:
        replace_atomically(self.path, run_id.encode() + b"\n", fsync=True)

    def load(self) -> str | None:
        """The run an earlier process left unconcluded, if the marker names one."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("cannot read the run marker %s (%s); ignoring it", self.path, error)
            return None
        if not RUN_ID.match(text):
            log.warning("the run marker %s is empty or damaged (%r); ignoring it", self.path, text[:80])
            return None
        return text


@dataclass(frozen=True)
class StateIdentity:
    """Whose state a directory holds (``session.json``)."""

    endpoint: str
    session: str
    session_id: str
    mountpoint: str = ""
    mounted_at: float = 0.0

    def save(self, directory: Path) -> None:
        try:
            document = json.dumps(self.__dict__, indent=2) + "\n"
            replace_atomically(directory / IDENTITY_FILE, document.encode())
        except OSError as error:
            log.warning("cannot record this mount in %s (%s)", directory, error)

    @classmethod
    def load(cls, directory: Path) -> StateIdentity | None:
        try:
            document: dict[str, Any] = json.loads((directory / IDENTITY_FILE).read_text())
            return cls(**{key: document[key] for key in cls.__dataclass_fields__ if key in document})
        except (OSError, ValueError, TypeError):
            return None


def state_directories(root: Path | None = None) -> Iterator[Path]:
    root = root or state_root()
    if root.is_dir():
        yield from sorted(path for path in root.iterdir() if path.is_dir())
