"""The three targets of the benchmarks, and the servers and proxies behind them.

- `Native`: a plain directory on the local disk, the physical floor.
- `Sshfs`: sshfs mounting a directory from a throw-away sshd on 127.0.0.1
  (its own host key, user key and config), behind a delaying proxy.
- `Baifs`: a baifs mount (``--foreground``, so its PID and peak RSS are
  known) of a session of a `baifs serve`, behind a delaying proxy.

Every process started here is remembered in a `Processes` registry and
stopped by PID on the way out, and every mount is unmounted
(``fusermount3 -u``, then ``-uz``), whatever happened in between.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from baifs.api import signing

#: What the harnesses need on the machine (bench/run installs it).
REQUIRED = ("sshfs", "vim", "git", "fusermount3", "/usr/sbin/sshd", "ssh-keygen")
BENCH_ACCESS_KEY = "AKIABENCHMARK0000001"
BENCH_SECRET_KEY = "benchmark-secret-key-not-for-production"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every harness that compares the three targets takes."""
    parser.add_argument(
        "--latencies",
        type=lambda text: [float(value) for value in text.split(",")],
        default="0,20",
        help="round trips to emulate, in ms (default: 0,20)",
    )
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/baifs-bench"), help="scratch directory")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")


def require_prerequisites() -> None:
    """Exit with a message (status 2) when the harness cannot run here."""
    reason = None
    if os.geteuid() != 0:
        reason = "run as root (it mounts, starts sshd and drops the page cache)"
    elif missing := [tool for tool in REQUIRED if shutil.which(tool) is None and not Path(tool).exists()]:
        reason = f"missing {', '.join(missing)}; bench/run installs them"
    if reason is not None:
        print(f"bench: {reason}", file=sys.stderr)
        raise SystemExit(2)


class Processes:
    """Every process the harness started, stopped by PID on exit (last started first)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        handle = open(log, "wb")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, **kwargs)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            stop(process)
        self.started.clear()


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_line(
    log: Path, pattern: str, process: subprocess.Popen[bytes], timeout: float = 30
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} did not start; its log:\n{log.read_text(errors='replace')}")


def unmount(path: Path) -> None:
    for flags in ("-u", "-uz"):
        if not os.path.ismount(path):
            return
        subprocess.run(["fusermount3", flags, str(path)], capture_output=True)
        time.sleep(0.2)


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class DelayProxy:
    """`bench.proxy` in front of ``target_port``; ``port`` is where clients connect."""

    port: int

    @classmethod
    def start(cls, processes: Processes, work: Path, target_port: int, delay_ms: float) -> DelayProxy:
        if delay_ms <= 0:
            return cls(target_port)
        log = work / f"proxy-{target_port}-{delay_ms:g}.log"
        argv = [sys.executable, "-m", "bench.proxy", "--target", f"127.0.0.1:{target_port}"]
        process = processes.start([*argv, "--delay-ms", str(delay_ms / 2)], log)
        return cls(int(wait_for_line(log, r"listening on [\d.]+:(\d+)", process).group(1)))


@dataclass
class Sshd:
    """A throw-away sshd on 127.0.0.1 serving SFTP for root, with generated keys."""

    port: int
    user_key: Path
    remote_root: Path

    @classmethod
    def start(cls, processes: Processes, work: Path) -> Sshd:
        keys = work / "ssh"
        keys.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "user_key"):
            if not (keys / name).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True
                )
        shutil.copy(keys / "user_key.pub", keys / "authorized_keys")
        port = free_port()
        config = keys / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host_key'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {keys / 'sshd.pid'}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        process = processes.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], work / "sshd.log")
        deadline = time.monotonic() + 20
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start:\n{(work / 'sshd.log').read_text()}")
            time.sleep(0.05)
        remote_root = work / "sshfs-remote"
        remote_root.mkdir(exist_ok=True)
        return cls(port, keys / "user_key", remote_root)


#: The virtual folder every benchmark session has, at /home/work/data.
FOLDER = "data"


@dataclass
class BaifsServer:
    """`baifs serve` with its data directory and one session (with a virtual folder) for the benchmarks."""

    port: int
    data_dir: Path
    #: the host directory of the session's virtual folder ``FOLDER``.
    folder: Path
    session_id: str = ""

    @classmethod
    def start(cls, processes: Processes, work: Path) -> BaifsServer:
        data_dir = work / "serve-data"
        log = work / "serve.log"
        environment = {
            **os.environ,
            "BACKEND_ACCESS_KEY": BENCH_ACCESS_KEY,
            "BACKEND_SECRET_KEY": BENCH_SECRET_KEY,
        }
        folder = work / "folder-data"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        argv = [sys.executable, "-m", "baifs", "serve", "--port", "0", "--data-dir", str(data_dir)]
        argv += ["--vfolder", f"{FOLDER}={folder}"]
        process = processes.start(argv, log, env=environment)
        port = int(wait_for_line(log, r"listening on http://127\.0\.0\.1:(\d+)", process).group(1))
        server = cls(port, data_dir, folder)
        answer = server.request("POST", "/session", {"name": f"bench-{os.getpid()}", "image": "bench"})
        server.session_id = answer["sessionId"]
        return server

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "sessions" / self.session_id / "work"

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, port: int | None = None
    ) -> Any:
        """A signed request (to the server, or through a proxy at ``port``)."""
        endpoint = f"http://127.0.0.1:{port or self.port}"
        with httpx.Client(timeout=60) as http:
            content = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if content is not None else {}
            request = http.build_request(method, endpoint + path, content=content, headers=headers)
            date = signing.format_date(datetime.now(UTC))
            request.headers["Date"] = date
            request.headers["X-BackendAI-Version"] = signing.LATEST_VERSION
            signature = signing.signature(
                method=method,
                path_with_query=request.url.raw_path.decode(),
                date_header=date,
                host=request.url.netloc.decode(),
                media_type=signing.media_type_of(request.headers.get("content-type")),
                version=signing.LATEST_VERSION,
                secret_key=BENCH_SECRET_KEY,
            )
            request.headers["Authorization"] = signing.authorization_header(BENCH_ACCESS_KEY, signature)
            response = http.send(request)
            response.raise_for_status()
            return response.json() if response.content else None

    def counters(self) -> dict[str, int]:
        document = self.request("GET", "/_baifs/counters")
        return {**document["requests"], "batch_runs": document["batch_runs"]}


@dataclass
class Target:
    """Where a workload runs; ``root`` is the directory it works in."""

    name: str
    root: Path
    remote: Path
    processes: Processes
    work: Path

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        pass

    def clear(self) -> None:
        """Empty the remote side and the mount point (left over from an earlier run)."""
        for stale in (self.remote, self.root):
            if stale.exists() and not os.path.ismount(stale):
                shutil.rmtree(stale)
            stale.mkdir(parents=True, exist_ok=True)

    def cold(self) -> None:
        """Forget every cache this target has (remount; drop the kernel's page cache)."""
        self.stop()
        drop_page_cache()
        self.start()

    def requests(self) -> dict[str, int] | None:
        return None

    def peak_rss_kb(self) -> int | None:
        return None


class Native(Target):
    pass


@dataclass
class Sshfs(Target):
    sshd: Sshd | None = None
    proxy_port: int = 0

    def start(self) -> None:
        assert self.sshd is not None
        self.root.mkdir(parents=True, exist_ok=True)
        options = (
            f"IdentityFile={self.sshd.user_key},StrictHostKeyChecking=no,"
            "UserKnownHostsFile=/dev/null,LogLevel=ERROR"
        )
        argv = [
            "sshfs",
            "-p",
            str(self.proxy_port),
            "-o",
            options,
            f"root@127.0.0.1:{self.remote}",
            str(self.root),
        ]
        subprocess.run(argv, check=True, timeout=60)

    def stop(self) -> None:
        unmount(self.root)


@dataclass
class Baifs(Target):
    server: BaifsServer | None = None
    proxy_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    home: Path = field(default_factory=Path)
    peak_kb: int = 0

    @property
    def environment(self) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "XDG_"))}
        environment.update(
            BACKEND_ENDPOINT=f"http://127.0.0.1:{self.proxy_port}",
            BACKEND_ACCESS_KEY=BENCH_ACCESS_KEY,
            BACKEND_SECRET_KEY=BENCH_SECRET_KEY,
            XDG_STATE_HOME=str(self.home / "state"),
            XDG_CACHE_HOME=str(self.home / "cache"),
        )
        return environment

    def start(self) -> None:
        assert self.server is not None
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.work / f"{self.name}.log"
        argv = [
            sys.executable,
            "-m",
            "baifs",
            "mount",
            self.server.session_id,
            str(self.root),
            "--foreground",
        ]
        self.process = self.processes.start(argv, log, env=self.environment)
        deadline = time.monotonic() + 60
        while not (os.path.ismount(self.root) and (self.root / ".baifs-status").exists()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the baifs mount did not come up:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.peak_kb = max(self.peak_kb, self.peak_rss_kb() or 0)
            unmount(self.root)
            stop(self.process, timeout=600)
            self.process = None
        unmount(self.root)

    def requests(self) -> dict[str, int] | None:
        assert self.server is not None
        return self.server.counters()

    def cpu_seconds(self) -> float:
        """The mount daemon's CPU time so far, user and system."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_kb(self) -> int | None:
        """VmHWM of the mount daemon: its peak resident set since it started."""
        if self.process is None:
            return self.peak_kb or None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return max(self.peak_kb, int(match.group(1))) if match else None


def targets_at(
    processes: Processes, work: Path, sshd: Sshd, server: BaifsServer, latency: float
) -> list[Target]:
    """A native directory, sshfs and baifs at one latency (delaying proxies started as needed)."""
    ssh_proxy = DelayProxy.start(processes, work, sshd.port, latency)
    api_proxy = DelayProxy.start(processes, work, server.port, latency)
    native_root = work / f"native-{latency:g}"
    return [
        Native("native", native_root, native_root, processes, work),
        Sshfs("sshfs", work / "mnt-sshfs", sshd.remote_root, processes, work, sshd, ssh_proxy.port),
        Baifs(
            "baifs",
            work / "mnt-baifs",
            server.work_dir,
            processes,
            work,
            server,
            api_proxy.port,
            home=work / "baifs-home",
        ),
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
