"""`baifs serve` shaped like real sessions: a container user other than the uploader, virtual folders.

Each behaviour of reference §12 that the server reproduces behind an option is
shown through the real server: what a run sees, what listings and downloads
see, who owns what.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import CONTAINER_UID, open_session
from support import LocalServer, run_batch, start_server, unique_session_name

from baifs.api.archive import single_member
from baifs.api.client import SessionClient, UploadFile
from baifs.api.errors import APIError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def session(realistic: LocalServer) -> AsyncIterator[tuple[SessionClient, Path]]:
    connection, client, session_id = await open_session(realistic)
    work = realistic.work_dir(session_id)
    async with connection:
        yield client, work


async def test_runs_are_the_container_user_and_cannot_change_what_uploads_made(
    session: tuple[SessionClient, Path],
) -> None:
    client, work = session
    await client.upload([UploadFile.of("up/file.txt", b"uploaded\n")])
    uploaded, made = work / "up" / "file.txt", work / "up"
    assert (uploaded.stat().st_uid, stat.S_IMODE(uploaded.stat().st_mode)) == (os.getuid(), 0o644)
    assert (made.stat().st_uid, stat.S_IMODE(made.stat().st_mode)) == (os.getuid(), 0o755)
    assert work.stat().st_uid == CONTAINER_UID, "the work directory is the container user's"
    code, out, _ = await run_batch(
        client, "id -u; echo more >> up/file.txt; echo $?; touch up/new; echo $?; touch mine; echo $?"
    )
    lines = [line for line in out.splitlines() if line.strip().isdigit()]
    uid, appended, touched, mine = lines
    assert uid == str(CONTAINER_UID) and appended != "0" and touched != "0" and mine == "0", out
    assert uploaded.read_text() == "uploaded\n" and not (made / "new").exists()
    assert (work / "mine").stat().st_uid == CONTAINER_UID


async def test_uploads_into_a_folder_vanish_but_listings_and_downloads_see_the_folder(
    session: tuple[SessionClient, Path], folders: dict[str, Path]
) -> None:
    client, work = session
    (folders["data"] / "inside.txt").write_text("in the folder\n")
    assert {"data", ".auto"} <= {entry.name for entry in await client.list_dir("")}, "mount points exist"
    await client.upload([UploadFile.of("data/hidden.txt", b"uploaded into a folder\n")], verify=False)
    assert (work / "data" / "hidden.txt").exists(), "the upload lands in the scratch directory underneath"
    assert not (folders["data"] / "hidden.txt").exists()
    names = {entry.name for entry in await client.list_dir("data")}
    assert "inside.txt" in names and "hidden.txt" not in names
    with pytest.raises(APIError):
        await client.download(["data/hidden.txt"])
    assert single_member((await client.download(["data/inside.txt"]))[0])[1] == b"in the folder\n"
    code, out, err = await run_batch(client, "ls /home/work/data; cat data/hidden.txt")
    assert "inside.txt" in out and "hidden.txt" not in out and code != 0 and "No such file" in err, err


async def test_runs_write_into_folders_as_the_container_user_and_see_where_they_are(
    session: tuple[SessionClient, Path], folders: dict[str, Path]
) -> None:
    client, _ = session
    name = f"from-run-{unique_session_name()}.txt"
    code, out, _ = await run_batch(
        client,
        f'echo written > data/{name}; echo "$BACKENDAI_PERSISTENT_PATHS"; '
        "grep -o ' /home/work/[^ ]*' /proc/self/mountinfo | sort",
    )
    written = folders["data"] / name
    assert written.read_text() == "written\n" and written.stat().st_uid == CONTAINER_UID
    lines = out.split()
    assert lines[0] == "/home/work/data:/home/work/.auto", out
    assert {"/home/work/data", "/home/work/.auto"} <= set(lines[1:]), out


async def test_older_agents_leave_the_persistent_paths_out(tmp_path: Path, folders: dict[str, Path]) -> None:
    extra = ("--compat", "no-persistent-paths", "--vfolder", f"data={folders['data']}")
    server = start_server(tmp_path / "old-agent", extra=extra)
    try:
        connection, client, _ = await open_session(server)
        async with connection:
            code, out, _ = await run_batch(client, 'echo "[${BACKENDAI_PERSISTENT_PATHS-unset}]"; id -u')
        assert out.split() == ["[unset]", str(os.getuid())], out
    finally:
        server.stop()
