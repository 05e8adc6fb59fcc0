"""The scale workload: tree walks and reads of trees made in the session, at 3,000 to 30,000 files.

Run it with ``bash bench/run --scale`` (or ``.venv/bin/python -m bench.scale``).
For each size N it makes, on each target's remote side and without the
clock (so nothing is cached by the mount), a tree of N small files in N/100
directories, one directory of 2N/3 entries, and a git repository of N/3
files committed there. Then, on baifs, sshfs and a native directory, at
each latency, it times:

- ``find`` over the tree, cold (freshly mounted, page cache dropped);
- ``ls -l`` of the big directory, cold;
- ``grep -r`` over the tree, cold, then again warm;
- ``du -s`` of the tree, cold;
- ``git status`` in the repository, cold.

Each figure is measured once: a cold figure cannot be warmed up, and the
large ones take minutes on sshfs at 20 ms. For baifs it also records the
daemon's CPU seconds (user and system, from /proc), the requests per
endpoint (from the server's counters) and the daemon's peak RSS per size.
Results go to bench/results/scale-*.json and, unless ``--no-docs``, into
docs/performance.md between the scale markers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import report
from .peers import (
    Baifs,
    BaifsServer,
    Processes,
    Sshd,
    Target,
    add_common_arguments,
    require_prerequisites,
    targets_at,
    unmount,
)
from .workloads import Figure, request_delta, sh

ROOT = Path(__file__).resolve().parent.parent
NEEDLE = "needle-5c81e0"
GIT = "git -c user.name=bench -c user.email=bench@example.com -c init.defaultBranch=main"
#: Targets: daemon CPU per file at the largest size within this factor of the smallest.
CPU_GROWTH_LIMIT = 1.3
#: Targets: the daemon's peak RSS grows at most this much per known file.
RSS_PER_FILE_LIMIT = 2048


@dataclass
class ScaleFigure(Figure):
    files: int = 0
    #: the baifs daemon's CPU seconds over the figure (user + system).
    cpu_seconds: list[float] = field(default_factory=list)


def make_data(root: Path, files: int) -> Path:
    """The tree, the big directory and the repository for one size, generated once (deterministically)."""
    data = root / f"scale-{files}"
    marker = data / ".made"
    if marker.exists():
        return data
    shutil.rmtree(data, ignore_errors=True)
    rng = random.Random(files)
    for index in range(files):
        directory = data / "tree" / f"dir{index // 100:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{index:06d} {rng.getrandbits(160):x}" for _ in range(rng.randint(4, 40))]
        if index % 101 == 0:
            lines[len(lines) // 2] = f"here is the {NEEDLE}"
        (directory / f"file{index:06d}.txt").write_text("\n".join(lines) + "\n")
    big = data / "big"
    big.mkdir()
    for index in range(files * 2 // 3):
        (big / f"entry{index:06d}").write_text(f"{index}\n")
    repo = data / "repo"
    for index in range(files // 3):
        directory = repo / f"pkg{index // 100:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"module{index:06d}.py").write_text(f"VALUE = {rng.getrandbits(64)}\n" * 8)
    sh(f"{GIT} init -q && {GIT} add -A && {GIT} commit -q -m import", cwd=repo)
    marker.touch()
    return data


def place(data: Path, remote: Path) -> None:
    """Put a size's data on a target's remote side, as something in the session would have made it."""
    for name in ("tree", "big", "repo"):
        shutil.rmtree(remote / name, ignore_errors=True)
    subprocess.run(["cp", "-a", f"{data}/tree", f"{data}/big", f"{data}/repo", str(remote)], check=True)
    # Owned like the rest of the remote directory (the session's container user, for baifs).
    subprocess.run(["chown", "-R", f"--reference={remote}", str(remote)], check=True)


class ScaleBench:
    """The workload's figures on one target at one latency for one size."""

    def __init__(self, target: Target, files: int, latency_ms: float, log: Callable[[str], None]) -> None:
        self.target = target
        self.files = files
        self.latency_ms = latency_ms
        self.log = log
        self.figures: list[ScaleFigure] = []
        self.peak_rss_kb = 0

    def measure(self, key: str, label: str, command: str, *, cold: bool = True) -> None:
        target = self.target
        if cold:
            target.cold()
        figure = ScaleFigure(key, label, target.name, self.latency_ms, files=self.files)
        cpu_before = target.cpu_seconds() if isinstance(target, Baifs) else None
        before = target.requests()
        started = time.perf_counter()
        sh(command, cwd=target.root)
        figure.seconds.append(time.perf_counter() - started)
        after = target.requests()
        if isinstance(target, Baifs):
            figure.requests.append(request_delta(before, after))
            assert cpu_before is not None
            figure.cpu_seconds.append(target.cpu_seconds() - cpu_before)
            self.peak_rss_kb = max(self.peak_rss_kb, target.peak_rss_kb() or 0)
        cpu = f", daemon CPU {figure.cpu_seconds[0]:.1f} s" if figure.cpu_seconds else ""
        self.log(
            f"  {target.name:6} {self.latency_ms:4g} ms {self.files:6} files  {label}: "
            f"{figure.seconds[0]:.2f} s{cpu}"
        )
        self.figures.append(figure)

    def run(self) -> None:
        grep = f"grep -r -l {NEEDLE} tree > /dev/null"
        self.measure("find", "find, cold", "find tree > /dev/null")
        self.measure(
            "ls-big", "ls -l of the big directory (2/3 as many entries), cold", "ls -l big > /dev/null"
        )
        self.measure("grep-cold", "grep -r, cold", grep)
        self.measure("grep-warm", "grep -r, warm", grep, cold=False)
        self.measure("du", "du -s, cold", "du -s tree > /dev/null")
        self.measure(
            "git-status",
            "git status in the repository (1/3 as many files), cold",
            f"cd repo && {GIT} status --porcelain > /dev/null",
        )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run --scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 3,000 and 10,000 only")
    parser.add_argument("--sizes", help="files per tree, comma-separated (default: 3000,10000,30000)")
    parser.add_argument("--targets", default="native,sshfs,baifs", help="which targets (default: all three)")
    add_common_arguments(parser)
    return parser.parse_args()


def main() -> int:
    args = parse()
    require_prerequisites()
    sizes = [int(v) for v in (args.sizes or ("3000,10000" if args.quick else "3000,10000,30000")).split(",")]
    latencies: list[float] = args.latencies
    chosen = args.targets.split(",")
    command = "bash bench/run --scale" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-docs")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    settings = {
        "sizes": sizes,
        "latencies": latencies,
        "targets": chosen,
        "command": command,
        "started": started,
    }
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    datasets = {}
    for files in sizes:
        log(f"bench: generating {files} files")
        datasets[files] = make_data(work, files)

    processes = Processes()
    figures: list[ScaleFigure] = []
    rss: dict[tuple[float, int], int] = {}
    mounts: list[Path] = []
    clock = time.monotonic()
    try:
        sshd = Sshd.start(processes, work)
        server = BaifsServer.start(processes, work)
        for latency in latencies:
            targets = targets_at(processes, work, sshd, server, latency)
            for target in (t for t in targets if t.name in chosen):
                target.clear()
                mounts.append(target.root)
                for files in sizes:
                    log(f"bench: {target.name} at {latency:g} ms, {files} files")
                    place(datasets[files], target.remote)
                    shutil.rmtree(work / "baifs-home", ignore_errors=True)
                    target.start()
                    bench = ScaleBench(target, files, latency, log)
                    try:
                        bench.run()
                    finally:
                        target.stop()
                    if isinstance(target, Baifs):
                        rss[(latency, files)] = max(bench.peak_rss_kb, target.peak_kb)
                        target.peak_kb = 0
                    figures += bench.figures
    finally:
        for mountpoint in mounts:
            unmount(mountpoint)
        processes.stop_all()
    log(f"bench: done in {(time.monotonic() - clock) / 60:.1f} min")
    record = {
        "settings": settings,
        "machine": report.machine(),
        "daemon_peak_rss_kb": [
            {"latency_ms": at, "files": files, "kb": kb} for (at, files), kb in rss.items()
        ],
        "figures": [asdict(f) for f in figures],
    }
    results = ROOT / "bench" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=2) + "\n")
    for latency in latencies:
        block = markdown(figures, settings, rss, latency)
        if not args.no_docs:
            report.replace_block(ROOT / "docs" / "performance.md", *markers(latency), block)
        print(block)
    return 0


def cpu_per_thousand(figure: ScaleFigure | None) -> float:
    if figure is None or not figure.cpu_seconds:
        return math.nan
    return figure.cpu_seconds[0] / figure.files * 1000


def markers(latency: float) -> tuple[str, str]:
    """Each latency has its own block in docs/performance.md, so runs at different latencies combine."""
    return f"<!-- scale {latency:g} ms:begin -->", f"<!-- scale {latency:g} ms:end -->"


def markdown(
    figures: list[ScaleFigure], settings: dict[str, Any], rss: dict[tuple[float, int], int], latency: float
) -> str:
    """The block of one latency: the figures, the daemon's peak RSS per size, and the targets."""
    about = report.machine()
    by = {(f.latency_ms, f.files, f.key, f.target): f for f in figures}
    begin, end = markers(latency)
    lines = [
        begin,
        "",
        f"#### {'No added latency' if latency == 0 else f'{latency:g} ms round trip'}",
        "",
        f"Measured {settings['started']} with `{settings['command']}`, one run per figure, seconds. "
        f"Machine: {about['cpu']}, {about['cores']} cores; baifs {about['baifs']}, {about['sshfs']}.",
        "",
        "| Workload | files | native | sshfs | baifs | baifs/sshfs | baifs/native "
        "| daemon CPU s per 1,000 files | baifs requests |",
        "| --- | ---: | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys: list[tuple[str, str]] = []
    for figure in figures:
        if (figure.key, figure.label) not in keys:
            keys.append((figure.key, figure.label))
    for key, label in keys:
        for files in settings["sizes"]:
            native, sshfs, ours = (by.get((latency, files, key, t)) for t in ("native", "sshfs", "baifs"))
            if native is None and sshfs is None and ours is None:
                continue
            cells = [label, f"{files:,}", _seconds(native), _seconds(sshfs), _seconds(ours)]
            cells += [
                report.ratio_text(report.ratio(ours, sshfs)),
                report.ratio_text(report.ratio(ours, native)),
            ]
            cpu = cpu_per_thousand(ours)
            cells += ["-" if math.isnan(cpu) else f"{cpu:.2f}", report.requests_text(ours)]
            lines.append("| " + " | ".join(cells) + " |")
    peaks = [f"{files:,} files: {kb / 1024:.0f} MB" for (at, files), kb in rss.items() if at == latency]
    if peaks:
        lines += ["", "Daemon peak RSS (the largest over the figures of a size): " + "; ".join(peaks) + "."]
    lines += ["", "| Target | Measured | Met |", "| --- | --- | --- |"]
    for target, measured, met in targets(figures, settings["sizes"], rss, latency):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    lines += ["", end]
    return "\n".join(lines)


def _seconds(figure: ScaleFigure | None) -> str:
    return "-" if figure is None else f"{figure.seconds[0]:.2f}"


def targets(
    figures: list[ScaleFigure], sizes: list[int], rss: dict[tuple[float, int], int], latency: float
) -> list[tuple[str, str, bool]]:
    """The scale issue's targets at one latency, each only where what it needs was measured."""
    by = {(f.latency_ms, f.files, f.key, f.target): f for f in figures}
    small, large = min(sizes), max(sizes)
    results: list[tuple[str, str, bool]] = []
    first = cpu_per_thousand(by.get((latency, small, "grep-cold", "baifs")))
    last = cpu_per_thousand(by.get((latency, large, "grep-cold", "baifs")))
    if large > small and not math.isnan(first) and not math.isnan(last):
        growth = last / first
        results.append(
            (
                f"daemon CPU per file of cold grep -r at {large:,} files within {CPU_GROWTH_LIMIT}× "
                f"of that at {small:,}",
                f"{growth:.2f}× ({last:.2f} against {first:.2f} s per 1,000 files)",
                growth <= CPU_GROWTH_LIMIT,
            )
        )
    ours, theirs = (
        by.get((latency, large, "grep-cold", "baifs")),
        by.get((latency, large, "grep-cold", "sshfs")),
    )
    if ours is not None and theirs is not None:
        value = report.ratio(ours, theirs)
        if latency == 0:
            results.append(
                (f"cold grep -r of {large:,} files within 2× of sshfs", f"{value:.2f}× sshfs", value <= 2)
            )
        else:
            results.append(
                (
                    f"cold grep -r of {large:,} files at least 20× faster than sshfs",
                    f"{1 / value:.1f}×",
                    value <= 0.05,
                )
            )
    low, high = rss.get((latency, small)), rss.get((latency, large))
    if low and high and large > small:
        per_file = (high - low) * 1024 / (large - small)
        results.append(
            (
                f"daemon peak RSS grows at most {RSS_PER_FILE_LIMIT:,} bytes a file",
                f"{per_file:,.0f} bytes ({low / 1024:.0f} MB at {small:,}, "
                f"{high / 1024:.0f} MB at {large:,})",
                per_file <= RSS_PER_FILE_LIMIT,
            )
        )
    return results


if __name__ == "__main__":
    sys.exit(main())
