"""Running ``baifs serve``: keys, the data root, the HTTP listener, shutdown.

Owns the server's process-level state:

- the keypair: from ``BACKEND_ACCESS_KEY``/``BACKEND_SECRET_KEY``, from a
  ``--keypair-file`` (mode 0600), or generated once into
  ``<data root>/keypair.toml`` (mode 0600) and printed with the ``export``
  lines a client needs;
- ``<data root>/serve.json``: the PID and endpoint of the running server, so
  that ``baifs mount --local`` can reuse it; removed on a clean exit;
- ``<data root>/lock``: one server per data directory (`locks`);
- the listener: 127.0.0.1 unless told otherwise (a warning is logged for any
  other address, since batch commands run on this host);
- the sandbox batch commands run in (`sandbox`): the server refuses to start
  where it cannot confine them, unless ``--unsafe-no-sandbox`` is given.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework

from .. import config
from ..errors import BaifsError
from ..locks import DirectoryLock
from .app import ServerState, build_app
from .auth import Keypair
from .compat import Compat
from .ratelimit import RateLimit
from .releases import Profile
from .sandbox import ContainerUser, Sandbox
from .sessions import SessionRegistry
from .workdir import VFolder

log = logging.getLogger(__name__)

KEYPAIR_FILE = "keypair.toml"
SERVE_FILE = "serve.json"


class PortBusy(BaifsError):
    """The address to listen on is taken (another server, another program)."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8090
    data_dir: Path = field(default_factory=lambda: config.data_dir() / "serve")
    keypair_file: Path | None = None
    latency_ms: float = 0.0
    compat: Compat = field(default_factory=Compat)
    quiet: bool = False
    #: the user batch commands run as (None: the server's own, like the agent's default kernel uid).
    container_user: ContainerUser | None = None
    vfolders: tuple[VFolder, ...] = ()
    unsafe_no_sandbox: bool = False
    #: the release emulated (`releases.profile`); its switches are already in ``compat``.
    release: Profile | None = None
    #: how long a new session takes to be RUNNING (PULLING, then PREPARING, meanwhile).
    start_delay: float = 0.0
    #: the keypair's rate limit; None: the emulated release's, or none without one.
    rate_limit: RateLimit | None = None


def generate_keypair() -> Keypair:
    return Keypair("AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))


def keypair_text(keypair: Keypair) -> str:
    return f'access_key = "{keypair.access_key}"\nsecret_key = "{keypair.secret_key}"\n'


def read_keypair_file(path: Path) -> Keypair:
    config.check_private(path)
    document = tomllib.loads(path.read_text())
    try:
        return Keypair(str(document["access_key"]), str(document["secret_key"]))
    except KeyError as exc:
        raise config.ConfigError(f"{path} needs access_key and secret_key") from exc


def load_keypair(options: ServeOptions) -> tuple[Keypair, bool]:
    """The server's keypair, and whether it was generated just now."""
    if options.keypair_file is not None:
        return read_keypair_file(options.keypair_file), False
    access = os.environ.get("BACKEND_ACCESS_KEY")
    secret = os.environ.get("BACKEND_SECRET_KEY")
    if access and secret:
        return Keypair(access, secret), False
    stored = options.data_dir / KEYPAIR_FILE
    if stored.exists():
        return read_keypair_file(stored), False
    keypair = generate_keypair()
    config.write_private(stored, keypair_text(keypair))
    return keypair, True


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(options: ServeOptions, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT or SIGTERM; reports the endpoint URL through ``task_status``."""
    lock = DirectoryLock(options.data_dir, f"the data directory {options.data_dir}")
    lock.acquire(f"baifs serve on {options.host}:{options.port}")
    try:
        await _serve(options, task_status)
    finally:
        lock.release()


def check_port(host: str, port: int) -> None:
    """`PortBusy` now, rather than a traceback from the server, when the address is taken."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortBusy(
                f"cannot listen on {host}:{port}: {error.strerror}; choose another port with --port "
                "(0 picks a free one)"
            ) from None


async def _serve(options: ServeOptions, task_status: trio.TaskStatus[str]) -> None:
    check_port(options.host, options.port)
    os.umask(0o022)  # the agent's: uploads are 0644, the directories they make 0755
    keypair, generated = load_keypair(options)
    sandbox = Sandbox.create(
        unsafe_no_sandbox=options.unsafe_no_sandbox,
        user=options.container_user,
        vfolders=options.vfolders,
        persistent_paths=not options.compat.no_persistent_paths,
    )
    if not is_loopback(options.host):
        log.warning(
            "listening on %s, which is not a loopback address: anyone who has the keys can run "
            "commands on this machine",
            options.host,
        )
    hypercorn = HypercornConfig()
    hypercorn.bind = [f"{options.host}:{options.port}"]
    hypercorn.accesslog = None
    hypercorn.errorlog = logging.getLogger("hypercorn.error")
    hypercorn.graceful_timeout = 1.0
    state_file = options.data_dir / SERVE_FILE
    async with trio.open_nursery() as nursery:
        registry = SessionRegistry(options.data_dir, sandbox, options.compat, options.start_delay)
        await registry.start(nursery)
        state = ServerState(keypair, registry, options.compat, latency=options.latency_ms / 1000)
        if options.release is not None:
            state.manager_version = options.release.manager_version
            state.api_version = options.release.api_version
            state.rate_limit = options.release.rate_limit
        state.rate_limit = options.rate_limit or state.rate_limit
        shutdown = trio.Event()
        nursery.start_soon(_wait_for_signals, shutdown)
        binds = await nursery.start(
            lambda task_status: hypercorn_serve(
                cast(ASGIFramework, build_app(state)),
                hypercorn,
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        )
        endpoint = binds[0]
        state_file.write_text(json.dumps({"pid": os.getpid(), "endpoint": endpoint}))
        if not options.quiet:
            _announce(endpoint, options, keypair, generated)
        task_status.started(endpoint)
        try:
            await shutdown.wait()
        finally:
            state_file.unlink(missing_ok=True)
            for session in registry.all():
                session.kernel.terminate()
            nursery.cancel_scope.cancel()


def _announce(endpoint: str, options: ServeOptions, keypair: Keypair, generated: bool) -> None:
    print(f"baifs serve: listening on {endpoint}, data in {options.data_dir}", file=sys.stderr)
    if options.release is not None:
        print(
            f"baifs serve: emulating Backend.AI {options.release.release} "
            f"(API {options.release.api_version})",
            file=sys.stderr,
        )
    if options.compat.enabled():
        print(f"baifs serve: compatibility switches: {', '.join(options.compat.enabled())}", file=sys.stderr)
    user = options.container_user
    if user is not None:
        print(
            f"baifs serve: runs as uid {user.uid}, gid {user.gid}; uploads as uid {os.getuid()}",
            file=sys.stderr,
        )
    for folder in options.vfolders:
        print(
            f"baifs serve: virtual folder {folder.name}: {folder.host_dir} at {folder.container_path} "
            "(writable by runs)",
            file=sys.stderr,
        )
    if generated:
        print("baifs serve: generated a keypair; a client needs:", file=sys.stderr)
        print(f"export BACKEND_ENDPOINT={endpoint}")
        print(f"export BACKEND_ACCESS_KEY={keypair.access_key}")
        print(f"export BACKEND_SECRET_KEY={keypair.secret_key}")
    else:
        source = options.keypair_file or "the environment"
        if options.keypair_file is None and not os.environ.get("BACKEND_SECRET_KEY"):
            source = options.data_dir / KEYPAIR_FILE
        print(f"baifs serve: access key {keypair.access_key}, secret key in {source}", file=sys.stderr)
    sys.stdout.flush()


async def _wait_for_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            log.info("received %s; shutting down", signal.Signals(received).name)
            shutdown.set()
            return
