"""Every release profile of `baifs serve --emulate`, and the mount's core battery against each.

The protocol checks read what a profile answers (``GET /``, the API
versions it refuses, the download shapes of 23.09.11). The battery mounts
a session of each profile and does what a user does first: files small and
large both ways, names with ``;``, ``%`` and spaces, mkdir, mv, rm -r,
chmod, a symlink, a git clone and commit, a run; then it checks the
session's disk. One server per profile serves both (module scope).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import open_session
from mounting import (
    baifs,
    baifs_environment,
    baifs_run,
    force_unmount,
    mount_for,
    needs_fuse,
    run_status,
    wait_for,
)
from support import IMAGE, LocalServer, signed_request, start_server, unique_session_name

from baifs import controlfiles
from baifs.api import archive
from baifs.api.batch import BatchExecutor, BatchSteps
from baifs.api.client import Connection, UploadFile
from baifs.api.errors import RateLimited, RemotePathError, ServerError, SessionWedged
from baifs.server import releases

RELEASES = list(releases.RELEASES)


@pytest.fixture(scope="module", params=RELEASES)
def emulated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    server = start_server(
        tmp_path_factory.mktemp(f"release-{request.param}"), extra=("--emulate", request.param)
    )
    server.release = request.param  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_emulate_list_names_every_release_and_what_it_reproduces() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "baifs", "serve", "--emulate", "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    for release in RELEASES:
        assert f"\n{release} " in "\n" + listed.stdout, release
    unknown = subprocess.run(
        [sys.executable, "-m", "baifs", "serve", "--emulate", "22.1.0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode != 0 and "known: 23.09.10" in unknown.stderr


def test_profiles_follow_the_release_rules() -> None:
    def switches(release: str) -> set[str]:
        return set(releases.profile(release).compat.enabled())

    assert "absolute-upload-names" in switches("24.03.7") and "absolute-upload-names" not in switches(
        "24.09.8"
    )
    assert "download-query-first-only" in switches("23.09.11") and not {
        "download-query-first-only"
    } & switches("23.09.10")
    assert "upload-errors-swallowed" in switches("25.16.0") and "upload-errors-swallowed" not in switches(
        "25.15.12"
    )
    assert "no-persistent-paths" in switches("26.1.0") and "no-persistent-paths" not in switches("26.4.7")
    assert "run-id-camel-only" in switches("24.09.8") and "run-id-camel-only" not in switches("25.6.5")
    assert {"run-id-camel-only", "run-id-snake-only"} & switches("25.6.6") == {"run-id-snake-only"}
    assert "bare-agent-errors" in switches("26.1.0") and "bare-agent-errors" not in switches("25.16.0")
    assert "agent-call-retries" in switches("25.16.0") and not {"agent-call-retries"} & (
        switches("25.15.12") | switches("26.1.0")
    )
    assert releases.profile("23.09.11").api_version == "v7.20230615"
    assert releases.profile("26.8.1").api_version == "v9.20250722"


def test_a_profile_answers_as_its_release_and_refuses_newer_api_versions(emulated: LocalServer) -> None:
    release = emulated.release  # type: ignore[attr-defined]
    profile = releases.profile(release)
    hello = signed_request(emulated, "GET", "/", sign=False).json()
    assert hello == {"version": profile.api_version, "manager": release}
    if profile.api_version != "v9.20250722":
        newer = signed_request(emulated, "GET", "/_baifs/counters", version="v9.20250722")
        assert newer.status_code == 400 and "Unsupported API version" in newer.text
    fine = signed_request(emulated, "GET", "/_baifs/counters", version=profile.api_version)
    assert fine.status_code == 200, fine.text


async def test_the_clients_create_works_on_every_release(emulated: LocalServer) -> None:
    """baifs's own create (enqueued, get-or-create by name) and info, with the API version it
    negotiated; the same name again finds the same session."""
    connection = Connection(emulated.credentials, timeout=20)
    async with connection:
        await connection.negotiate()
        name = unique_session_name()
        created = await connection.create_session(name, IMAGE)
        again = await connection.create_session(name, IMAGE)
        assert created["sessionId"] == again["sessionId"]
        info = await connection.session(created["sessionId"]).info()
        assert info["status"] == "RUNNING", info


def _git(*args: str, cwd: Path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, *args], cwd=cwd, check=True, capture_output=True, timeout=120)


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(240)
def test_the_core_battery_works_on_every_release(emulated: LocalServer, tmp_path: Path) -> None:
    m = mount_for(emulated, tmp_path)
    try:
        m.start()
        big = os.urandom(30 * 1024 * 1024)
        names = {"plain.txt": b"plain\n", "semi;colon;twice.txt": b"semi\n", "per%cent 20.txt": b"pct\n"}
        for name, data in names.items():
            (m.path / name).write_bytes(data)
        (m.path / "big.bin").write_bytes(big)
        (m.path / "tree" / "sub").mkdir(parents=True)
        (m.path / "tree" / "sub" / "a.txt").write_text("a\n")
        (m.path / "gone" / "deep").mkdir(parents=True)
        (m.path / "gone" / "deep" / "x").write_text("x")
        os.symlink("plain.txt", m.path / "link")
        m.sync()
        (m.path / "tree").rename(m.path / "moved")
        shutil.rmtree(m.path / "gone")
        os.chmod(m.path / "plain.txt", 0o600)
        source = tmp_path / "src"
        source.mkdir()
        (source / "main.c").write_text("int main(void) { return 0; }\n")
        _git("init", "-q", cwd=source)
        _git("add", "-A", cwd=source)
        _git("commit", "-q", "-m", "start", cwd=source)
        _git("clone", "-q", str(source), str(m.path / "clone"), cwd=tmp_path)
        (m.path / "clone" / "more.txt").write_text("more\n")
        _git("add", "-A", cwd=m.path / "clone")
        _git("commit", "-q", "-m", "more", cwd=m.path / "clone")
        (m.work / "from-session.bin").write_bytes(big[: 20 * 1024 * 1024])  # read cold below, after the run
        ran = baifs_run(m, "cat plain.txt; ls moved/sub; cmp big.bin big.bin && echo same")
        assert ran.returncode == 0 and ran.stdout == b"plain\na.txt\nsame\n", ran
        work = m.work
        for name, data in names.items():
            assert (work / name).read_bytes() == data, name
        assert (work / "big.bin").read_bytes() == big
        assert (work / "moved" / "sub" / "a.txt").read_text() == "a\n" and not (work / "tree").exists()
        assert not (work / "gone").exists() and os.readlink(work / "link") == "plain.txt"
        assert (work / "plain.txt").stat().st_mode & 0o777 == 0o600
        fsck = subprocess.run(["git", "fsck", "--strict"], cwd=work / "clone", capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stderr
        assert (m.path / "from-session.bin").read_bytes() == big[: 20 * 1024 * 1024]
        status = m.status()
        assert not status["flushes"].get("refused"), json.dumps(status["flushes"])
        assert m.unmount() == 0
    finally:
        m.stop()


# -- the gaps of real releases, each against the profile that has it ----------------------


@pytest.fixture
def release_server(tmp_path: Path) -> Iterator:
    started: list[LocalServer] = []

    def start(release: str) -> LocalServer:
        local = start_server(tmp_path / f"srv-{release}", extra=("--emulate", release))
        started.append(local)
        return local

    yield start
    for local in started:
        local.stop()


@pytest.mark.parametrize("release", ["24.03.7", "24.09.0", "25.6.5"])
async def test_gap1_uploads_arrive_where_names_must_be_absolute(release_server, release: str) -> None:
    local = release_server(release)
    connection, session, session_id = await open_session(local)
    async with connection:
        await session.upload([UploadFile.of("x/y.txt", b"abs")])
        await session.upload([UploadFile.of("z.txt", b"second")])
    work = local.work_dir(session_id)
    assert (work / "x/y.txt").read_bytes() == b"abs" and (work / "z.txt").read_bytes() == b"second"
    assert not (work / "home").exists()


async def test_gap2_an_escape_through_a_symlink_never_switches_the_name_mode(release_server) -> None:
    local = release_server("24.09.8")  # relative names only: "outside /home/work" is an escape here
    connection, session, session_id = await open_session(local)
    work = local.work_dir(session_id)
    (work / "target").mkdir()
    os.symlink("/home/work/target", work / "d")  # absolute: leaves the agent's scratch directory
    async with connection:
        with pytest.raises(ServerError, match="outside /home/work"):
            await session.upload([UploadFile.of("d/x.txt", b"escape")])
        assert not session.absolute_upload_names
        await session.upload([UploadFile.of("ok.txt", b"fine")])
    assert (work / "ok.txt").read_bytes() == b"fine"
    assert not (work / "home").exists(), "an upload went to /home/work/home/work/"


async def test_gap4_a_download_of_several_paths_on_23_09_11(release_server) -> None:
    local = release_server("23.09.11")
    connection, session, session_id = await open_session(local)
    work = local.work_dir(session_id)
    for name in ("a", "b", "c"):
        (work / name).write_text(name * 3)
    async with connection:
        archives = await session.download(["a", "b", "c"])
        again = await session.download(["c", "a"])
    assert [archive.single_member(part)[1] for part in archives] == [b"aaa", b"bbb", b"ccc"]
    assert [archive.single_member(part)[1] for part in again] == [b"ccc", b"aaa"]


@pytest.mark.parametrize("release", ["25.15.12", "25.16.0"])
async def test_gap5_names_with_two_semicolons_keep_their_name(release_server, release: str) -> None:
    local = release_server(release)
    connection, session, session_id = await open_session(local)
    async with connection:
        await session.upload([UploadFile.of("a;b;c.txt", b"semi"), UploadFile.of("p%20q r.txt", b"pct")])
    work = local.work_dir(session_id)
    assert (work / "a;b;c.txt").read_bytes() == b"semi" and (work / "p%20q r.txt").read_bytes() == b"pct"
    assert not [p.name for p in work.iterdir() if p.name.startswith("upload-")]


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(150)
def test_gap8_a_session_whose_image_is_pulled_is_followed_until_it_runs(tmp_path: Path) -> None:
    local = start_server(tmp_path / "srv", extra=("--emulate", "26.8.1", "--start-delay", "6"))
    home = tmp_path / "home"
    home.mkdir()
    env = baifs_environment(local, home)
    created = tmp_path / "created"
    other = tmp_path / "other"
    for path in (created, other, tmp_path / "mnt3"):
        path.mkdir()
    try:
        name = unique_session_name()
        mounted = baifs("mount", "--create", IMAGE, name, str(created), env=env, timeout=120)
        assert "PULLING (pulling its image)" in mounted.stderr and "mounted session" in mounted.stderr, (
            mounted.stderr
        )
        assert (created / controlfiles.STATUS).exists()
        # A session another client created (enqueued) is PULLING when this mount comes: it waits.
        body = json.dumps({"name": unique_session_name(), "image": IMAGE, "enqueueOnly": True}).encode()
        answer = signed_request(local, "POST", "/session", content=body).json()
        assert answer["status"] == "PULLING"
        waited = baifs("mount", answer["sessionId"], str(other), env=env, timeout=120)
        assert "mounted session" in waited.stderr and "is PULLING" in waited.stderr, waited.stderr
        too_soon = baifs(
            "mount",
            "--create",
            IMAGE,
            unique_session_name(),
            str(tmp_path / "mnt3"),
            "--create-timeout",
            "1",
            env=env,
            check=False,
            timeout=120,
        )
        assert too_soon.returncode != 0 and "--create-timeout" in too_soon.stderr, too_soon.stderr
    finally:
        for path in (created, other):
            force_unmount(path)
        local.stop()


async def test_gap9_a_rate_limited_keypair_is_given_time_not_more_refusals(
    release_server, tmp_path: Path
) -> None:
    local = start_server(tmp_path / "limited", extra=("--emulate", "26.8.1", "--rate-limit", "12/8"))
    connection, session, session_id = await open_session(local)
    refused_at = None
    try:
        async with connection:
            for index in range(40):
                try:
                    await session.list_dir(".")
                except RateLimited as error:
                    refused_at = index
                    assert "nothing is sent for" in error.msg or error.status == 429
                    break
            assert refused_at is not None, "the limit never came"
            assert connection.rate.limit == 12 and connection.rate.window == 8
            paused = connection.rate.paused_for
            assert 1.5 <= paused <= 2.1  # a quarter of the window the answers named
            with pytest.raises(RateLimited):  # nothing is sent while paused past what a call waits
                connection.rate.paused_until += 20
                await session.list_dir(".")
            connection.rate.paused_until -= 20
            await trio.sleep(8.2)  # the manager's window forgets the requests it counted
            assert await session.list_dir(".") is not None
    finally:
        counts = local.counters()
        local.stop()
    # One request over the limit was refused; the client neither repeated it nor sent during the pause.
    assert counts["list"] == refused_at + 1 + 1, counts


@pytest.mark.parametrize("release", RELEASES)
async def test_every_release_limits_the_keypair_and_the_client_stops_sending(
    tmp_path: Path, release: str
) -> None:
    """The limiter of every release, met by the client: it learns the window from the answers,
    and once refused it sends nothing more while paused (a quarter of the window)."""
    local = start_server(tmp_path / "limited", extra=("--emulate", release, "--rate-limit", "8/60"))
    try:
        connection, session, _ = await open_session(local)
        async with connection:
            with pytest.raises(RateLimited):
                for _ in range(20):
                    await session.list_dir(".")
            assert (connection.rate.limit, connection.rate.window) == (8, 60)
            sent = local.counters(releases.profile(release).api_version)["list"]
            with pytest.raises(RateLimited, match="nothing is sent for"):
                await session.list_dir(".")
            assert local.counters(releases.profile(release).api_version)["list"] == sent
        assert sent == 8  # the create and the listings up to the limit; the one over it was refused
    finally:
        local.stop()


async def test_gap7_a_bare_500_for_a_missing_file_is_decided_by_a_listing_not_repeated(
    release_server,
) -> None:
    local = release_server("26.1.0")
    connection, session, session_id = await open_session(local)
    (local.work_dir(session_id) / "there.txt").write_text("here\n")
    async with connection:
        before = local.counters()
        with pytest.raises(RemotePathError) as raised:
            await session.download(["gone.txt"])
        assert raised.value.errno == errno.ENOENT
        after = local.counters()
        # One download, one listing that shows the file is not there; no repeats of the download.
        assert (after["download"] - before.get("download", 0), after["list"] - before.get("list", 0)) == (
            1,
            1,
        )
        both = session.download(["there.txt", "gone.txt"])
        with pytest.raises(ServerError):  # the caller splits it; the present file is not called missing
            await both
        assert archive.single_member((await session.download(["there.txt"]))[0])[1] == b"here\n"


@pytest.mark.parametrize("release", ["23.09.10", "23.09.11", "24.03.6", "26.8.1"])
async def test_download_single_takes_the_method_and_shape_the_release_reads(
    release_server, release: str
) -> None:
    """Up to 24.03.6 both downloads are GET only (405 to POST); 23.09.11 reads a GET's query only."""
    local = release_server(release)
    connection, session, session_id = await open_session(local)
    (local.work_dir(session_id) / "one").write_bytes(b"one-content")
    async with connection:
        assert await session.download_single("one") == b"one-content"
        assert await session.download_single("one") == b"one-content"  # the method is kept
    assert local.counters(releases.profile(release).api_version)["download_single"] == (
        3 if release != "26.8.1" else 2
    )


@pytest.mark.parametrize("release", ["25.15.12", "25.16.0"])
async def test_a_failing_agent_call_the_manager_repeats_is_not_repeated_again_by_the_client(
    release_server, release: str
) -> None:
    """Managers 25.16 - 25.19 make a failed agent call three times before they answer; a missing
    file is still one request of the client's (the agent's "Could not download" is final)."""
    local = release_server(release)
    connection, session, _ = await open_session(local)
    async with connection:
        started = trio.current_time()
        with pytest.raises(ServerError, match="Could not download the archive"):
            await session.download(["gone.txt"])
        took = trio.current_time() - started
    document = local.counters(releases.profile(release).api_version)
    assert document["download"] == 1, document
    if release == "25.16.0":
        assert document["agent_call_retries"] == 2 and took >= 0.3, (document, took)
    else:
        assert document["agent_call_retries"] == 0, document


#: The agent's words; the same after the manager's own repeats; a bare 500.
@pytest.mark.parametrize("release", ["25.15.12", "25.16.0", "26.8.1"])
async def test_gap3_a_run_queued_behind_another_clients_wedges_the_session_and_says_so(
    release_server, release: str
) -> None:
    local = release_server(release)
    connection, session, session_id = await open_session(local)
    other_connection, other, _ = await open_session(local)  # another client of the same session
    other = other_connection.session(session_id)
    async with connection, other_connection:
        ahead = await other.execute(
            "batch", "ahead", options={"clean": "sleep 3", "build": None, "exec": None}
        )
        assert ahead["status"] == "continued"  # the other client's run holds the session

        async def finish_theirs() -> None:
            while (await other.execute("continue", "ahead"))["status"] != "finished":
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish_theirs)
            started = trio.current_time()
            with pytest.raises(SessionWedged, match="another client's or another mount's") as raised:
                await BatchExecutor(session).run(BatchSteps(exec="sleep 5"))  # queued behind theirs
        said = str(raised.value)
        bare = release == "26.8.1"
        assert "names no cause" in said if bare else "the session's agent lost track of its runs" in said
        # Said at the first answer after it was let in (about 3 s, plus its 2 s of output);
        # a bare 500 takes the few polls that tell it from a passing failure.
        assert trio.current_time() - started < (20 if bare else 9)


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_gap6_names_that_are_not_utf8_are_listed_and_read_through_an_alias(
    release_server, tmp_path: Path
) -> None:
    local = release_server("26.8.1")
    m = mount_for(local, tmp_path)
    work = os.fsencode(m.work)
    directory = os.path.join(work, b"caf\xe9")
    os.mkdir(directory)
    with open(os.path.join(directory, b"na\xefve.txt"), "wb") as handle:
        handle.write(b"bytes, not UTF-8\n")
    os.symlink(b"na\xefve.txt", os.path.join(directory, b"l\xeenk"))
    try:
        m.start()
        seen = os.fsencode(m.path)
        assert b"caf\xe9" in os.listdir(seen)
        inside = os.path.join(seen, b"caf\xe9")
        assert sorted(os.listdir(inside)) == [b"l\xeenk", b"na\xefve.txt"]
        with open(os.path.join(inside, b"na\xefve.txt"), "rb") as handle:
            assert handle.read() == b"bytes, not UTF-8\n"
        assert os.readlink(os.path.join(inside, b"l\xeenk")) == b"na\xefve.txt"
        with open(os.path.join(inside, b"n\xe9w.txt"), "wb") as handle:
            handle.write(b"made here\n")
        m.sync()
        with open(os.path.join(directory, b"n\xe9w.txt"), "rb") as handle:
            assert handle.read() == b"made here\n"
        assert m.unmount() == 0
        scratch = os.path.join(work, b".baifs-tmp")
        assert not os.path.exists(scratch) or os.listdir(scratch) == [], "aliases are litter, removed"
    finally:
        m.stop()


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_a_session_ended_during_a_run_is_reported_terminated_not_wedged(
    release_server, tmp_path: Path
) -> None:
    local = release_server("25.15.12")  # the agents' words are visible there
    m = mount_for(local, tmp_path)
    try:
        m.start()
        (m.path / "kept.txt").write_text("kept\n")
        m.sync()
        runner = subprocess.Popen(
            [sys.executable, "-m", "baifs", "run", str(m.path), "--", "sleep 30"],
            env=m.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started = m.path / controlfiles.RUNS / "1" / "status"
        wait_for(lambda: started.exists() and run_status(m, 1)["state"] == "running", what="the run")
        version = releases.profile("25.15.12").api_version
        assert signed_request(local, "DELETE", f"/session/{m.session_id}", version=version).status_code == 200
        _, stderr = runner.communicate(timeout=90)
        assert runner.returncode != 0 and b"lost track of its runs" not in stderr, stderr

        def ended() -> bool:  # a user goes on working: the mount's next listing meets the end
            try:
                os.listdir(m.path / "sub-that-is-not-there")
            except OSError:
                pass
            return bool(m.status()["remote"]["terminated"])

        wait_for(ended, 60, "the mount to see the session ended")
        assert (m.path / "kept.txt").read_text() == "kept\n"  # what is cached still reads
    finally:
        m.stop()
