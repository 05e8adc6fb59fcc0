"""The official Backend.AI client (CLI and SDK, 23.9.10) accepts `baifs serve`.

The client is installed into its own virtual environment on first use (it pins
old aiohttp/yarl releases that must not meet ours), cached under
``~/.cache/baifs-tests``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import LocalServer, start_server, unique_session_name

CLIENT_REQUIREMENTS = ["backend.ai-client==23.9.10", "yarl<1.17"]
CLIENT_VENV = Path.home() / ".cache" / "baifs-tests" / "official-client-23.9.10"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def official_client() -> Path:
    ready = CLIENT_VENV / ".installed"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CLIENT_VENV)], check=True)
        install = subprocess.run(
            [str(CLIENT_VENV / "bin/pip"), "install", "--quiet", *CLIENT_REQUIREMENTS],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        assert install.returncode == 0, f"installing the official client failed:\n{install.stderr}"
        ready.write_text("\n".join(CLIENT_REQUIREMENTS))
    return CLIENT_VENV / "bin"


def client_environment(server: LocalServer, home: Path) -> dict[str, str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("BACKEND_", "SORNA_"))
    }
    environment.update(
        HOME=str(home),
        BACKEND_ENDPOINT=server.endpoint,
        BACKEND_ENDPOINT_TYPE="api",
        BACKEND_ACCESS_KEY=server.credentials.access_key,
        BACKEND_SECRET_KEY=server.credentials.secret_key,
        PYTHONWARNINGS="ignore",
    )
    return environment


def run(argv: list[str], cwd: Path, environment: dict[str, str]) -> tuple[str, str]:
    finished = subprocess.run(
        argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert finished.returncode == 0, f"{argv} failed:\n{finished.stdout}\n{finished.stderr}"
    return finished.stdout, finished.stderr


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

    name = sys.argv[1]
    with Session() as api:
        session = api.ComputeSession.get_or_create("python:3.11-ubuntu22.04", name=name)
        run_id, mode, options = None, "batch", {
            "build": "echo building; cat tree/a.txt > built.txt",
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


def test_official_client_uploads_lists_downloads_and_executes(
    official_client: Path, server: LocalServer, tmp_path: Path
) -> None:
    environment = client_environment(server, tmp_path / "home")
    (tmp_path / "home").mkdir()
    name = unique_session_name()
    create = run([str(official_client / "python"), "-c", CREATE_ONLY, name], tmp_path, environment)
    session_id = json.loads(create[0])["id"]
    work = server.work_dir(session_id)

    source = tmp_path / "src"
    files = {
        "tree/a.txt": b"alpha\n",
        "tree/sub/b.bin": bytes(range(256)) * 40,
        "tree/sub/deeper/c.txt": b"gamma\n",
        "tree/with space.txt": b"spaced\n",
    }
    for relative, data in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    _, upload_log = run(
        [str(official_client / "backend.ai"), "session", "upload", name, *files], source, environment
    )
    assert "Uploaded" in upload_log
    for relative, data in files.items():
        assert (work / relative).read_bytes() == data, relative

    listing, _ = run(
        [str(official_client / "backend.ai"), "session", "ls", name, "tree"], source, environment
    )
    for entry in ("a.txt", "sub", "with space.txt"):
        assert entry in listing
    assert "drwx" in listing

    destination = tmp_path / "downloaded"
    destination.mkdir()
    run(
        [
            str(official_client / "backend.ai"),
            "session",
            "download",
            name,
            "tree/a.txt",
            "tree/sub",
            "--dest",
            str(destination),
        ],
        source,
        environment,
    )
    assert (destination / "a.txt").read_bytes() == files["tree/a.txt"]
    assert (destination / "sub/b.bin").read_bytes() == files["tree/sub/b.bin"]
    assert (destination / "sub/deeper/c.txt").read_bytes() == files["tree/sub/deeper/c.txt"]

    execution_log, _ = run([str(official_client / "python"), "-c", SDK_SCRIPT, name], tmp_path, environment)
    execution = json.loads(execution_log)
    assert execution["id"] == session_id
    assert execution["statuses"][:2] == ["clean-finished", "build-finished"]
    assert "continued" in execution["statuses"] and execution["statuses"][-1] == "finished"
    assert execution["exit"] == 7
    stdout = "".join(text for stream, text in execution["console"] if stream == "stdout")
    stderr = "".join(text for stream, text in execution["console"] if stream == "stderr")
    assert stdout == "building\nexecuting\nalpha\ndone\n"
    assert stderr == "to-stderr\n"
    assert (work / "built.txt").read_bytes() == b"alpha\n"


def test_official_client_against_its_own_release(official_client: Path, tmp_path: Path) -> None:
    """The 23.9 client against the 23.09.11 profile does what it does against that real manager.

    Nested upload names arrive as the SDK's aiohttp writes them, percent-encoded and not
    decoded by the manager's (a file named ``tree%2Fa.txt``); a download is a GET whose
    body the manager ignores (400); listing and execution work.
    """
    local = start_server(tmp_path / "srv", extra=("--emulate", "23.09.11"))
    try:
        environment = client_environment(local, tmp_path / "home")
        (tmp_path / "home").mkdir()
        name = unique_session_name()
        create = run([str(official_client / "python"), "-c", CREATE_ONLY, name], tmp_path, environment)
        work = local.work_dir(json.loads(create[0])["id"])
        source = tmp_path / "src"
        (source / "tree").mkdir(parents=True)
        (source / "tree" / "a.txt").write_bytes(b"alpha\n")
        (source / "top.txt").write_bytes(b"top\n")
        run(
            [str(official_client / "backend.ai"), "session", "upload", name, "tree/a.txt", "top.txt"],
            source,
            environment,
        )
        assert (work / "tree%2Fa.txt").read_bytes() == b"alpha\n" and not (work / "tree").exists()
        assert (work / "top.txt").read_bytes() == b"top\n"
        listing, _ = run(
            [str(official_client / "backend.ai"), "session", "ls", name, "."], source, environment
        )
        assert "tree%2Fa.txt" in listing and "top.txt" in listing
        download = subprocess.run(
            [
                str(official_client / "backend.ai"),
                "session",
                "download",
                name,
                "top.txt",
                "--dest",
                str(tmp_path),
            ],
            cwd=source,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert not (tmp_path / "top.txt").exists() and "400" in download.stdout + download.stderr, download
    finally:
        local.stop()
