"""`baifs serve` over real HTTP, with hand-signed requests: auth, limits, confinement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import IMAGE, LocalServer, minutes_ago, signed_request, unique_session_name


@pytest.fixture
def session_id(server: LocalServer) -> str:
    name = unique_session_name()
    response = signed_request(
        server, "POST", "/session", content=json.dumps({"name": name, "image": IMAGE}).encode()
    )
    assert response.status_code == 201, response.text
    return response.json()["sessionId"]


def test_version_probe_needs_no_signature(server: LocalServer) -> None:
    response = signed_request(server, "GET", "/", sign=False)
    assert response.status_code == 200
    assert response.json()["version"] == "v9.20250722"


def test_unsigned_request_gets_401(server: LocalServer, session_id: str) -> None:
    response = signed_request(server, "GET", f"/session/{session_id}", sign=False)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "https://api.backend.ai/probs/auth-failed"


def test_wrong_secret_gets_401(server: LocalServer, session_id: str) -> None:
    response = signed_request(server, "GET", f"/session/{session_id}", secret_key="not-the-secret")
    assert response.status_code == 401
    assert "mismatch" in response.json()["msg"]


@pytest.mark.parametrize("minutes", [20, -20])
def test_date_twenty_minutes_off_gets_400(server: LocalServer, session_id: str, minutes: int) -> None:
    response = signed_request(server, "GET", f"/session/{session_id}", date=minutes_ago(minutes))
    assert response.status_code == 400
    assert response.json()["type"].endswith("/invalid-auth-params")


def test_unsupported_version_gets_400(server: LocalServer, session_id: str) -> None:
    response = signed_request(server, "GET", f"/session/{session_id}", version="v3.20170615")
    assert response.status_code == 400


def test_unknown_session_gets_404(server: LocalServer) -> None:
    response = signed_request(server, "GET", "/session/no-such-session")
    assert response.status_code == 404
    assert response.json()["title"] == "No such session."


def test_session_is_addressable_by_name_and_id(server: LocalServer) -> None:
    body = json.dumps({"name": "by-name-test", "image": IMAGE}).encode()
    first = signed_request(server, "POST", "/session", content=body)
    again = signed_request(server, "POST", "/session", content=body)
    assert first.json()["created"] is True and again.json()["created"] is False
    assert first.json()["sessionId"] == again.json()["sessionId"]
    by_name = signed_request(server, "GET", "/session/by-name-test").json()
    assert by_name["status"] == "RUNNING" and by_name["image"] == IMAGE
    other_image = json.dumps({"name": "by-name-test", "image": "other:1"}).encode()
    assert signed_request(server, "POST", "/session", content=other_image).status_code == 400


def _upload(server: LocalServer, session_id: str, files: list[tuple[str, bytes]]):
    parts = [("src", (name, data, "application/octet-stream")) for name, data in files]
    return signed_request(server, "POST", f"/session/{session_id}/upload", files=parts)


def test_upload_of_exactly_one_mebibyte_gets_400_too_large(server: LocalServer, session_id: str) -> None:
    response = _upload(server, session_id, [("big.bin", b"x" * 1_048_576)])
    assert response.status_code == 400
    assert response.json()["msg"] == "Too large file"
    assert not (server.work_dir(session_id) / "big.bin").exists()
    assert _upload(server, session_id, [("max.bin", b"x" * 1_048_575)]).status_code == 204
    assert (server.work_dir(session_id) / "max.bin").stat().st_size == 1_048_575


def test_upload_of_21_files_gets_400_too_many(server: LocalServer, session_id: str) -> None:
    response = _upload(server, session_id, [(f"f{i}", b"x") for i in range(21)])
    assert response.status_code == 400
    assert response.json()["msg"] == "Too many files"
    assert _upload(server, session_id, [(f"g{i}", b"x") for i in range(20)]).status_code == 204


def _outside_snapshot(root: Path) -> set[str]:
    return {str(path) for path in root.rglob("*")}


@pytest.mark.parametrize(
    "name", ["../escape.txt", "../../escape.txt", "/etc/baifs-escape.txt", "/home/work/../escape.txt"]
)
def test_upload_traversal_writes_nothing_outside(server: LocalServer, session_id: str, name: str) -> None:
    session_root = server.work_dir(session_id).parent
    before = _outside_snapshot(server.data_dir)
    response = _upload(server, session_id, [(name, b"evil")])
    assert response.status_code == 500
    assert "outside /home/work" in response.json()["agent-details"]["exception"]
    created = _outside_snapshot(server.data_dir) - before
    assert all(path.startswith(str(session_root / "work")) for path in created)
    assert not Path("/etc/baifs-escape.txt").exists()


def test_symlinks_never_lead_outside(server: LocalServer, session_id: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret")
    work = server.work_dir(session_id)
    os.symlink(outside, work / "escape")
    os.symlink(outside / "secret.txt", work / "secret-link")

    assert _upload(server, session_id, [("escape/planted.txt", b"evil")]).status_code == 500
    assert not (outside / "planted.txt").exists()
    assert _upload(server, session_id, [("secret-link", b"overwrite")]).status_code == 500
    assert (outside / "secret.txt").read_text() == "host secret"

    listing = signed_request(server, "GET", f"/session/{session_id}/files?path=escape")
    assert listing.status_code == 500
    assert "secret.txt" not in listing.text

    through = signed_request(server, "POST", f"/session/{session_id}/download?files=escape/secret.txt")
    assert through.status_code == 500
    link_itself = signed_request(server, "POST", f"/session/{session_id}/download?files=secret-link")
    assert link_itself.status_code == 200
    assert b"host secret" not in link_itself.content


def test_list_reports_missing_paths_in_errors(server: LocalServer, session_id: str) -> None:
    response = signed_request(
        server, "GET", f"/session/{session_id}/files", content=json.dumps({"path": "nope"}).encode()
    )
    assert response.status_code == 200
    body = response.json()
    assert body["files"] == "" and "FileNotFoundError" in body["errors"]


def test_download_of_six_paths_gets_400(server: LocalServer, session_id: str) -> None:
    query = "&".join(f"files=f{i}" for i in range(6))
    response = signed_request(server, "POST", f"/session/{session_id}/download?{query}")
    assert response.status_code == 400
    assert "maximum 5" in response.json()["msg"]


def test_download_refuses_archives_over_one_mebibyte(server: LocalServer, session_id: str) -> None:
    work = server.work_dir(session_id)
    (work / "fits.bin").write_bytes(b"y" * 1_047_040)
    (work / "too-big.bin").write_bytes(b"y" * 1_047_041)
    fits = signed_request(server, "POST", f"/session/{session_id}/download?files=fits.bin")
    assert fits.status_code == 200
    too_big = signed_request(server, "POST", f"/session/{session_id}/download?files=too-big.bin")
    assert too_big.status_code == 500
    assert "exceeding 1 MiB" in too_big.json()["agent-details"]["exception"]


def test_unknown_route_is_problem_json(server: LocalServer) -> None:
    response = signed_request(server, "GET", "/no/such/route")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
