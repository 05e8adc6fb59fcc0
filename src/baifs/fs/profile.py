"""What the mount knows of the session behind it: its virtual folders and who owns uploads.

A real session is not a plain directory (reference §12):

- *virtual folders* are mounted inside ``/home/work``; the upload API writes
  underneath such a mount point, where nothing in the session sees the file,
  while listings and downloads see the folder;
- the *container user* runs the commands, while uploads (and the
  directories they create) belong to the agent's user; where the two differ,
  runs cannot change what uploads made.

`SessionProfile` holds both facts and answers the planner's two questions:
may content go to its final name by upload (`direct_upload`), and must the
script copy it into place rather than move it (`copy_placement`).

`ProfileKeeper` learns the profile at mount and keeps it:

- the profile the last mount learnt is used from the start (folders seldom
  change during a session), from ``profile.json`` in the state directory;
- *discovery* costs one upload and one batch run: a probe file is uploaded
  to the top of ``/home/work`` (a directory the container user owns, so it
  can remove the probe whoever owns it), and the run reports the container
  user, whether the probe is its own, ``BACKENDAI_PERSISTENT_PATHS`` (agents
  from 26.4.4) and the mount points under ``/home/work`` in
  ``/proc/self/mountinfo`` (every agent), which are used where the variable
  is missing. Where uploads are foreign, the run also makes ``.baifs-tmp``
  the container user's, so that scripts can remove what is staged there;
- discovery runs in the background and never delays the mount; flushes wait
  for it at most `PROFILE_WAIT` seconds. While no profile is known, uploads
  are verified by a listing, and one that did not arrive marks its top
  directory as a folder (`learn_from_vanished`): the flush is then planned
  again, through staging.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import BaifsError
from ..files import replace_atomically
from ..timestamps import moment, stamp
from . import scratch
from .model import is_ancestor_or_self
from .remote import Remote

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
WORK_DIR = b"/home/work/"
#: How long a flush waits for discovery before it goes ahead with what is known.
PROFILE_WAIT = 10.0
DISCOVERY_RETRY_MAX = 300.0


@dataclass
class SessionProfile:
    #: mount points of virtual folders, relative to ``/home/work``.
    folders: tuple[bytes, ...] = ()
    #: whether uploaded files belong to the container user (None: not known).
    uploads_owned: bool | None = None
    container_uid: int | None = None
    #: how the profile was learnt: "discovered", "last mount", "vanished uploads", or "" (not at all).
    source: str = ""
    learnt_at: float | None = None
    #: where the folders came from: "BACKENDAI_PERSISTENT_PATHS" or "mountinfo".
    folders_from: str = ""
    #: whether ``.baifs-tmp`` belongs to the container user (needed where uploads are foreign).
    staging_owned: bool = True
    #: the file system of /home/work as ``df -Pk`` reported it at discovery: KiB total, used, available.
    disk_kib: tuple[int, int, int] | None = None

    @property
    def known(self) -> bool:
        return self.source in ("discovered", "last mount")

    def in_folder(self, path: bytes) -> bool:
        return any(is_ancestor_or_self(folder, path) for folder in self.folders)

    def direct_upload(self, path: bytes, *, overwrite: bool) -> bool:
        """Whether content may be uploaded to its final name.

        Not into a folder (it would land underneath the mount point); where
        uploads are foreign, only over a file that exists (its owner stays).
        """
        if self.in_folder(path):
            return False
        return overwrite or self.uploads_owned is not False

    def copy_placement(self, path: bytes) -> bool:
        """Whether the script must copy staged content into place (a folder, or foreign uploads)."""
        return self.in_folder(path) or self.uploads_owned is False

    @property
    def keeps_staging_dir(self) -> bool:
        """Scripts keep ``.baifs-tmp`` where uploads would recreate it foreign."""
        return self.uploads_owned is False

    def as_dict(self) -> dict[str, Any]:
        return {
            "folders": [os.fsdecode(folder) for folder in self.folders],
            "folders_from": self.folders_from,
            "uploads_owned": self.uploads_owned,
            "container_uid": self.container_uid,
            "staging_owned": self.staging_owned,
            "disk_kib": list(self.disk_kib) if self.disk_kib else None,
            "source": self.source,
            "learnt_at": stamp(self.learnt_at),
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> SessionProfile:
        return cls(
            folders=tuple(os.fsencode(folder) for folder in document.get("folders", [])),
            folders_from=str(document.get("folders_from", "")),
            uploads_owned=document.get("uploads_owned"),
            container_uid=document.get("container_uid"),
            staging_owned=bool(document.get("staging_owned", True)),
            disk_kib=_disk(document.get("disk_kib")),
            source=str(document.get("source", "")),
            learnt_at=moment(document.get("learnt_at")),
        )


def _disk(saved: list[int] | None) -> tuple[int, int, int] | None:
    """A saved ``disk_kib``: total, used, available (an older baifs saved total and available)."""
    if not saved:
        return None
    if len(saved) == 2:
        return (saved[0], saved[0] - saved[1], saved[1])
    total, used, available = saved
    return (total, used, available)


def discovery_script(probe: bytes) -> str:
    """The one run of discovery; it reports ``key value`` lines (see `parse_discovery`)."""
    name = probe.decode("ascii")
    return "\n".join(
        [
            'echo "uid $(id -u)"',
            f"if [ ! -e {name} ]; then owned=unknown; elif [ -O {name} ]; then owned=yes; else owned=no; fi",
            f"rm -f -- {name}",
            'echo "owned $owned"',
            'if [ "$owned" = no ]; then mkdir -p .baifs-tmp 2>/dev/null; '
            "if [ -O .baifs-tmp ]; then echo 'staging ours'; else echo 'staging foreign'; fi; fi",
            'if [ -n "${BACKENDAI_PERSISTENT_PATHS+set}" ]; '
            "then printf 'persistent %s\\n' \"$BACKENDAI_PERSISTENT_PATHS\"; fi",
            "df -Pk . 2>/dev/null | awk 'NR == 2 {print \"disk\", $2, $3, $4}'",
            "while read -r _ _ _ _ point _; do "
            "case $point in /home/work/?*) printf 'mount %s\\n' \"$point\";; esac; "
            "done < /proc/self/mountinfo",
        ]
    )


def _unescape_mountinfo(field: bytes) -> bytes:
    """A mount point as mountinfo writes it: space, tab, newline and backslash as octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), field)


def _relative(absolute: bytes) -> bytes | None:
    if not absolute.startswith(WORK_DIR):
        return None
    relative = absolute[len(WORK_DIR) :].strip(b"/")
    return relative or None


def parse_discovery(output: str) -> SessionProfile:
    """Read the discovery run's report into a profile."""
    profile = SessionProfile(source="discovered", learnt_at=time.time())
    persistent: list[bytes] | None = None
    mounted: list[bytes] = []
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        raw = value.encode("utf-8", "surrogateescape")
        if key == "uid" and value.strip().isdigit():
            profile.container_uid = int(value)
        elif key == "owned":
            profile.uploads_owned = {"yes": True, "no": False}.get(value.strip())
        elif key == "staging":
            profile.staging_owned = value.strip() == "ours"
        elif key == "disk" and all(part.isdigit() for part in value.split()) and len(value.split()) == 3:
            total, used, available = (int(part) for part in value.split())
            profile.disk_kib = (total, used, available)
        elif key == "persistent":
            persistent = [path for part in raw.split(b":") if (path := _relative(part)) is not None]
        elif key == "mount":
            path = _relative(_unescape_mountinfo(raw))
            if path is not None:
                mounted.append(path)
    if persistent is not None:
        profile.folders, profile.folders_from = tuple(sorted(set(persistent))), "BACKENDAI_PERSISTENT_PATHS"
    else:
        profile.folders, profile.folders_from = tuple(sorted(set(mounted))), "mountinfo"
    return profile


class ProfileUnavailable(BaifsError):
    """Discovery could not run (the session is away or refused the probe)."""


@dataclass
class ProfileKeeper:
    """The session's profile: remembered, discovered in the background, learnt from uploads."""

    state: Path
    profile: SessionProfile = field(default_factory=SessionProfile)
    ready: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        try:
            document = json.loads((self.state / PROFILE_FILE).read_text())
            self.profile = SessionProfile.from_dict(document)
            if self.profile.source in ("discovered", "last mount"):
                self.profile.source = "last mount"
                self.ready.set()
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as error:
            log.warning("ignoring the saved session profile (%s); it is discovered again", error)

    async def wait(self, timeout: float = PROFILE_WAIT) -> None:
        """Until a profile is known, or ``timeout`` passed (then the caller goes on without one)."""
        with trio.move_on_after(timeout):
            await self.ready.wait()

    def learn_from_vanished(self, paths: list[bytes]) -> bool:
        """Uploads that did not arrive: their top directories are taken for folders. True if new."""
        tops = {path.split(b"/", 1)[0] for path in paths if b"/" in path}
        new = tops - set(self.profile.folders)
        if not new:
            return False
        log.warning(
            "uploads into %s did not arrive: taking %s for virtual folder(s), where runs place files",
            ", ".join(sorted(os.fsdecode(p) for p in paths)[:3]),
            ", ".join(sorted(os.fsdecode(top) for top in new)),
        )
        self.profile.folders = tuple(sorted(set(self.profile.folders) | new))
        if not self.profile.known:
            self.profile.source = "vanished uploads"
        self._save()
        return True

    async def discover(self, remote: Remote) -> None:
        """One probe upload and one run; the profile they show replaces the one kept."""
        probe = scratch.PROBE_PREFIX + scratch.new_token()
        try:
            await remote.send([(probe, b"")])
        except BaifsError as error:
            raise ProfileUnavailable(f"the probe upload failed ({error})") from error
        output: list[str] = []

        async def collect(stream: str, text: str) -> None:
            if stream == "stdout":
                output.append(text)

        outcome = await remote.run(
            discovery_script(probe), collect, purpose="discovery", queue_timeout=math.inf
        )
        if outcome.exit_code is None:
            raise ProfileUnavailable("the answer of the discovery run was lost")
        discovered = parse_discovery("".join(output))
        if discovered.container_uid is None:
            raise ProfileUnavailable(f"the discovery run said nothing useful (exit {outcome.exit_code})")
        learnt = set(self.profile.folders) if self.profile.source == "vanished uploads" else set()
        if learnt - set(discovered.folders):
            log.info("folders taken from vanished uploads are not folders after all: %s", sorted(learnt))
        self.profile = discovered
        self._save()
        self.ready.set()
        log.info("%s", describe(discovered))
        if discovered.uploads_owned is False and not discovered.staging_owned:
            log.warning(
                "/home/work/.baifs-tmp belongs to another user: what baifs stages there cannot be removed "
                "by runs; remove it as that user (or root) in the session"
            )

    async def keep_discovering(self, remote: Remote) -> None:
        """Discover once, retrying with backoff while the session cannot answer."""
        delay = 5.0
        while True:
            try:
                await self.discover(remote)
                return
            except BaifsError as error:
                log.warning("session profile not known yet (%s); trying again in %.0f s", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, DISCOVERY_RETRY_MAX)

    def _save(self) -> None:
        try:
            document = json.dumps(self.profile.as_dict(), indent=2) + "\n"
            replace_atomically(self.state / PROFILE_FILE, document.encode())
        except OSError as error:
            log.warning("cannot save the session profile (%s); the next mount discovers it again", error)


def describe(profile: SessionProfile) -> str:
    """One line for logs and ``baifs status``."""
    if not profile.source:
        return "session profile: not known yet"
    folders = ", ".join(os.fsdecode(f) for f in profile.folders) or "none"
    owned = {True: "yes", False: "no", None: "unknown"}[profile.uploads_owned]
    return (
        f"session profile ({profile.source}): virtual folders: {folders}; "
        f"uploads owned by the container user (uid {profile.container_uid}): {owned}"
    )
