"""The chaos workload: real work on a mount while requests fail, then the session against a reference.

Run it with ``bash bench/run --chaos`` (or ``.venv/bin/python -m bench.chaos``).
For each fault rate (0 first, for the baseline) and each seed it starts a
fresh `baifs serve`, the fault proxy of the tests (`tests/faultproxy.py`)
in front of it, and a baifs mount through the proxy. The proxy answers a
share of every endpoint's requests with 502/503, resets the connection
before forwarding, or resets it after the server acted (a third each), and
stalls a few past the client's timeout. Then, in the mount and in a local
reference directory alike:

reading back what the session held at the start (60 small files and a
12 MB one, compared byte for byte); then three rounds of copies of a tree, a
vim save (backup and rename), ``git init/add/commit``, ``rm -r``, ``mv`` of
directories, ``chmod``, symlinks, 5 MB files and once a 30 MB one, each
round ended by ``sync DIR``; and a ``baifs run`` that writes a file in the
session.

A step that fails (EIO after the mount's own retries) is tried again, as a
person would; every step is written to be repeatable. ``baifs umount`` runs
with the faults still on. Then the session's work directory is compared
with the reference: every file's content and mode, directories, symlinks
(git's index, which holds inode numbers and times, excepted), and ``git
fsck`` must pass in it.

Reported per run: whether it completed, the bytes lost (content missing or
different), daemon deaths, the workload's and umount's wall time and the
slowdown against the same seed without faults, retried steps, and the
faults injected. Results go to bench/results/chaos-*.json and, unless
``--no-docs``, into docs/performance.md between the chaos markers.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import report
from .peers import BENCH_ACCESS_KEY, BENCH_SECRET_KEY, BaifsServer, Processes, unmount, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
FAULT_PROXY = ROOT / "tests" / "faultproxy.py"
STEP_ATTEMPTS = 30
GIT_DATES = {"GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"


@dataclass
class Outcome:
    rate: float
    seed: int
    completed: bool = False
    workload_seconds: float = 0.0
    umount_seconds: float = 0.0
    umount_ok: bool = False
    daemon_deaths: int = 0
    lost_bytes: int = 0
    differences: list[str] = field(default_factory=list)
    retried_steps: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    git_fsck: bool = False
    #: files read through the mount with other content than the session held.
    misread: list[str] = field(default_factory=list)
    error: str = ""


class FaultProxy:
    """The tests' fault proxy as a process of the harness."""

    def __init__(self, processes: Processes, work: Path, upstream_port: int, seed: int) -> None:
        log = work / "proxy.log"
        argv = [sys.executable, str(FAULT_PROXY), "--upstream", f"http://127.0.0.1:{upstream_port}"]
        process = processes.start([*argv, "--seed", str(seed)], log)
        self.endpoint = wait_for_line(log, r"listening on (http://\S+)", process).group(1)

    def set(self, rate: float, seed: int) -> None:
        third = rate / 3
        rules = [
            {"endpoint": "*", "fault": "stall", "rate": rate / 100, "seconds": 40},
            {"endpoint": "*", "fault": "status", "status": 502, "rate": third / 2},
            {"endpoint": "*", "fault": "status", "status": 503, "rate": third / 2},
            {"endpoint": "*", "fault": "reset_before", "rate": third},
            {"endpoint": "*", "fault": "reset_after", "rate": third},
        ]
        httpx.put(
            self.endpoint + "/_faults", json={"rules": rules if rate else [], "seed": seed}
        ).raise_for_status()

    def injected(self) -> dict[str, int]:
        return dict(httpx.get(self.endpoint + "/_faults").json()["injected"])


class Workload:
    """The steps, each repeatable, applied to a directory (the mount, or the reference).

    Three rounds of writing work, each ended by ``sync DIR`` (everything on
    the session), after reading what a session's user had put there before.
    """

    ROUNDS = 3

    def __init__(self, root: Path, source: Path, on_retry: Callable[[str, BaseException], None]) -> None:
        self.root = root
        self.source = source
        self.on_retry = on_retry
        #: files read back with other content than the session holds.
        self.misread: list[str] = []

    def step(self, name: str, action: Callable[[], object]) -> None:
        for attempt in range(STEP_ATTEMPTS):
            try:
                action()
                return
            except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
                if isinstance(error, OSError) and error.errno == errno.ENOTCONN:  # the daemon died
                    raise
                self.on_retry(name, error)
                time.sleep(min(5.0, 0.5 * (attempt + 1)))
        action()

    def run(self, baifs_run: Callable[[], None], sync: Callable[[], None]) -> None:
        self.step("read what the session had", self.read_seeded)
        for number in range(self.ROUNDS):
            self.round(number)
            self.step(f"sync after round {number}", sync)
        self.step("baifs run", baifs_run)

    def read_seeded(self) -> None:
        """Read every file a session's user put there, and compare it with what was put."""
        seeded = self.source / "seeded"
        for path in sorted(seeded.rglob("*")):
            if path.is_file():
                relative = path.relative_to(self.source)
                if (self.root / relative).read_bytes() != path.read_bytes():
                    self.misread.append(str(relative))

    def round(self, number: int) -> None:
        root, source = self.root, self.source
        tree, copy = root / f"tree{number}", root / f"copy{number}"
        self.step("cp -r", lambda: _run(["cp", "-r", "-T", str(source / "tree"), str(tree)]))
        self.step("cp -r again", lambda: _run(["cp", "-r", "-T", str(source / "tree"), str(copy)]))
        self.step("vim save", lambda: self.vim_save(number))
        self.step("git commit", lambda: self.git(number))
        self.step("rm -r", lambda: shutil.rmtree(copy / "d3") if (copy / "d3").exists() else None)
        self.step("mv dir", lambda: _rename_once(copy / "d1", root / f"moved{number}"))
        self.step("mv dir into dir", lambda: _rename_once(copy / "d2", root / f"moved{number}" / "d2"))
        self.step("chmod", lambda: os.chmod(tree / "d0" / "f000.txt", 0o600))
        self.step("chmod dir", lambda: os.chmod(root / f"moved{number}", 0o700))
        self.step("symlink", lambda: _symlink_once(f"tree{number}/d0/f000.txt", root / f"link{number}"))
        self.step("dangling symlink", lambda: _symlink_once("nowhere", tree / "dangling"))
        self.step("5 MB file", lambda: _copy_whole(source / "five.bin", root / f"five{number}.bin"))
        if number == 0:
            big = root / "big" / "thirty.bin"
            self.step("30 MB file", lambda: _copy_whole(source / "thirty.bin", big))
            self.step("rename 30 MB", lambda: _rename_once(big, root / "big" / "renamed.bin"))

    def vim_save(self, number: int) -> None:
        target = self.root / "notes.txt"
        if number == 0 or not target.exists():
            target.write_text("first line\n" * 50)
        script = self.root.parent / f"vim-{self.root.name}.vim"
        script.write_text(f"set backup backupcopy=no backupskip= writebackup\nnormal Goround {number}\nwq\n")
        _run(
            ["vim", "-es", "-N", "-n", "-i", "NONE", "-u", "NONE", "-S", str(script), "notes.txt"],
            cwd=self.root,
        )

    def git(self, number: int) -> None:
        repo = self.root / "repo"
        repo.mkdir(exist_ok=True)
        (repo / "main.c").write_text(f"int main(void) {{ return {number}; }}\n")
        (repo / "README").write_text(f"chaos round {number}\n")
        env = {**os.environ, **GIT_DATES, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.root.parent)}
        who = ["-c", "user.name=chaos", "-c", "user.email=chaos@example.com"]
        _run(["git", "-C", str(repo), "init", "-q", "-b", "main"], env=env)
        _run(["git", "-C", str(repo), *who, "add", "-A"], env=env)
        log = subprocess.run(
            ["git", "-C", str(repo), "log", "--format=%s"], env=env, capture_output=True, text=True
        )
        if f"round {number}" not in log.stdout.splitlines():
            _run(["git", "-C", str(repo), *who, "commit", "-q", "-m", f"round {number}"], env=env)


def _run(argv: list[str], **kwargs: Any) -> None:
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=300, **kwargs)


def _rename_once(source: Path, target: Path) -> None:
    if source.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)


def _symlink_once(pointing: str, link: Path) -> None:
    if not link.is_symlink():
        os.symlink(pointing, link)


def _copy_whole(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def make_source(path: Path) -> None:
    """The data, once: a tree to copy, a 5 MB and a 30 MB file, and what the session holds at the start."""
    marker = path / ".made-2"
    if marker.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(20261127)
    for index in range(200):
        file = path / "tree" / f"d{index % 5}" / f"f{index:03d}.txt"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(rng.randbytes(rng.randint(100, 20_000)))
    for index in range(60):
        file = path / "seeded" / f"s{index % 3}" / f"g{index:02d}.dat"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(rng.randbytes(rng.randint(10, 50_000)))
    (path / "seeded" / "large.bin").write_bytes(rng.randbytes(12 * 1024 * 1024))
    (path / "five.bin").write_bytes(rng.randbytes(5 * 1024 * 1024))
    (path / "thirty.bin").write_bytes(rng.randbytes(30 * 1024 * 1024))
    marker.touch()


def tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every object under ``root``: kind, permission bits, content or link target (git's index aside)."""
    found: dict[str, tuple[str, int, bytes]] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not (directory == str(root) and d == ".baifs-tmp")]
        for name in subdirs + files:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            if relative == "repo/.git/index":
                continue
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", 0, os.fsencode(os.readlink(full)))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("dir", stat.S_IMODE(info.st_mode), b"")
            else:
                with open(full, "rb") as handle:
                    found[relative] = ("file", stat.S_IMODE(info.st_mode), handle.read())
    return found


def compare(reference: Path, session: Path) -> tuple[int, list[str]]:
    """Bytes lost (in the reference, not the same in the session) and every difference."""
    wanted, got = tree(reference), tree(session)
    lost, lines = 0, []
    for key in sorted(set(wanted) | set(got)):
        if wanted.get(key) != got.get(key):
            if key in wanted and wanted[key][0] == "file":
                have = got.get(key)
                lost += len(wanted[key][2]) if have is None or have[2] != wanted[key][2] else 0
            lines.append(f"{key}: reference {_brief(wanted.get(key))}, session {_brief(got.get(key))}")
    return lost, lines


def _brief(entry: tuple[str, int, bytes] | None) -> str:
    if entry is None:
        return "missing"
    kind, mode, data = entry
    return f"{kind} {mode:o} {len(data)} bytes"


def one_run(rate: float, seed: int, source: Path, work: Path) -> Outcome:
    outcome = Outcome(rate, seed)
    # A dead mount a killed run left behind would stop the clean-up.
    subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    processes = Processes()
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    try:
        server = BaifsServer.start(processes, work)
        proxy = FaultProxy(processes, work, server.port, seed)
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "XDG_"))}
        environment.update(
            BACKEND_ENDPOINT=proxy.endpoint,
            BACKEND_ACCESS_KEY=BENCH_ACCESS_KEY,
            BACKEND_SECRET_KEY=BENCH_SECRET_KEY,
            XDG_STATE_HOME=str(work / "home" / "state"),
            XDG_CACHE_HOME=str(work / "home" / "cache"),
        )
        for root in (server.work_dir, work / "reference"):  # what the session held before the mount
            shutil.copytree(source / "seeded", root / "seeded")
        log = work / "mount.log"
        argv = [sys.executable, "-m", "baifs", "mount", server.session_id, str(mountpoint), "--foreground"]
        daemon = processes.start([*argv, "--log-file", str(log)], work / "mount.out", env=environment)
        reaper = threading.Thread(target=daemon.wait, daemon=True)  # reaped at once, as init would
        reaper.start()
        deadline = time.monotonic() + 60
        while not (mountpoint / ".baifs-status").exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the mount did not come up")
            time.sleep(0.05)
        proxy.set(rate, seed)

        def retried(name: str, error: BaseException) -> None:
            outcome.retried_steps += 1
            print(f"chaos: rate {rate} seed {seed}: {name} failed ({error}); again", file=sys.stderr)

        def baifs_run() -> None:
            script = "echo made-by-run > run.txt"
            command = [sys.executable, "-m", "baifs", "run", str(mountpoint), "--", "sh", "-c", script]
            subprocess.run(command, env=environment, check=True, capture_output=True, timeout=300)

        def sync() -> None:
            descriptor = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

        reference = work / "reference"
        Workload(reference, source, lambda name, error: None).run(
            lambda: (reference / "run.txt").write_text("made-by-run\n"), lambda: None
        )
        workload = Workload(mountpoint, source, retried)
        started = time.monotonic()
        try:
            workload.run(baifs_run, sync)
        except OSError as error:
            outcome.error = f"the workload stopped: {error}"
        outcome.misread = workload.misread
        outcome.workload_seconds = time.monotonic() - started
        if daemon.poll() is not None:
            outcome.daemon_deaths += 1
        started = time.monotonic()
        umount = subprocess.run(
            [sys.executable, "-m", "baifs", "umount", str(mountpoint)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=900,
        )
        outcome.umount_seconds = time.monotonic() - started
        outcome.umount_ok = umount.returncode == 0
        if not outcome.umount_ok:
            outcome.error = outcome.error or f"umount failed: {umount.stderr.strip()[-300:]}"
        try:
            daemon.wait(600)
        except subprocess.TimeoutExpired:
            outcome.error = outcome.error or "the daemon did not exit after umount"
        if daemon.returncode not in (0, None):
            outcome.daemon_deaths += 1
        outcome.injected = proxy.injected()
        outcome.requests = sum(v for k, v in server.counters().items() if k not in ("batch_runs", "counters"))
        outcome.lost_bytes, outcome.differences = compare(reference, server.work_dir)
        fsck = subprocess.run(
            ["git", "-C", str(server.work_dir / "repo"), "fsck", "--strict"], capture_output=True
        )
        outcome.git_fsck = fsck.returncode == 0
        outcome.completed = (
            not outcome.error and outcome.umount_ok and not outcome.differences and not outcome.misread
        )
    except Exception as error:  # noqa: BLE001 - reported in the outcome
        outcome.error = f"{type(error).__name__}: {error}"
    finally:
        unmount(mountpoint)
        processes.stop_all()
    return outcome


def table(outcomes: list[Outcome], settings: dict[str, Any]) -> str:
    baseline = {o.seed: o.workload_seconds + o.umount_seconds for o in outcomes if o.rate == 0}
    plain = next(iter(baseline.values()), 0.0)
    lines = [
        BEGIN,
        f"Measured {settings['date']} with `{settings['command']}` ({settings['seeds']} seeds per rate).",
        "",
        "| fault rate | seed | completed | lost bytes | daemon deaths | workload | umount | slowdown | "
        "retried steps | faults injected | requests | git fsck |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        total = o.workload_seconds + o.umount_seconds
        slowdown = f"{total / plain:.2f}×" if plain else "n/a"
        fsck = "ok" if o.git_fsck else "FAILED"
        lines.append(
            f"| {o.rate:.0%} | {o.seed} | {'yes' if o.completed else 'NO'} | {o.lost_bytes:,} | "
            f"{o.daemon_deaths} | {o.workload_seconds:.1f} s | {o.umount_seconds:.1f} s | {slowdown} | "
            f"{o.retried_steps} | {sum(o.injected.values())} | {o.requests} | {fsck} |"
        )
    failures = [o for o in outcomes if not o.completed]
    for o in failures:
        lines.append(
            f"\nRate {o.rate:.0%}, seed {o.seed}: {o.error or 'differences'}; " + "; ".join(o.differences[:5])
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0,0.1,0.3", help="fault rates, the first one the baseline")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per rate (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/baifs-chaos"), help="scratch directory")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    source = args.work / "source"
    make_source(source)
    outcomes = []
    for rate in rates:
        for seed in range(1, args.seeds + 1) if rate else [0]:
            print(f"chaos: rate {rate:.0%}, seed {seed}", file=sys.stderr, flush=True)
            outcome = one_run(rate, seed, source, args.work / "run")
            print(f"chaos: {json.dumps(outcome.__dict__)[:600]}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    settings = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "bash bench/run --chaos" + (f" --seeds {args.seeds}" if args.seeds != 3 else ""),
        "seeds": args.seeds,
    }
    text = table(outcomes, settings)
    print(text)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"chaos-{stamp}.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=2))
    if not args.no_docs:
        report.replace_block(ROOT / "docs" / "performance.md", BEGIN, END, text)
    return 0 if all(o.completed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
