"""How `baifs serve` starts a session's batch commands: confined like a container.

A command runs in bubblewrap and sees:

- its session's work directory at ``/home/work`` (the cwd and ``HOME``), and
  the virtual folders mounted inside it (`workdir.VFolder`);
- the system read-only: ``/usr`` and ``/etc`` (its secrets, such as
  ``/etc/shadow`` and ``/etc/ssh``, masked), ``/bin``, ``/lib``... as the
  host has them; ``/dev`` and ``/proc`` of its own, a private ``/tmp``;
- nothing else: not the server's data directory (other sessions, the
  keypair), not ``/root`` or ``/home``, not the server's processes: it has its
  own PID namespace (``/proc`` shows only its own), IPC and UTS namespaces,
  a new session (no terminal to inject into), no capabilities, and it dies
  with the server.

It runs as the *container user* (``--container-uid``, default the server's own
uid, like the agent's ``kernel-uid``), switched to with ``setpriv`` inside the
sandbox (no new privileges, no capabilities, no supplementary groups), while
uploads are written by the server itself: so a node whose agent runs as root
with another kernel uid can be reproduced (reference §12).

Where bubblewrap does not work, `Sandbox.create` refuses to run commands at
all unless ``--unsafe-no-sandbox`` is given; then commands run directly on
this host, in the work directory, with the server's privileges.

`Command.start` forks from the event loop's own thread. ``--die-with-parent``
is a parent-death signal, which Linux sends when the *thread* that forked
exits: a command started from a worker thread (as ``trio.run_process`` does)
would be killed when that idle thread retires, ten seconds later. The loop's
thread lives as long as the server, so a command dies with the server and
not before.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trio

from ..errors import BaifsError
from .workdir import CONTAINER_WORK_DIR, VFolder

log = logging.getLogger(__name__)

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Read-only system directories of the host, bound where they exist.
SYSTEM_DIRECTORIES = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Host secrets under /etc that a run must not read (files hidden by /dev/null, directories by a tmpfs).
MASKED_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers")
MASKED_DIRECTORIES = ("/etc/ssh", "/etc/sudoers.d", "/etc/ssl/private")
SWITCH_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")


class SandboxUnavailable(BaifsError):
    """Batch commands cannot be confined here, and running them unconfined was not asked for."""


class FolderUnwritable(BaifsError):
    """A virtual folder's host directory is not writable by the container user, as a real one is."""


@dataclass(frozen=True)
class ContainerUser:
    uid: int
    gid: int

    @classmethod
    def parse(cls, text: str) -> ContainerUser:
        """``UID`` or ``UID:GID`` (the group defaults to the uid, like the entrypoint's)."""
        uid, _, gid = text.partition(":")
        try:
            return cls(int(uid), int(gid or uid))
        except ValueError:
            raise ValueError(f"a container user is UID or UID:GID, not {text!r}") from None

    @classmethod
    def server(cls) -> ContainerUser:
        return cls(os.getuid(), os.getgid())


def writable_by(info: os.stat_result, user: ContainerUser) -> bool:
    """Whether ``user`` (no supplementary groups, as runs have none) may create entries in a directory."""
    if user.uid == 0:
        return True
    if info.st_uid == user.uid:
        return bool(info.st_mode & 0o300 == 0o300)
    if info.st_gid == user.gid:
        return bool(info.st_mode & 0o030 == 0o030)
    return bool(info.st_mode & 0o003 == 0o003)


def prepare_folder(folder: VFolder, user: ContainerUser) -> None:
    """A folder's host directory as a real one is: the container user's to write in.

    A missing directory is made and given to the container user (logged); an
    existing one it cannot write in is refused with the reason (its owner is
    not changed behind the user's back).
    """
    try:
        info = folder.host_dir.stat()
    except FileNotFoundError:
        folder.host_dir.mkdir(parents=True, mode=0o755)
        if os.getuid() == 0:
            os.chown(folder.host_dir, user.uid, user.gid)
        log.warning(
            "made %s for virtual folder %s (it did not exist), owned by uid %d",
            folder.host_dir,
            folder.name,
            user.uid,
        )
        return
    if not folder.host_dir.is_dir():
        raise FolderUnwritable(f"virtual folder {folder.name}: {folder.host_dir} is not a directory")
    if not writable_by(info, user):
        raise FolderUnwritable(
            f"virtual folder {folder.name}: runs (uid {user.uid}) cannot write in {folder.host_dir} "
            f"(owner uid {info.st_uid}, group {info.st_gid}, mode {info.st_mode & 0o7777:04o}), and a real "
            f"folder is the container user's; give it to them (chown {user.uid}:{user.gid} "
            f"{folder.host_dir}) or name a directory that does not exist yet (baifs serve makes it)"
        )


@dataclass(frozen=True)
class Launch:
    """How to start one command: argv, working directory and environment."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


class Command:
    """A started command: its output streams, and its exit status once it ends."""

    def __init__(self, launch: Launch) -> None:
        self._popen = subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self._popen.pid
        self.streams = {
            "stdout": self._stream(self._popen.stdout),
            "stderr": self._stream(self._popen.stderr),
        }
        self._pidfd = os.pidfd_open(self.pid)

    @staticmethod
    def _stream(pipe: IO[bytes] | None) -> trio.lowlevel.FdStream:
        assert pipe is not None
        try:
            return trio.lowlevel.FdStream(os.dup(pipe.fileno()))
        finally:
            pipe.close()

    @property
    def running(self) -> bool:
        return self._popen.poll() is None

    def signal_group(self, number: int) -> None:
        """Signal the command's process group, if it still runs."""
        if self.running:
            os.killpg(self.pid, number)

    async def wait(self) -> int:
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
            return self._popen.wait()
        finally:
            if self._popen.returncode is not None:
                os.close(self._pidfd)
                self._pidfd = -1

    async def kill(self) -> None:
        """Kill the whole group and reap the command, whatever cancels the caller."""
        self.signal_group(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            if self._pidfd >= 0:
                await self.wait()


class Sandbox:
    def __init__(
        self,
        *,
        confined: bool,
        user: ContainerUser | None = None,
        vfolders: tuple[VFolder, ...] = (),
        persistent_paths: bool = True,
    ) -> None:
        self.confined = confined
        #: bubblewrap and setpriv as found on the server's PATH (a command's PATH is the container's).
        self.bwrap = shutil.which("bwrap")
        self.setpriv = shutil.which("setpriv") or "setpriv"
        self.user = user or ContainerUser.server()
        self.vfolders = vfolders
        self.persistent_paths = persistent_paths

    @classmethod
    def create(
        cls,
        *,
        unsafe_no_sandbox: bool = False,
        user: ContainerUser | None = None,
        vfolders: tuple[VFolder, ...] = (),
        persistent_paths: bool = True,
    ) -> Sandbox:
        """The sandbox this host can give; `SandboxUnavailable` rather than none, unless told."""
        user = user or ContainerUser.server()
        if user != ContainerUser.server() and os.getuid() != 0:
            raise SandboxUnavailable(
                "--container-uid needs baifs serve to run as root (to switch to that user)"
            )
        for folder in vfolders:
            prepare_folder(folder, user)
        sandbox = cls(confined=True, user=user, vfolders=vfolders, persistent_paths=persistent_paths)
        problem = sandbox.probe()
        if problem is None:
            return sandbox
        if not unsafe_no_sandbox:
            raise SandboxUnavailable(
                f"bubblewrap cannot confine batch commands here ({problem}); install the 'bubblewrap' "
                "package, or start baifs serve with --unsafe-no-sandbox to run them directly on this host, "
                "with the server's privileges and access to all its files"
            )
        log.warning("--unsafe-no-sandbox: batch commands run directly on this host (%s)", problem)
        return cls(confined=False, user=user, vfolders=vfolders, persistent_paths=persistent_paths)

    def probe(self) -> str | None:
        """Why confined commands cannot run here, or None when they can."""
        if self.bwrap is None:
            return "bwrap is not installed"
        launch = self.launch(Path("/"), "true", probe=True)
        try:
            probe = subprocess.run(launch.argv, env=launch.env, capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as error:
            return str(error)
        if probe.returncode != 0:
            return probe.stderr.decode(errors="replace").strip() or f"exit status {probe.returncode}"
        return None

    def environment(self, *, batch_mode: bool) -> dict[str, str]:
        home = CONTAINER_WORK_DIR
        environment = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": home, "TERM": "xterm"}
        if batch_mode:
            environment["_BACKEND_BATCH_MODE"] = "1"
        if self.vfolders and self.persistent_paths:
            environment["BACKENDAI_PERSISTENT_PATHS"] = ":".join(f.container_path for f in self.vfolders)
        return environment

    def launch(
        self, work_dir: Path, shell_command: str, *, batch_mode: bool = False, probe: bool = False
    ) -> Launch:
        environment = self.environment(batch_mode=batch_mode)
        switch = self._switch_user()
        if not self.confined:
            environment["HOME"] = str(work_dir)
            return Launch([*switch, "/bin/sh", "-c", shell_command], str(work_dir), environment)
        argv = [self.bwrap or "bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
        argv += ["--unshare-uts", "--hostname", "session", "--cap-drop", "ALL"]
        for capability in SWITCH_CAPABILITIES if switch else ():
            argv += ["--cap-add", capability]
        for directory in SYSTEM_DIRECTORIES:
            if os.path.islink(directory):
                argv += ["--symlink", os.readlink(directory), directory]
            elif os.path.isdir(directory):
                argv += ["--ro-bind", directory, directory]
        argv += [
            arg for path in MASKED_FILES if os.path.isfile(path) for arg in ("--ro-bind", "/dev/null", path)
        ]
        argv += [arg for path in MASKED_DIRECTORIES if os.path.isdir(path) for arg in ("--tmpfs", path)]
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", "/home"]
        if not probe:
            argv += ["--bind", str(work_dir), CONTAINER_WORK_DIR]
            for folder in self.vfolders:
                argv += ["--bind", str(folder.host_dir), folder.container_path]
            argv += ["--chdir", CONTAINER_WORK_DIR]
        argv += ["--", *switch, "/bin/sh", "-c", shell_command]
        return Launch(argv, "/", environment)

    def _switch_user(self) -> list[str]:
        """The ``setpriv`` prefix that turns the command into the container user, when it is not us."""
        if self.user == ContainerUser.server():
            return []
        return [
            self.setpriv,
            f"--reuid={self.user.uid}",
            f"--regid={self.user.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]

    def prepare(self, work_dir: Path) -> None:
        """Give the work directory to the container user, as the agent chowns the scratch directory."""
        if self.user != ContainerUser.server():
            os.chown(work_dir, self.user.uid, self.user.gid)
