"""Helpers shared by the tests: a real `baifs serve` in a subprocess, signed raw requests."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from baifs.api import signing
from baifs.api.batch import BatchExecutor, BatchSteps
from baifs.api.client import SessionClient
from baifs.config import Credentials

TEST_ACCESS_KEY = "AKIATESTTESTTEST0001"
TEST_SECRET_KEY = "test-secret-key-0123456789abcdefghijklmn"
IMAGE = "python:3.11-ubuntu22.04"
_names = itertools.count()


def unique_session_name() -> str:
    return f"test-{os.getpid()}-{next(_names):04d}"


@dataclass
class LocalServer:
    process: subprocess.Popen[bytes]
    endpoint: str
    data_dir: Path
    log_path: Path
    credentials: Credentials = field(
        default_factory=lambda: Credentials("http://invalid", TEST_ACCESS_KEY, TEST_SECRET_KEY)
    )
    compat: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def work_dir(self, session_id: str) -> Path:
        return self.data_dir / "sessions" / session_id / "work"

    def counters(self, version: str | None = None) -> dict[str, int]:
        """Requests per endpoint, batch runs and agent-call repeats (asked with API ``version``)."""
        response = signed_request(
            self, "GET", "/_baifs/counters", **({"version": version} if version else {})
        )
        response.raise_for_status()
        document = response.json()
        return {
            **document["requests"],
            "batch_runs": document["batch_runs"],
            "agent_call_retries": document["agent_call_retries"],
        }

    def stop(self) -> None:
        stop_process(self.process, 10)

    def kill(self) -> None:
        """``kill -9`` the server: what it was doing is cut off mid-way."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        """Start the server again on the same port and data (after `kill` or `stop`)."""
        port = int(self.endpoint.rsplit(":", 1)[1])
        again = start_server(self.data_dir.parent, *self.compat, port=port, extra=self.extra)
        self.process, self.log_path = again.process, again.log_path


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["BACKEND_ACCESS_KEY"] = TEST_ACCESS_KEY
    environment["BACKEND_SECRET_KEY"] = TEST_SECRET_KEY
    return environment


def start_server(
    directory: Path,
    *compat: str,
    latency_ms: float = 0,
    port: int = 0,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> LocalServer:
    directory.mkdir(parents=True, exist_ok=True)
    data_dir = directory / "serve-data"
    log_path = directory / f"serve-{next(_names)}.log"
    argv = [sys.executable, "-m", "baifs", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    argv += [f"--compat={name}" for name in compat]
    if latency_ms:
        argv += ["--latency-ms", str(latency_ms)]
    argv += list(extra)
    log = open(log_path, "wb")
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**server_environment(), **(env or {})}
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+),", log_path.read_text())
        if match:
            server = LocalServer(process, match.group(1), data_dir, log_path, compat=compat, extra=extra)
            server.credentials = Credentials(match.group(1), TEST_ACCESS_KEY, TEST_SECRET_KEY)
            return server
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"baifs serve did not start:\n{log_path.read_text()}")


def signed_request(
    server: LocalServer,
    method: str,
    target: str,
    *,
    content: bytes | Iterable[bytes] | None = None,
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
    date: datetime | None = None,
    secret_key: str = TEST_SECRET_KEY,
    version: str = signing.LATEST_VERSION,
    sign: bool = True,
) -> httpx.Response:
    """One request signed by hand, so tests can send what the client refuses to."""
    with httpx.Client(timeout=30) as http:
        request = http.build_request(
            method,
            server.endpoint + target,
            content=content,
            files=files,
            headers={"Content-Type": "application/json"} if content is not None else {},
        )
        if sign:
            date_header = signing.format_date(date or datetime.now(UTC))
            request.headers["Date"] = date_header
            request.headers["X-BackendAI-Version"] = version
            host = httpx.URL(server.endpoint).netloc.decode()
            signature_hex = signing.signature(
                method=method,
                path_with_query=request.url.raw_path.decode(),
                date_header=date_header,
                host=host,
                media_type=signing.media_type_of(request.headers.get("content-type")),
                version=version,
                secret_key=secret_key,
            )
            request.headers["Authorization"] = signing.authorization_header(TEST_ACCESS_KEY, signature_hex)
        return http.send(request)


def minutes_ago(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


@dataclass
class FaultProxy:
    """`tests/faultproxy.py` in a subprocess, in front of a server; rules are set while it runs."""

    process: subprocess.Popen[bytes]
    endpoint: str
    upstream: LocalServer

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.endpoint, TEST_ACCESS_KEY, TEST_SECRET_KEY)

    def set(self, *rules: dict[str, object], seed: int | None = None) -> dict[str, object]:
        """Replace the rules (each: endpoint, fault, rate, and status/seconds/count as needed)."""
        document: dict[str, object] = {"rules": list(rules)}
        if seed is not None:
            document["seed"] = seed
        response = httpx.put(self.endpoint + "/_faults", json=document, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def clear(self) -> None:
        self.set()

    def state(self) -> dict[str, object]:
        response = httpx.get(self.endpoint + "/_faults", timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> None:
        stop_process(self.process, 5)


def start_proxy(directory: Path, upstream: LocalServer, *, seed: int = 0) -> FaultProxy:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"proxy-{next(_names)}.log"
    script = Path(__file__).with_name("faultproxy.py")
    argv = [sys.executable, str(script), "--upstream", upstream.endpoint, "--seed", str(seed)]
    log = open(log_path, "wb")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+)", log_path.read_text())
        if match:
            return FaultProxy(process, match.group(1), upstream)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the fault proxy did not start:\n{log_path.read_text()}")


async def run_batch(session: SessionClient, command: str) -> tuple[int | None, str, str]:
    """Run one command as a batch task: its exit code, stdout and stderr."""
    output: dict[str, list[str]] = {"stdout": [], "stderr": []}

    async def sink(stream: str, text: str) -> None:
        output[stream].append(text)

    outcome = await BatchExecutor(session).run(BatchSteps(exec=command), sink)
    return outcome.exit_code, "".join(output["stdout"]), "".join(output["stderr"])
