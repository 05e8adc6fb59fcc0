"""`baifs serve` confines sessions like containers: each escape an attacker would try, tried.

A batch run may try to reach the host through the server's /proc entry, read
the server's environment, other sessions' files or the keypair, or race the
server's file requests with symlinks; a client may send bodies far over the
manager's limits, and names meant to break out. Each attempt here is made
for real against a real `baifs serve`, and must fail without harm.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from conftest import open_session
from support import TEST_SECRET_KEY, LocalServer, run_batch, signed_request, start_server

from baifs.api.archive import single_member
from baifs.api.client import SessionClient, UploadFile
from baifs.api.errors import APIError

pytestmark = pytest.mark.timeout(120)
Remote = tuple[SessionClient, Path]


@pytest.fixture(scope="module")
def confined() -> Iterator[LocalServer]:
    """A server of this module's own, with a keypair file in its data directory (like a generated one).

    Its data lives under /var/tmp, not /tmp: a sandbox that merely hid /tmp and
    /home (as the default ~/.local/share of root is not) must not pass.
    """
    directory = Path(tempfile.mkdtemp(prefix="baifs-confined-", dir="/var/tmp"))
    server = start_server(directory)
    (server.data_dir / "keypair.toml").write_text(f'secret_key = "{TEST_SECRET_KEY}"\n')
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def session(confined: LocalServer) -> AsyncIterator[Remote]:
    connection, client, session_id = await open_session(confined)
    work = confined.work_dir(session_id)
    async with connection:
        yield client, work


# -- runs ------------------------------------------------------------------------


async def test_a_run_cannot_reach_the_host_through_the_servers_proc_entry(
    confined: LocalServer, session: Remote, tmp_path: Path
) -> None:
    client, _ = session
    pid = confined.process.pid
    target = Path("/var/tmp") / f"baifs-escape-{secrets.token_hex(4)}"
    code, out, err = await run_batch(
        client,
        f"echo escaped > /proc/{pid}/root{target}; cat /proc/{pid}/environ; "
        f"ls /proc/{pid}/root/ ; cat /proc/1/environ; echo; ls /proc | grep -c '^[0-9]'",
    )
    assert not target.exists(), "a run wrote a file on the host"
    assert TEST_SECRET_KEY not in out + err, "a run read the server's secret key"
    assert int(out.strip().splitlines()[-1]) <= 4, "a run sees processes outside its own"


async def test_a_run_sees_neither_the_servers_data_nor_other_sessions(
    confined: LocalServer, session: Remote
) -> None:
    client, work = session
    connection, other, session_id = await open_session(confined)
    other_work = confined.work_dir(session_id)
    async with connection:
        await other.upload([UploadFile.of("secret.txt", b"other session's secret\n")])
    assert (other_work / "secret.txt").exists()
    code, out, err = await run_batch(
        client,
        f"cat {other_work}/secret.txt; cat {confined.data_dir}/keypair.toml; "
        f"ls {confined.data_dir}; ls /root /home; ls /tmp | wc -l; echo done",
    )
    assert "other session's secret" not in out
    assert TEST_SECRET_KEY not in out + err
    assert "sessions.json" not in out
    assert out.strip().splitlines()[-2:] == ["0", "done"], out
    code, out, _ = await run_batch(client, "touch /usr/escape /etc/escape 2>&1; echo $?; pwd; echo $HOME")
    assert out.split()[-3:] == ["1", "/home/work", "/home/work"], out
    assert not Path("/usr/escape").exists() and not Path("/etc/escape").exists()


async def test_a_run_has_no_capabilities_no_terminal_and_its_own_namespaces(session: Remote) -> None:
    client, _ = session
    code, out, _ = await run_batch(
        client,
        "grep -E '^Cap(Eff|Prm)' /proc/self/status; readlink /proc/self/ns/pid; "
        "cat /proc/self/stat; head -c 0 /etc/shadow 2>/dev/null && cat /etc/shadow | wc -c",
    )
    lines = out.splitlines()
    assert lines[0].split()[1] == lines[1].split()[1] == "0000000000000000", out
    assert lines[2] != os.readlink("/proc/self/ns/pid"), "a run shares the host's PID namespace"
    fields = lines[3].rpartition(")")[2].split()
    assert fields[3] != str(os.getsid(0)), "a run shares a session (and terminal) with the server"
    assert lines[-1].strip() in ("0", "") or len(lines) == 4, "a run read /etc/shadow"


# -- the files of a session, raced -------------------------------------------------


async def test_uploads_and_downloads_stay_inside_while_a_run_swaps_symlinks(
    session: Remote, tmp_path: Path
) -> None:
    client, work = session
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside content\n")
    await client.upload([UploadFile.of("d/secret", b"inside content\n")])
    swap = (
        "end=$(($(date +%s) + 4)); while [ $(date +%s) -lt $end ]; do "
        f"rm -rf d; ln -s {outside} d; rm -f d; mkdir d; echo inside content > d/secret; done"
    )
    served: list[bytes] = []
    refused = 0

    async def attack() -> None:
        nonlocal refused
        deadline = trio.current_time() + 3.5
        index = 0
        while trio.current_time() < deadline:
            batch = [UploadFile.of(f"d/f{index + i}", b"x") for i in range(5)]
            index += 5
            for call in (
                lambda batch=batch: client.upload(batch, verify=False),
                lambda: client.download(["d/secret"]),
                lambda: client.download_single("d/secret"),
                lambda: client.list_dir("d"),
            ):
                try:
                    answer = await call()
                except (APIError, OSError):
                    refused += 1
                    continue
                if isinstance(answer, list) and answer and isinstance(answer[0], memoryview):
                    served.append(single_member(answer[0])[1])
                elif isinstance(answer, bytes):
                    served.append(answer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_batch, client, swap)
        await trio.sleep(0.3)
        await attack()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"], "uploads landed outside the session"
    assert all(content != b"outside content\n" for content in served), "downloads served outside content"
    assert served, "nothing was downloaded at all"


async def test_a_long_run_lives_past_idle_threads_and_dies_with_the_server(tmp_path: Path) -> None:
    """A parent-death signal follows the forking thread: a run must not die when a worker thread retires."""
    server = start_server(tmp_path)
    try:
        connection, client, session_id = await open_session(server)
        async with connection:
            code, out, _ = await run_batch(client, "sleep 12; echo lived")
            assert (code, out) == (0, "lived\n")
            with trio.move_on_after(2):
                await run_batch(client, "echo $$ > pid; exec sleep 300")
            pid_file = server.work_dir(session_id) / "pid"
            assert pid_file.exists()
            sleepers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _command(p) == "sleep300"]
            assert sleepers, "the run is not going"
            server.process.kill()
            server.process.wait(10)
            for _ in range(150):  # 15 s: a loaded machine tears the run's namespace down slowly
                if not any(p.exists() and _command(p) == "sleep300" for p in sleepers):
                    break
                await trio.sleep(0.1)
            else:
                raise AssertionError("the run outlived the server")
    finally:
        server.stop()


def _command(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b"").decode(errors="replace")
    except OSError:
        return ""


# -- request bodies -------------------------------------------------------------------


def server_rss_kb(server: LocalServer) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


async def test_oversized_bodies_are_refused_early_and_memory_stays_flat(
    confined: LocalServer, session: Remote
) -> None:
    client, _ = session
    before = server_rss_kb(confined)

    def chunks(total: int) -> Iterator[bytes]:
        block = b"x" * (1 << 20)
        for _ in range(total >> 20):
            yield block

    started = time.monotonic()
    for method, target in (
        ("POST", f"/session/{client.id_or_name}"),
        ("GET", f"/session/{client.id_or_name}/files"),
    ):
        try:
            answer = signed_request(confined, method, target, content=chunks(200 << 20))
            assert answer.status_code == 400 and "too large" in answer.text, answer.text
        except OSError:
            pass  # refused while it was still being sent: the connection was closed on it
    declared = signed_request(
        confined, "POST", f"/session/{client.id_or_name}", content=b"{" + b" " * (2 << 20)
    )
    assert declared.status_code == 400 and "too large" in declared.text
    big_part = [("src", ("big.bin", b"x" * (3 << 20), "application/octet-stream"))]
    upload = signed_request(confined, "POST", f"/session/{client.id_or_name}/upload", files=big_part)
    assert upload.status_code == 400 and "Too large file" in upload.text
    long_header = [("src", ("n" * (1 << 20), b"x", "application/octet-stream"))]
    upload = signed_request(confined, "POST", f"/session/{client.id_or_name}/upload", files=long_header)
    assert upload.status_code == 400 and "Maximum header size exceeded" in upload.text, upload.text
    assert time.monotonic() - started < 30
    assert server_rss_kb(confined) - before < 40 * 1024, "the server held an oversized body in memory"


# -- hostile names ---------------------------------------------------------------------

HOSTILE = [
    "with space.txt",
    "quote'double\".txt",
    "$(touch pwned).txt",
    "`touch pwned2`",
    "new\nline",
    "-n",
    "dir with space/nested -x",
    "ünïcödé/文件",
    "tab\tname",
    "a" * 255,
    "bytes-\udcff\udcfe",
    "%2e%2e/x",  # the client percent-encodes its names, so this is a directory named %2e%2e
]
#: Names meant to break out.
ESCAPES = [
    "../outside.txt",
    "/etc/passwd",
    "a/../../outside.txt",
    "..",
    "/home/work/../x",
    "./../y",
]


async def test_hostile_names_stay_names_on_every_file_endpoint(
    confined: LocalServer, session: Remote, tmp_path: Path
) -> None:
    client, work = session
    for name in HOSTILE:
        content = f"content of {name!r}\n".encode("utf-8", "surrogateescape")
        on_disk = Path(os.fsdecode(os.path.join(os.fsencode(work), os.fsencode(name))))
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # no multipart file name can carry it: a run makes it
            on_disk.write_bytes(content)
        else:
            await client.upload([UploadFile.of(name, content)])
        assert on_disk.read_bytes() == content, name
        parent, _, base = name.rpartition("/")
        assert base in {entry.name for entry in await client.list_dir(parent)}, name
        assert single_member((await client.download([name]))[0])[1] == content, name
        assert await client.download_single(name) == content, name
    assert not (work / "pwned").exists() and not (work / "pwned2").exists()
    before = set(os.listdir(work.parent))
    for escape in ESCAPES:
        with pytest.raises((APIError, ValueError)):
            await client.upload([UploadFile(escape, 1, lambda: b"x")], verify=False)
        for call in (client.download([escape]), client.download_single(escape), client.list_dir(escape)):
            try:
                answer = await call
            except (APIError, OSError):
                continue
            assert escape in ("..", "/home/work/../x", "./../y") or not answer, escape
    # A name the server percent-decodes into an escape (httpx writes it as it is) is refused too.
    raw = signed_request(
        confined,
        "POST",
        f"/session/{client.id_or_name}/upload",
        files=[("src", ("%2e%2e/x", b"x", "text/plain"))],
    )
    assert raw.status_code == 500 and "outside" in raw.text, raw.text
    assert set(os.listdir(work.parent)) == before
    assert not Path("/etc/passwd").read_text().startswith("x")


# -- no bubblewrap ------------------------------------------------------------------------


def test_without_bubblewrap_the_server_refuses_unless_told(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with the tools the server needs, but no bwrap
    bin_dir.mkdir()
    for tool in ("sh", "setpriv"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir)}
    argv = [sys.executable, "-m", "baifs", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    refused = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "--unsafe-no-sandbox" in refused.stderr and "Traceback" not in refused.stderr
    unsafe = start_server(tmp_path / "unsafe", extra=("--unsafe-no-sandbox",), env=env)
    try:
        assert "run directly on this host" in unsafe.log_path.read_text()
    finally:
        unsafe.stop()
