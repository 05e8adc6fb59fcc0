"""The embedded local session: ``baifs mount --local`` starts or reuses a private ``baifs serve``.

The server lives in ``~/.local/share/baifs/local`` with its own generated
keypair, listens on an ephemeral port on 127.0.0.1 and runs detached from the
terminal, so it outlives the command that started it; later ``--local``
mounts find it through ``serve.json`` and reuse it; ``baifs serve --stop
--local`` stops it (`stop_server`). Its session is named
``local``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx

from . import config
from .errors import BaifsError
from .processes import running

LOCAL_SESSION = "local"
LOCAL_IMAGE = "baifs/local"
START_TIMEOUT = 30.0


def local_data_dir() -> Path:
    return config.data_dir() / "local"


def recorded_endpoint(data_dir: Path) -> str | None:
    """The endpoint the `baifs serve` of ``data_dir`` said it listens on, if one ever ran."""
    try:
        return str(json.loads((data_dir / "serve.json").read_text())["endpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _running_endpoint(data_dir: Path) -> str | None:
    try:
        record = json.loads((data_dir / "serve.json").read_text())
        os.kill(int(record["pid"]), 0)
        httpx.get(record["endpoint"] + "/", timeout=2).raise_for_status()
        return str(record["endpoint"])
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return None


def ensure_local_server(data_dir: Path | None = None) -> config.Credentials:
    """Credentials for the embedded server, starting it when it is not running."""
    data_dir = data_dir or local_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    endpoint = _running_endpoint(data_dir)
    if endpoint is None:
        endpoint = _start(data_dir)
    keypair_file = data_dir / "keypair.toml"
    config.check_private(keypair_file)
    keys = tomllib.loads(keypair_file.read_text())
    return config.Credentials(endpoint, keys["access_key"], keys["secret_key"])


def stop_server(data_dir: Path, timeout: float = 30.0) -> int | None:
    """Stop the `baifs serve` of ``data_dir`` (SIGTERM, then wait); its pid, or None if none runs."""
    try:
        pid = int(json.loads((data_dir / "serve.json").read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running(pid):
            return pid
        time.sleep(0.05)
    raise BaifsError(f"baifs serve (pid {pid}) did not stop within {timeout:.0f} s")


def _start(data_dir: Path) -> str:
    log_path = data_dir / "serve.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "SORNA_"))}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "baifs", "serve", "--port", "0", "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environment,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        endpoint = _running_endpoint(data_dir)
        if endpoint is not None:
            return endpoint
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    raise BaifsError("the embedded session server did not start:\n  " + "\n  ".join(tail))
