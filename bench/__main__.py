"""The benchmark harness: every workload on baifs, sshfs and a native directory, at each latency.

Run it with ``bash bench/run`` (which installs what it needs first). It
starts a throw-away sshd and a `baifs serve` on 127.0.0.1, a delaying proxy
in front of each for every latency but 0, and runs the workloads of
`bench.workloads` against the three targets in turn. It writes the tables
into docs/performance.md (between the generated-block markers) and the raw
figures as JSON into bench/results/. Whatever happens, it unmounts what it
mounted and stops what it started, by PID.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import report
from .peers import (
    Baifs,
    BaifsServer,
    Processes,
    Sshd,
    add_common_arguments,
    require_prerequisites,
    targets_at,
    unmount,
)
from .workloads import Bench, Dataset, Figure

ROOT = Path(__file__).resolve().parent.parent


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in a few minutes")
    parser.add_argument("--runs", type=int, help="measured runs per figure (default: 5, quick: 1)")
    parser.add_argument("--files", type=int, help="files in the tree (default: 1000, quick: 100)")
    parser.add_argument("--big-mb", type=int, help="size of the large file (default: 100, quick: 20)")
    add_common_arguments(parser)
    return parser.parse_args()


def main() -> int:
    args = parse()
    require_prerequisites()
    runs = args.runs or (1 if args.quick else 5)
    files = args.files or (100 if args.quick else 1000)
    big_mb = args.big_mb or (20 if args.quick else 100)
    latencies: list[float] = args.latencies
    command = "bash bench/run" + (" --quick" if args.quick else "")
    settings = {"runs": runs, "files": files, "big_mb": big_mb, "latencies": latencies, "command": command}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = Dataset(work / "dataset", files, big_mb)
    print(f"bench: generating the data set in {data.root}", file=sys.stderr)
    data.make()

    processes = Processes()
    figures: list[Figure] = []
    peak_rss = 0
    mounts: list[Path] = []
    clock = time.monotonic()
    try:
        sshd = Sshd.start(processes, work)
        server = BaifsServer.start(processes, work)
        for latency in latencies:
            targets = targets_at(processes, work, sshd, server, latency)
            for target in targets:
                print(f"bench: {target.name} at {latency:g} ms", file=sys.stderr)
                target.clear()
                shutil.rmtree(work / "baifs-home", ignore_errors=True)
                mounts.append(target.root)
                target.start()
                bench = Bench(
                    target, data, latency, runs, lambda line: print(line, file=sys.stderr, flush=True)
                )
                try:
                    bench.copy_tree()
                    bench.listing_and_grep()
                    bench.vim_saves()
                    bench.git()
                    bench.big_file()
                    if isinstance(target, Baifs):
                        bench.runs_overhead()
                        bench.folder_copy()
                        bench.beside_a_run()
                finally:
                    target.stop()
                    if isinstance(target, Baifs):
                        peak_rss = max(peak_rss, target.peak_kb)
                figures += bench.figures
    finally:
        for mountpoint in mounts:
            unmount(mountpoint)
        processes.stop_all()
    print(f"bench: done in {(time.monotonic() - clock) / 60:.1f} min", file=sys.stderr)
    json_path = ROOT / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    docs = None if args.no_docs else ROOT / "docs" / "performance.md"
    print(report.write(figures, settings, peak_rss or None, started, json_path, docs))
    print(f"bench: figures in {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
