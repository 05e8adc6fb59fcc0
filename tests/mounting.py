"""Real mounts for the tests: ``baifs mount --foreground`` in a subprocess against `baifs serve`.

Every mount gets its own state, cache and log directories (through the XDG
variables), a fresh session on the shared server, and is always unmounted
(``fusermount3 -u``, then ``-uz``) and its daemon stopped, whatever the test
did to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import IMAGE, LocalServer, signed_request, stop_process, unique_session_name

from baifs import controlfiles

FUSE_AVAILABLE = os.path.exists("/dev/fuse") and any(
    os.access(os.path.join(directory, "fusermount3"), os.X_OK)
    for directory in os.environ.get("PATH", "").split(os.pathsep)
)
needs_fuse = pytest.mark.skipif(not FUSE_AVAILABLE, reason="needs /dev/fuse and fusermount3")


def create_session(server: LocalServer) -> str:
    body = json.dumps({"name": unique_session_name(), "image": IMAGE}).encode()
    version = signed_request(server, "GET", "/", sign=False).json()["version"]  # an emulated release's
    response = signed_request(server, "POST", "/session", content=body, version=version)
    response.raise_for_status()
    return str(response.json()["sessionId"])


def baifs_environment(server: LocalServer, home: Path, endpoint: str | None = None) -> dict[str, str]:
    """The environment of a baifs command: the server's keys (reached at ``endpoint``), private XDG dirs."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "SORNA_", "XDG_"))}
    environment.update(
        BACKEND_ENDPOINT=endpoint or server.endpoint,
        BACKEND_ACCESS_KEY=server.credentials.access_key,
        BACKEND_SECRET_KEY=server.credentials.secret_key,
        XDG_STATE_HOME=str(home / "state"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
    )
    return environment


def baifs(
    *args: str, env: dict[str, str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run(
        [sys.executable, "-m", "baifs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert finished.returncode == 0, (
            f"baifs {' '.join(args)} failed:\n{finished.stdout}\n{finished.stderr}"
        )
    return finished


def baifs_run(
    m: Mount, *words: str, build: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "baifs", "run", str(m.path)]
    if build:
        argv += ["--build", build]
    return subprocess.run([*argv, "--", *words], env=m.env, capture_output=True, timeout=timeout)


def mounted(path: Path) -> bool:
    """Whether something is mounted at ``path`` (a dead FUSE mount included, which ismount misses)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1].replace("\\040", " ") == target for line in mounts)


def force_unmount(path: Path) -> None:
    for flags in ("-u", "-uz"):
        if not mounted(path):
            return
        subprocess.run(["fusermount3", flags, str(path)], capture_output=True)
        time.sleep(0.1)


@dataclass
class Mount:
    path: Path
    server: LocalServer
    session_id: str
    home: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def work(self) -> Path:
        """The session's /home/work on the server's disk."""
        return self.server.work_dir(self.session_id)

    @property
    def log(self) -> Path:
        return self.home / "mount.log"

    def start(self, *extra: str, timeout: float = 30, settle: bool = True) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "baifs", "mount", self.session_id, str(self.path), "--foreground"]
        argv += ["--log-level", "debug", "--log-file", str(self.log), *(extra or self.extra)]
        self.process = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(self.path) and (self.path / controlfiles.STATUS).exists():
                if settle:
                    self._settle(deadline)
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the mount did not come up:\n{self.log_text()}")

    def _settle(self, deadline: float) -> None:
        """Let discovery of the session's profile end, so that request counts start from a quiet mount."""
        while time.monotonic() < deadline and not self.status()["profile"]["source"]:
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def status(self) -> dict[str, Any]:
        return json.loads((self.path / controlfiles.STATUS).read_text())

    def sync(self) -> None:
        """Everything written is on the session when this returns (fsync of the root: fsyncdir)."""
        descriptor = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def counters(self) -> dict[str, int]:
        return self.server.counters()

    def unmount(self, timeout: float = 120) -> int:
        """Unmount as a user would (``fusermount3 -u``); the daemon's exit status once it finished."""
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        assert self.process is not None
        status = self.process.wait(timeout)
        self.process = None
        return status

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """``kill -9`` the daemon, then clear the dead mount."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.process = None
        force_unmount(self.path)

    def stop(self) -> None:
        force_unmount(self.path)
        if self.process is not None:
            stop_process(self.process, 60)
            self.process = None
        force_unmount(self.path)


def run_status(m: Mount, number: int | str) -> dict:
    return json.loads((m.path / controlfiles.RUNS / str(number) / "status").read_text())


def wait_done(m: Mount, number: int | str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = run_status(m, number)
        if current["state"] in ("finished", "failed"):
            return current
        time.sleep(0.05)
    raise AssertionError(f"run {number} did not end: {current}")


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def mount_for(server: LocalServer, directory: Path, session_id: str | None = None) -> Mount:
    """A mount (not started) of a session (a new one by default) at ``directory/mnt``, with its own home."""
    home = directory / "home"
    home.mkdir(exist_ok=True)
    session_id = session_id or create_session(server)
    return Mount(directory / "mnt", server, session_id, home, baifs_environment(server, home))


def make_tree(source: Path, files: int = 200, size: int = 10 * 1024) -> Path:
    """``files`` files of ``size`` random bytes in five directories under ``source``."""
    for index in range(files):
        directory = source / f"dir{index % 5}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"file{index:03d}.dat").write_bytes(os.urandom(size))
    return source


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Requests per endpoint between two readings of the server's counters (not counting the readings)."""
    keys = (set(before) | set(after)) - {"counters"}
    return {
        key: after.get(key, 0) - before.get(key, 0) for key in keys if after.get(key, 0) != before.get(key, 0)
    }


def tree(root: Path, *, modes: bool = False) -> dict[str, Any]:
    """Files (content), directories and symlinks under ``root``, by relative path."""
    found: dict[str, Any] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != ".baifs-tmp" or directory != str(root)]
        for name in subdirs + files:
            full = Path(directory) / name
            relative = str(full.relative_to(root))
            if full.is_symlink():
                found[relative] = ("link", os.readlink(full))
            elif full.is_dir():
                found[relative] = ("dir", oct(full.stat().st_mode & 0o7777)) if modes else ("dir",)
            else:
                value = full.read_bytes()
                found[relative] = (
                    ("file", oct(full.stat().st_mode & 0o7777), value) if modes else ("file", value)
                )
    return found
