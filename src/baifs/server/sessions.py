"""The local server's sessions: creation by name, lookup, termination, persistence.

Owns the data root layout::

    <data root>/sessions.json          names, ids, images, creation times
    <data root>/sessions/<uuid>/work   a session's /home/work

Sessions survive a restart of the server (they come back RUNNING with their
files). Destroying a session deletes its work directory, as terminating a
real session deletes its scratch directory. A session is addressable by its
UUID or its name.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..files import replace_atomically
from .compat import Compat
from .kernel import Kernel
from .problems import Problem, bad_request, no_such_session
from .sandbox import Sandbox
from .workdir import WorkDir

SESSION_NAME = re.compile(r"^(?=.{4,64}$)\w[\w.-]*\w$", re.ASCII)

log = logging.getLogger(__name__)


@dataclass
class ServedSession:
    id: str
    name: str
    image: str
    created_at: float
    work: WorkDir
    kernel: Kernel
    #: when the session is RUNNING (`--start-delay`: the image is pulled, then the kernel made).
    running_at: float = 0.0
    running: trio.Event = field(default_factory=trio.Event)
    #: set while a destroyed session is TERMINATING (``terminating-window``), until it is gone.
    terminating: bool = False

    @property
    def status(self) -> str:
        """PULLING for the first half of the start, PREPARING for the second, then RUNNING."""
        if self.terminating:
            return "TERMINATING"
        left = self.running_at - time.time()
        if left <= 0:
            return "RUNNING"
        return "PULLING" if left > (self.running_at - self.created_at) / 2 else "PREPARING"

    async def started(self, patience: float | None = None) -> bool:
        """Wait until RUNNING (or ``patience`` seconds); whether it is."""
        with trio.move_on_after(patience if patience else math.inf):
            await self.running.wait()
        return self.running.is_set()

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "image": self.image, "created_at": self.created_at}

    def info(self) -> dict[str, Any]:
        """The flat info object of ``GET /session/{id}`` (reference §6)."""
        created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.created_at))
        return {
            "age": int((time.time() - self.created_at) * 1000),
            "domainName": "default",
            "groupId": "00000000-0000-0000-0000-000000000000",
            "userId": "00000000-0000-0000-0000-000000000000",
            "lang": self.image,
            "image": self.image,
            "architecture": "x86_64",
            "registry": "local",
            "tag": None,
            "containerId": self.id,
            "occupiedSlots": {},
            "occupyingSlots": {},
            "requestedSlots": {},
            "occupiedShares": {},
            "environ": {},
            "resourceOpts": {},
            "status": self.status,
            "statusInfo": "",
            "statusData": {},
            "creationTime": created,
            "terminationTime": None,
            "numQueriesExecuted": self.kernel.num_queries,
            "lastStat": {},
            "idleChecks": {},
        }


#: How long a destroyed session stays TERMINATING with ``terminating-window`` (its containers
#: are being removed; the agents answer 500 meanwhile).
TERMINATING_SECONDS = 3.0


class SessionRegistry:
    def __init__(self, data_root: Path, sandbox: Sandbox, compat: Compat, start_delay: float = 0.0) -> None:
        self.data_root = data_root
        self.sandbox = sandbox
        self.compat = compat
        #: how long a new session takes to be RUNNING (pulling its image, making its kernel).
        self.start_delay = start_delay
        self._sessions: dict[str, ServedSession] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def _index(self) -> Path:
        return self.data_root / "sessions.json"

    async def start(self, nursery: trio.Nursery) -> None:
        """Bring back the sessions of an earlier run of the server."""
        self._nursery = nursery
        self.data_root.mkdir(parents=True, exist_ok=True)
        if self._index.exists():
            for record in json.loads(self._index.read_text()):
                await self._open(record["id"], record["name"], record["image"], record["created_at"])

    def _save(self) -> None:
        records = [session.record() for session in self._sessions.values()]
        replace_atomically(self._index, json.dumps(records, indent=2).encode())

    async def _open(
        self, session_id: str, name: str, image: str, created_at: float, delay: float = 0.0
    ) -> ServedSession:
        assert self._nursery is not None
        work = WorkDir(self.data_root / "sessions" / session_id / "work", self.sandbox.vfolders)
        kernel = Kernel(
            work.root,
            self.sandbox,
            detach_at_phase_end=self.compat.phase_frame_loss,
            queued_run_wedge=self.compat.queued_run_wedge,
        )
        await self._nursery.start(kernel.serve_tasks)
        session = ServedSession(session_id, name, image, created_at, work, kernel, created_at + delay)
        self._sessions[session_id] = session
        self._nursery.start_soon(self._run_at, session)
        return session

    @staticmethod
    async def _run_at(session: ServedSession) -> None:
        await trio.sleep(max(0.0, session.running_at - time.time()))
        session.running.set()

    def find(self, id_or_name: str) -> ServedSession | None:
        if id_or_name in self._sessions:
            return self._sessions[id_or_name]
        return next((s for s in self._sessions.values() if s.name == id_or_name), None)

    def get(self, id_or_name: str) -> ServedSession:
        session = self.find(id_or_name)
        if session is None:
            raise no_such_session()
        return session

    async def get_or_create(self, name: str, image: str) -> tuple[ServedSession, bool]:
        if not SESSION_NAME.match(name):
            raise bad_request(f"invalid session name {name!r}: 4-64 word characters, '.' or '-'")
        existing = self.find(name)
        if existing is not None:
            if existing.image != image:
                raise Problem(
                    400,
                    "session-already-exists",
                    "The session already exists but you requested different image.",
                )
            return existing, False
        session = await self._open(str(uuid.uuid4()), name, image, time.time(), self.start_delay)
        self._save()
        return session, True

    def destroy(self, id_or_name: str) -> None:
        """End a session: gone at once, or TERMINATING for `TERMINATING_SECONDS` first."""
        session = self.get(id_or_name)
        session.kernel.terminate()
        if self.compat.terminating_window and not session.terminating:
            session.terminating = True
            assert self._nursery is not None
            self._nursery.start_soon(self._remove_later, session)
            return
        self._remove(session)

    async def _remove_later(self, session: ServedSession) -> None:
        await trio.sleep(TERMINATING_SECONDS)
        try:
            self._remove(session)
        except OSError as error:  # a background task: a full disk must not end the server
            log.warning("session %s: could not save the session index (%s)", session.id, error)

    def _remove(self, session: ServedSession) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        self._save()
        shutil.rmtree(session.work.root.parent, ignore_errors=True)

    def all(self) -> list[ServedSession]:
        return list(self._sessions.values())
