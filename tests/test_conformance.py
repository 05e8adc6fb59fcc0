"""The official Backend.AI clients (CLI and SDK, 23.9.10 and 26.9.6) accept `baifs serve`.

Each client is installed once, cached under ``~/.cache/baifs-tests``: 23.9.10
into its own virtual environment (it pins old aiohttp/yarl releases that must
not meet ours); 26.9.6, which needs Python 3.13 (Debian 12 has 3.11), into a
virtual environment inside a minimal Debian 13 root made by debootstrap, run
through chroot. The chroot shares the host's network, so it reaches the server
on 127.0.0.1 as any client does.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import LocalServer, start_server, unique_session_name

CACHE = Path.home() / ".cache" / "baifs-tests"
CLIENT_23_REQUIREMENTS = ["backend.ai-client==23.9.10", "yarl<1.17"]
CLIENT_23_VENV = CACHE / "official-client-23.9.10"
CLIENT_26_REQUIREMENT = "backend.ai-client==26.9.6"
CLIENT_26_ROOT = CACHE / "official-client-26.9.6-trixie"
#: Inside the chroot.
CLIENT_26_VENV = "/opt/backend.ai-client"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]


@dataclass
class OfficialClient:
    """One installed official client: its CLI and its Python, run in `root` (a chroot) or here."""

    release: str
    bin_dir: str
    root: Path | None = None

    def inside(self, path: Path) -> str:
        """`path` (under the workspace) as the client sees it."""
        return "/" + str(path.relative_to(self.root)) if self.root else str(path)

    def argv(self, program: str, *args: str, cwd: Path) -> list[str]:
        command = [f"{self.bin_dir}/{program}", *args]
        if self.root is None:
            return command
        return ["chroot", str(self.root), "/usr/bin/env", "-C", self.inside(cwd), *command]

    def call(
        self, program: str, *args: str, cwd: Path, environment: dict[str, str]
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(program, *args, cwd=cwd),
            cwd=cwd,
            env=environment,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )

    def run(self, program: str, *args: str, cwd: Path, environment: dict[str, str]) -> tuple[str, str]:
        finished = self.call(program, *args, cwd=cwd, environment=environment)
        assert finished.returncode == 0, f"{program} {args} failed:\n{finished.stdout}\n{finished.stderr}"
        return finished.stdout, finished.stderr


def install(argv: list[str], what: str) -> None:
    finished = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, f"{what} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"


@pytest.fixture(scope="module")
def client_23() -> OfficialClient:
    ready = CLIENT_23_VENV / ".installed"
    if not ready.exists():
        install([sys.executable, "-m", "venv", "--clear", str(CLIENT_23_VENV)], "making its venv")
        install(
            [str(CLIENT_23_VENV / "bin/pip"), "install", "--quiet", *CLIENT_23_REQUIREMENTS],
            "installing the official client 23.9.10",
        )
        ready.write_text("\n".join(CLIENT_23_REQUIREMENTS))
    return OfficialClient("23.9.10", str(CLIENT_23_VENV / "bin"))


def remove_root(root: Path) -> None:
    """Remove a (half-built) root: first whatever an interrupted debootstrap left mounted in it."""
    with open("/proc/self/mounts") as table:
        inside = [line.split()[1] for line in table if line.split()[1].startswith(f"{root}/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@pytest.fixture(scope="module")
def client_26() -> OfficialClient:
    if os.geteuid() != 0:
        pytest.skip("the 26.9 client runs in a chroot, which needs root (as the README's test command has)")
    root = CLIENT_26_ROOT
    ready = root / ".installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "official-client-26.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second run waits and finds it built
        if not ready.exists():
            build_root(root)
            ready.write_text(CLIENT_26_REQUIREMENT)
    return OfficialClient("26.9.6", f"{CLIENT_26_VENV}/bin", root)


def build_root(root: Path) -> None:
    """A minimal Debian 13 with Python 3.13 and the 26.9 client in a venv, in ``root``."""
    assert shutil.which("debootstrap"), "debootstrap is missing: run scripts/setup.sh"
    remove_root(root)
    install(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3.13,python3.13-venv,ca-certificates",
            "trixie",
            str(root),
            "http://deb.debian.org/debian",
        ],
        "debootstrap of a Debian 13 root for Python 3.13",
    )
    # The host's trust store and pip settings, so pip inside reaches PyPI as the host does.
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    if Path("/etc/pip.conf").exists():
        shutil.copyfile("/etc/pip.conf", root / "etc/pip.conf")
    install(["chroot", str(root), "/usr/bin/python3.13", "-m", "venv", CLIENT_26_VENV], "its venv")
    pip = [f"{CLIENT_26_VENV}/bin/pip", "install", "--quiet", "--no-cache-dir", CLIENT_26_REQUIREMENT]
    install(["chroot", str(root), *pip], "installing the official client 26.9.6")


@pytest.fixture(params=["23.9.10", "26.9.6"])
def official_client(request: pytest.FixtureRequest) -> OfficialClient:
    return request.getfixturevalue("client_23" if request.param == "23.9.10" else "client_26")


@pytest.fixture
def workspace(official_client: OfficialClient, tmp_path: Path) -> Iterator[Path]:
    """A scratch directory the client can see (inside its root), removed afterwards."""
    if official_client.root is None:
        place = tmp_path / "client"
    else:
        place = official_client.root / "tmp" / f"conformance-{uuid.uuid4().hex[:8]}"
    (place / "home").mkdir(parents=True)
    try:
        yield place
    finally:
        if official_client.root is not None:
            shutil.rmtree(place, ignore_errors=True)


def client_environment(server: LocalServer, client: OfficialClient, workspace: Path) -> dict[str, str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("BACKEND_", "SORNA_"))
    }
    environment.update(
        HOME=client.inside(workspace / "home"),
        BACKEND_ENDPOINT=server.endpoint,
        BACKEND_ENDPOINT_TYPE="api",
        BACKEND_ACCESS_KEY=server.credentials.access_key,
        BACKEND_SECRET_KEY=server.credentials.secret_key,
        PYTHONWARNINGS="ignore",
    )
    return environment


CREATE_ONLY = textwrap.dedent(
    """
    import json, sys
    from ai.backend.client.session import Session

    with Session() as api:
        session = api.ComputeSession.get_or_create("python:3.11-ubuntu22.04", name=sys.argv[1])
        info = session.get_info()
        assert info["status"] == "RUNNING", info
        print(json.dumps({"id": str(session.id), "created": session.created}))
    """
)


SDK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ai.backend.client.session import Session

    name, built_from = sys.argv[1], sys.argv[2]
    with Session() as api:
        session = api.ComputeSession.get_or_create("python:3.11-ubuntu22.04", name=name)
        run_id, mode, options = None, "batch", {
            "build": f"echo building; cat {built_from} > built.txt",
            "exec": "echo executing; cat built.txt; echo to-stderr >&2; sleep 2.5; echo done; exit 7",
        }
        statuses, console = [], []
        while True:
            result = session.execute(run_id, code="", mode=mode, opts=options)
            statuses.append(result["status"])
            console.extend(result["console"])
            run_id, mode, options = result["runId"], "continue", {}
            if result["status"] == "finished":
                break
        print(json.dumps({"id": str(session.id), "statuses": statuses, "console": console,
                          "exit": result["exitCode"]}))
    """
)


def sdk_call(
    client: OfficialClient, script: str, args: tuple[str, ...], workspace: Path, environment: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run an SDK script with the client's Python."""
    path = workspace / f"script-{uuid.uuid4().hex[:6]}.py"
    path.write_text(script)
    return client.call("python", client.inside(path), *args, cwd=workspace, environment=environment)


def sdk(
    client: OfficialClient, script: str, args: tuple[str, ...], workspace: Path, environment: dict[str, str]
) -> dict:
    finished = sdk_call(client, script, args, workspace, environment)
    assert finished.returncode == 0, f"the SDK script failed:\n{finished.stdout}\n{finished.stderr}"
    return json.loads(finished.stdout)


def test_official_client_uploads_lists_downloads_and_executes(
    official_client: OfficialClient, server: LocalServer, workspace: Path
) -> None:
    client, environment = official_client, client_environment(server, official_client, workspace)
    name = unique_session_name()
    session_id = sdk(client, CREATE_ONLY, (name,), workspace, environment)["id"]
    work = server.work_dir(session_id)

    source = workspace / "src"
    files = {
        "tree/a.txt": b"alpha\n",
        "tree/sub/b.bin": bytes(range(256)) * 40,
        "tree/sub/deeper/c.txt": b"gamma\n",
        "tree/with space.txt": b"spaced\n",
    }
    for relative, data in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    output, upload_log = client.run(
        "backend.ai", "session", "upload", name, *files, cwd=source, environment=environment
    )
    assert "Uploaded" in output + upload_log
    for relative, data in files.items():
        assert (work / relative).read_bytes() == data, relative

    listing, _ = client.run("backend.ai", "session", "ls", name, "tree", cwd=source, environment=environment)
    for entry in ("a.txt", "sub", "with space.txt"):
        assert entry in listing
    assert "drwx" in listing

    destination = workspace / "downloaded"
    destination.mkdir()
    client.run(
        "backend.ai",
        "session",
        "download",
        name,
        "tree/a.txt",
        "tree/sub",
        "--dest",
        client.inside(destination),
        cwd=source,
        environment=environment,
    )
    assert (destination / "a.txt").read_bytes() == files["tree/a.txt"]
    assert (destination / "sub/b.bin").read_bytes() == files["tree/sub/b.bin"]
    assert (destination / "sub/deeper/c.txt").read_bytes() == files["tree/sub/deeper/c.txt"]

    execution = sdk(client, SDK_SCRIPT, (name, "tree/a.txt"), workspace, environment)
    assert execution["id"] == session_id
    assert execution["statuses"][:2] == ["clean-finished", "build-finished"]
    assert "continued" in execution["statuses"] and execution["statuses"][-1] == "finished"
    assert execution["exit"] == 7
    stdout = "".join(text for stream, text in execution["console"] if stream == "stdout")
    stderr = "".join(text for stream, text in execution["console"] if stream == "stderr")
    assert stdout == "building\nexecuting\nalpha\ndone\n"
    assert stderr == "to-stderr\n"
    assert (work / "built.txt").read_bytes() == b"alpha\n"


#: Each client against the newest release of the profiles that is not newer than the client.
OWN_RELEASE = {"23.9.10": "23.09.11", "26.9.6": "26.8.1"}


def test_official_client_against_its_own_release(
    official_client: OfficialClient, workspace: Path, tmp_path: Path
) -> None:
    """Each client against its release's profile does what it does against that real manager.

    Both: nested upload names arrive as the SDK's aiohttp writes them, percent-encoded, and
    the manager's aiohttp does not decode them (a file named ``tree%2Fa.txt``); listing works.
    23.9 on 23.09.11: a download is a GET whose body the manager ignores (400); the batch loop
    works. 26.9 on 26.8.1: a download works; the SDK sends the run id as ``runId``, which
    managers from 25.6 no longer read, so its batch loop fails at its first ``continue`` with
    the manager's "continuation requires explicit run ID".
    """
    client = official_client
    local = start_server(tmp_path / "srv", extra=("--emulate", OWN_RELEASE[client.release]))
    try:
        environment = client_environment(local, client, workspace)
        name = unique_session_name()
        work = local.work_dir(sdk(client, CREATE_ONLY, (name,), workspace, environment)["id"])
        source = workspace / "src"
        (source / "tree").mkdir(parents=True)
        (source / "tree" / "a.txt").write_bytes(b"alpha\n")
        (source / "top.txt").write_bytes(b"top\n")
        client.run(
            "backend.ai",
            "session",
            "upload",
            name,
            "tree/a.txt",
            "top.txt",
            cwd=source,
            environment=environment,
        )
        assert (work / "tree%2Fa.txt").read_bytes() == b"alpha\n" and not (work / "tree").exists()
        assert (work / "top.txt").read_bytes() == b"top\n"
        listing, _ = client.run("backend.ai", "session", "ls", name, ".", cwd=source, environment=environment)
        assert "tree%2Fa.txt" in listing and "top.txt" in listing
        destination = workspace / "downloaded"
        destination.mkdir()
        download = client.call(
            "backend.ai",
            "session",
            "download",
            name,
            "top.txt",
            "--dest",
            client.inside(destination),
            cwd=source,
            environment=environment,
        )
        execution = sdk_call(client, SDK_SCRIPT, (name, "top.txt"), workspace, environment)
        if client.release == "23.9.10":
            assert not (destination / "top.txt").exists()
            assert "400" in download.stdout + download.stderr, download
            assert execution.returncode == 0 and json.loads(execution.stdout)["exit"] == 7, execution
        else:
            assert download.returncode == 0 and (destination / "top.txt").read_bytes() == b"top\n", download
            assert execution.returncode != 0, execution
            assert "continuation requires explicit run ID" in execution.stderr, execution.stderr
    finally:
        local.stop()
