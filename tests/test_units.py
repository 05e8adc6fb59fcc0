"""Unit tests of the pure layers: signing, listings, archives, configuration, retries."""

from __future__ import annotations

import errno
import io
import json
import stat
import subprocess
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio

from baifs.api import archive, signing
from baifs.api.batch import BatchSteps
from baifs.api.client import Connection, RetryPolicy
from baifs.api.errors import EndpointUnreachable, ProtocolError, RemotePathError, ServerError
from baifs.api.listing import entry_json, parse_listing, parse_mode
from baifs.config import ConfigError, Credentials, load_credentials
from baifs.server import auth
from baifs.server.problems import Problem

pytestmark = pytest.mark.fast


def test_signature_matches_the_sdk_algorithm() -> None:
    # Worked example computed with the official SDK's generate_signature (23.9.10).
    date = "2026-08-23T01:02:03.456789+00:00"
    value = signing.signature(
        method="GET",
        path_with_query="/session/abc/files?path=.",
        date_header=date,
        host="127.0.0.1:8090",
        media_type="application/json",
        version="v7.20230615",
        secret_key="secret",
    )
    assert value == "ba37c3e107f693df552d38cb9d5f8816e381b434e4654b9eea5a2100eef5aced"


def _signed(date: datetime, secret: str = "s3cret") -> auth.SignedRequest:
    date_header = signing.format_date(date)
    value = signing.signature(
        method="POST",
        path_with_query="/session/x/upload",
        date_header=date_header,
        host="h:1",
        media_type="multipart/form-data",
        version=signing.LATEST_VERSION,
        secret_key=secret,
    )
    headers = {
        "authorization": signing.authorization_header("AK", value),
        "date": date_header,
        "host": "h:1",
        "content-type": "multipart/form-data; boundary=xyz",
        "x-backendai-version": signing.LATEST_VERSION,
    }
    return auth.SignedRequest("POST", "/session/x/upload", headers)


def test_verification_accepts_own_signature_and_rejects_tampering() -> None:
    keypair = auth.Keypair("AK", "s3cret")
    now = datetime.now(UTC)
    assert auth.verify(_signed(now), keypair) == "AK"
    with pytest.raises(Problem) as wrong_secret:
        auth.verify(_signed(now, secret="other"), keypair)
    assert wrong_secret.value.status == 401
    with pytest.raises(Problem) as skewed:
        auth.verify(_signed(now - timedelta(minutes=20)), keypair)
    assert skewed.value.status == 400 and skewed.value.kind == "invalid-auth-params"
    tampered = _signed(now)
    moved = auth.SignedRequest("POST", "/session/y/upload", tampered.headers)
    with pytest.raises(Problem):
        auth.verify(moved, keypair)


@pytest.mark.parametrize(
    "mode",
    [
        0o100644,
        0o040755,
        0o120777,
        0o020620,
        0o060660,
        0o010644,
        0o140755,
        0o104755,
        0o102755,
        0o041777,
        0o104644,
        0o102644,
        0o041776,
        0o107000,
    ],
)
def test_mode_strings_round_trip(mode: int) -> None:
    assert parse_mode(stat.filemode(mode)) == mode


@pytest.mark.parametrize("text", ["", "-rw-r--r", "xrw-r--r--", "-rwzr--r--", "-rw-r--r--x"])
def test_malformed_mode_strings_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_mode(text)


def test_listing_parses_entries_and_maps_traceback_errors(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    entries = parse_listing({"files": json.dumps([entry_json("f", (tmp_path / "f").lstat())]) + "\n"}, ".")
    assert entries[0].name == "f" and entries[0].size == 3 and entries[0].is_regular
    assert entries[0].mtime_ns == pytest.approx((tmp_path / "f").stat().st_mtime_ns, abs=1000)
    for name, code in [("FileNotFoundError", errno.ENOENT), ("NotADirectoryError", errno.ENOTDIR)]:
        with pytest.raises(RemotePathError) as failure:
            parse_listing({"files": "", "errors": f"Traceback...\n{name}: [Errno] x", "abspath": "x"}, "x")
        assert failure.value.errno == code
    assert parse_listing({"files": "", "errors": ""}, ".") == []


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as out:
        for info, data in members:
            out.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, data


@pytest.mark.parametrize(
    "member",
    [
        _member("../escape", b"x"),
        _member("/etc/escape", b"x"),
        _member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _member("dev", kind=tarfile.CHRTYPE),
    ],
)
def test_unsafe_archives_write_nothing(tmp_path: Path, member: tuple) -> None:
    target = tmp_path / "dest"
    with pytest.raises(ProtocolError):
        archive.extract_tar(_tar(_member("fine", b"ok"), member), target)
    assert not (target / "fine").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_multipart_framing_round_trips() -> None:
    content_type, body = archive.encode_mixed([b"first", b"", b"\r\n--tricky--\r\n"])
    parts = archive.decode_multipart(content_type, body)
    assert [bytes(p.body) for p in parts] == [b"first", b"", b"\r\n--tricky--\r\n"]


@pytest.mark.parametrize(
    ("build", "expected_exit", "expected_log"),
    [("echo b >> log", 3, "c\nb\ne 'quoted' 1\n"), ("echo b >> log; exit 1", 127, "c\nb\n")],
)
def test_batch_steps_compose_with_runner_semantics(
    tmp_path: Path, build: str, expected_exit: int, expected_log: str
) -> None:
    steps = BatchSteps(
        clean="echo c > log; exit 5",
        build=build,
        exec="echo \"e 'quoted' $_BACKEND_BATCH_MODE\" >> log; exit 3",
    )
    finished = subprocess.run(["/bin/sh", "-c", steps.script()], cwd=tmp_path)
    assert finished.returncode == expected_exit
    assert (tmp_path / "log").read_text() == expected_log


def test_credentials_file_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env above it
    for key in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"):
        monkeypatch.delenv(f"BACKEND_{key}", raising=False)
    path = tmp_path / "config.toml"
    path.write_text('[profiles.default]\nendpoint = "http://h"\naccess_key = "AK"\nsecret_key = "SK"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_credentials(config_path=path)
    path.chmod(0o600)
    credentials = load_credentials(config_path=path)
    assert credentials.access_key == "AK" and "SK" not in repr(credentials)
    monkeypatch.setenv("BACKEND_ENDPOINT", "http://env")
    monkeypatch.setenv("BACKEND_ACCESS_KEY", "AK2")
    monkeypatch.setenv("BACKEND_SECRET_KEY", "SK2")
    assert load_credentials(config_path=path).endpoint == "http://env"
    assert load_credentials("default", config_path=path).endpoint == "http://h"


def test_a_dotenv_file_above_the_working_directory_gives_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"):
        monkeypatch.delenv(f"BACKEND_{key}", raising=False)
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / ".env").write_text(
        "BACKEND_ENDPOINT=http://from-dotenv\nBACKEND_ACCESS_KEY=AKDOT\nBACKEND_SECRET_KEY=SKDOT\n"
    )
    monkeypatch.chdir(project / "sub")
    credentials = load_credentials(config_path=tmp_path / "none.toml")
    assert (credentials.endpoint, credentials.access_key) == ("http://from-dotenv", "AKDOT")
    monkeypatch.setenv("BACKEND_ENDPOINT", "http://from-environment")
    assert load_credentials(config_path=tmp_path / "none.toml").endpoint == "http://from-environment"


async def test_retries_honour_retry_after_and_give_up(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["Date"])
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "2"}, json={"type": "x", "title": "busy"})
        return httpx.Response(200, json={"files": "[]\n", "errors": "", "abspath": "."})

    connection = Connection(Credentials("http://h:1", "AK", "SK"), retry=RetryPolicy(attempts=4))
    connection._http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    started = trio.current_time()
    assert await connection.session("s").list_dir("") == []
    assert len(calls) == 3 and connection.stats.retries == 2
    assert trio.current_time() - started == pytest.approx(4.0)

    def always_down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            500, json={"type": "x/internal-server-error", "title": "Internal server error."}
        )

    connection._http = httpx.AsyncClient(transport=httpx.MockTransport(always_down))
    with pytest.raises(ServerError):
        await connection.session("s").list_dir("")

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    connection._http = httpx.AsyncClient(transport=httpx.MockTransport(unreachable))
    with pytest.raises(EndpointUnreachable, match="cannot reach http://h:1"):
        await connection.session("s").list_dir("")
    assert "SK" not in str(connection.stats.errors)
