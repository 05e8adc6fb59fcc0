"""The workloads, each measured the same way on every target.

A workload prepares what it needs without the clock (copying its data in,
dropping caches), then times one shell command, the same for every target.
Each figure is run once to warm up and then ``runs`` times; for baifs every
run also records the session API requests per endpoint (from the server's
counters) that it cost.

"Durable" means on the remote side: ``sync DIR`` fsyncs the directory,
which a baifs mount answers by uploading everything pending (``sync``
without an argument never reaches a FUSE file system), and sshfs and a local
directory answer as they always do.
"""

from __future__ import annotations

import hashlib
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .peers import FOLDER, Baifs, Target

NEEDLE = "needle-7f3a9c"
#: The mount's default --dir-cache-time: a directory made in the session shows after it.
DIR_CACHE_SECONDS = 5


@dataclass
class Dataset:
    """What the workloads copy in, generated once (deterministically) outside every target."""

    root: Path
    files: int
    big_mb: int

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def edit_file(self) -> Path:
        return self.root / "edit.txt"

    @property
    def big_file(self) -> Path:
        return self.root / "big.bin"

    def make(self) -> None:
        marker = self.root / f".made-{self.files}-{self.big_mb}"
        if marker.exists():
            return
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        rng = random.Random(20261125)
        for index in range(self.files):
            directory = self.tree / f"dir{index % 20:02d}"
            directory.mkdir(parents=True, exist_ok=True)
            size = rng.randint(4 * 1024, 64 * 1024)
            lines = [f"{index:05d} {rng.getrandbits(200):x}" for _ in range(size // 64 + 1)]
            if index % 97 == 0:
                lines[len(lines) // 2] = f"here is the {NEEDLE}"
            (directory / f"file{index:05d}.txt").write_bytes(("\n".join(lines) + "\n").encode()[:size])
        self.edit_file.write_text("".join(f"line {n:06d} of the file that vim edits\n" for n in range(2600)))
        with open(self.big_file, "wb") as handle:
            for _ in range(self.big_mb):
                handle.write(rng.randbytes(1024 * 1024))
        marker.touch()


@dataclass
class Figure:
    """One measured line: a workload on one target at one latency."""

    key: str
    label: str
    target: str
    latency_ms: float
    seconds: list[float] = field(default_factory=list)
    requests: list[dict[str, int]] = field(default_factory=list)
    note: str = ""


def sh(command: str, cwd: Path | None = None) -> None:
    finished = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=3600)
    if finished.returncode != 0:
        raise RuntimeError(
            f"{command!r} failed ({finished.returncode}):\n{finished.stdout}\n{finished.stderr}"
        )


def request_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    if before is None or after is None:
        return {}
    keys = (set(before) | set(after)) - {"counters"}
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys) if after.get(k, 0) != before.get(k, 0)
    }


class Bench:
    """Runs the workloads on one target at one latency and collects its figures."""

    def __init__(
        self, target: Target, data: Dataset, latency_ms: float, runs: int, log: Callable[[str], None]
    ) -> None:
        self.target = target
        self.data = data
        self.latency_ms = latency_ms
        self.runs = runs
        self.log = log
        self.figures: list[Figure] = []

    @property
    def root(self) -> Path:
        return self.target.root

    def measure(
        self,
        key: str,
        label: str,
        command: Callable[[int], str],
        prepare: Callable[[int], None] | None = None,
        check: Callable[[int], None] | None = None,
    ) -> Figure:
        """Warm up once, then time ``command`` ``runs`` times; ``prepare`` runs before each, untimed."""
        figure = Figure(key, label, self.target.name, self.latency_ms)
        for run in range(self.runs + 1):
            if prepare is not None:
                prepare(run)
            before = self.target.requests()
            started = time.perf_counter()
            sh(command(run), cwd=self.root)
            elapsed = time.perf_counter() - started
            after = self.target.requests()
            if check is not None:
                check(run)
            if run == 0:
                continue
            figure.seconds.append(elapsed)
            if isinstance(self.target, Baifs):
                figure.requests.append(request_delta(before, after))
        self.log(f"  {self.target.name:6} {self.latency_ms:4g} ms  {label}: {_summary(figure.seconds)}")
        self.figures.append(figure)
        return figure

    def sync(self) -> str:
        return f"sync {shlex.quote(str(self.root))}"

    # -- the workloads --------------------------------------------------------

    def copy_tree(self) -> None:
        """1. Copy the tree in, then sync: until durable on the remote."""
        source = shlex.quote(str(self.data.tree))
        self.measure(
            "copy",
            f"1. copy {self.data.files} files into the mount, then sync",
            lambda run: f"cp -r {source} copy-{run} && {self.sync()}",
            check=lambda run: self._check_files(self.target.remote / f"copy-{run}") if run == 0 else None,
        )

    def _check_files(self, directory: Path) -> None:
        """All the tree's files arrived in ``directory`` (on the remote side)."""
        count = sum(1 for path in directory.rglob("*") if path.is_file())
        if count != self.data.files:
            raise RuntimeError(
                f"{self.target.name}: {count} files arrived in {directory}, not {self.data.files}"
            )

    def listing_and_grep(self) -> None:
        """2 and 3. ls -lR and grep -r of the tree, cold (remounted, caches dropped) and warm."""
        sh(f"cp -r {shlex.quote(str(self.data.tree))} tree && {self.sync()}", cwd=self.root)
        ls, grep = "ls -lR tree > /dev/null", f"grep -r -l {NEEDLE} tree > /dev/null"
        self.measure("ls-cold", "2. ls -lR, cold", lambda run: ls, prepare=lambda run: self.target.cold())
        self.measure("ls-warm", "2. ls -lR, warm", lambda run: ls, prepare=lambda run: sh(ls, cwd=self.root))
        self.measure(
            "grep-cold", "3. grep -r, cold", lambda run: grep, prepare=lambda run: self.target.cold()
        )
        self.measure(
            "grep-warm", "3. grep -r, warm", lambda run: grep, prepare=lambda run: sh(grep, cwd=self.root)
        )

    def vim_saves(self) -> None:
        """4. 20 edit-save cycles of a 100 KB file with vim -es, then sync."""
        sh(f"cp {shlex.quote(str(self.data.edit_file))} edit.txt && {self.sync()}", cwd=self.root)
        vim = "vim -es -N -u NONE -i NONE -c 'set backupskip=' -c 'normal Goedited' -c wq edit.txt"
        self.measure(
            "vim",
            "4. 20 vim edit-save cycles, then sync",
            lambda run: f"{'; '.join([vim] * 20)} && {self.sync()}",
        )

    def git(self) -> None:
        """5. git status (warm) in a repository of the tree; git add -A && git commit of 20 changed files."""
        git = "git -c user.name=bench -c user.email=bench@example.com -c init.defaultBranch=main"
        sh(
            f"cp -r {shlex.quote(str(self.data.tree))} repo && cd repo && {git} init -q && {git} add -A "
            f"&& {git} commit -q -m import && {self.sync()}",
            cwd=self.root,
        )
        status = f"cd repo && {git} status --porcelain > /dev/null"
        self.measure(
            "git-status",
            "5. git status, warm",
            lambda run: status,
            prepare=lambda run: sh(status, cwd=self.root),
        )

        def change(run: int) -> None:
            files = sorted((self.root / "repo").glob("dir*/file*.txt"))[:20]
            for path in files:
                with open(path, "a") as handle:
                    handle.write(f"change {run}\n")
            sh(self.sync(), cwd=self.root)

        self.measure(
            "git-commit",
            "5. git add -A && git commit (20 changed files), then sync",
            lambda run: f"cd repo && {git} add -A && {git} commit -q -m change-{run} && {self.sync()}",
            prepare=change,
        )

    def big_file(self) -> None:
        """6. Write a large file and sync; read it back cold; read its first 4 KB cold."""
        size = f"{self.data.big_mb} MB"
        source = shlex.quote(str(self.data.big_file))
        expected = hashlib.sha256(self.data.big_file.read_bytes()).hexdigest()

        def check(run: int) -> None:
            if run == 0:
                landed = (self.target.remote / "big-0.bin").read_bytes()
                if hashlib.sha256(landed).hexdigest() != expected:
                    raise RuntimeError(f"{self.target.name}: the {size} file arrived damaged")

        self.measure(
            "big-write",
            f"6. write a {size} file, then sync",
            lambda run: f"cp {source} big-{run}.bin && {self.sync()}",
            check=check,
        )
        cold = lambda run: self.target.cold()  # noqa: E731
        self.measure(
            "big-read",
            f"6. read the {size} file, cold",
            lambda run: "cat big-0.bin > /dev/null",
            prepare=cold,
        )
        self.measure(
            "big-head",
            "6. read the first 4 KB of it, cold",
            lambda run: "head -c 4096 big-0.bin > /dev/null",
            prepare=cold,
        )

    def runs_overhead(self) -> None:
        """7. A `true` batch run through baifs run, and the same execution through the API client directly."""
        assert isinstance(self.target, Baifs)
        python = shlex.quote(sys.executable)
        self.measure(
            "run-baifs",
            "7. baifs run -- true",
            lambda run: f"{python} -m baifs run {shlex.quote(str(self.root))} -- true",
        )
        environment = self.target.environment
        keys = " ".join(
            f"{name}={shlex.quote(environment[name])}"
            for name in ("BACKEND_ENDPOINT", "BACKEND_ACCESS_KEY", "BACKEND_SECRET_KEY")
        )
        session = self.target.server.session_id if self.target.server else ""
        bench_dir = shlex.quote(str(Path(__file__).resolve().parent.parent))
        self.measure(
            "run-direct",
            "7. the same run through the API client (a python process)",
            lambda run: f"cd {bench_dir} && {keys} {python} -m bench.direct_run {session}",
        )

    def folder_copy(self) -> None:
        """8. Copy the tree into the session's virtual folder, then sync: staged, then placed by a run."""
        assert isinstance(self.target, Baifs) and self.target.server is not None
        folder = self.target.server.folder
        source = shlex.quote(str(self.data.tree))
        name = f"copy-{self.latency_ms:g}"
        self.measure(
            "folder-copy",
            f"8. copy {self.data.files} files into a virtual folder, then sync",
            lambda run: f"cp -r {source} {FOLDER}/{name}-{run} && {self.sync()}",
            check=lambda run: self._check_files(folder / f"{name}-0") if run == 0 else None,
        )

    def beside_a_run(self) -> None:
        """9. Five operations that need a script: with no run going, then while the mount's run goes.

        rm -r of 100 files, mv of a directory, mkdir, a 5 MB write (each
        then synced: the time until the session has it), and a cold read of
        a 20 MB file (created in the session, never read through the mount).
        """
        assert isinstance(self.target, Baifs)
        medium = self.data.root / "medium.bin"
        if not medium.exists():
            with open(self.data.big_file, "rb") as big:
                medium.write_bytes(big.read(5 * 1024 * 1024))
        reads = f"reads-{self.latency_ms:g}"
        (self.target.remote / reads).mkdir(exist_ok=True)
        with open(self.data.big_file, "rb") as big:
            chunk = big.read(20 * 1024 * 1024)
        for condition in ("idle", "run"):
            for run in range(self.runs + 1):
                (self.target.remote / reads / f"{condition}-{run}.bin").write_bytes(chunk[run:] + chunk[:run])
        time.sleep(DIR_CACHE_SECONDS + 1)  # the mount sees the new directory
        for condition in ("idle", "run"):
            runner = self._long_run() if condition == "run" else None
            try:
                self._five_operations(condition, reads, medium)
            finally:
                if runner is not None:
                    runner.send_signal(signal.SIGINT)
                    runner.wait(120)

    def _five_operations(self, condition: str, reads: str, medium: Path) -> None:
        during = "during a long run" if condition == "run" else "no run going"
        sync = self.sync()
        tag = f"{condition}-{self.latency_ms:g}"

        def files(run: int) -> None:
            sh(
                f"mkdir rm-{tag}-{run} && for i in $(seq 100); do echo $i > rm-{tag}-{run}/f$i; "
                f"done && mkdir mv-{tag}-{run} && echo x > mv-{tag}-{run}/f && {sync}",
                cwd=self.root,
            )

        self.measure(
            f"rm-{condition}",
            f"9. rm -r of 100 files, then sync ({during})",
            lambda run: f"rm -r rm-{tag}-{run} && {sync}",
            prepare=files,
        )
        self.measure(
            f"mv-{condition}",
            f"9. mv of a directory, then sync ({during})",
            lambda run: f"mv mv-{tag}-{run} moved-{tag}-{run} && {sync}",
        )
        self.measure(
            f"mkdir-{condition}",
            f"9. mkdir, then sync ({during})",
            lambda run: f"mkdir -p made-{tag}-{run}/inner && {sync}",
        )
        self.measure(
            f"write-{condition}",
            f"9. write 5 MB, then sync ({during})",
            lambda run: f"cp {shlex.quote(str(medium))} w-{tag}-{run}.bin && {sync}",
        )
        self.measure(
            f"read-{condition}",
            f"9. read a 20 MB file, cold ({during})",
            lambda run: f"cat {reads}/{condition}-{run}.bin > /dev/null",
        )

    def _long_run(self) -> subprocess.Popen[bytes]:
        """``baifs run -- sleep 3600`` from the mount, once it holds the session's execution slot."""
        assert isinstance(self.target, Baifs)
        argv = [sys.executable, "-m", "baifs", "run", str(self.root), "--", "sleep 3600"]
        runner = subprocess.Popen(
            argv, env=self.target.environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while '"running"' not in _latest_run_status(self.root):
            if runner.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the long run did not start")
            time.sleep(0.1)
        return runner


def _latest_run_status(root: Path) -> str:
    try:
        return (root / ".run").read_text()
    except OSError:
        return ""


def _summary(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds):.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f})"
