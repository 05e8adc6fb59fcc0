"""The ``baifs`` command: argument parsing, logging set-up and dispatch.

Owns what a user types and what they see when something goes wrong: every
`BaifsError` ends as one ``baifs: error: ...`` line and exit status 1, never
a traceback. The work itself lives in the modules each subcommand calls.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .api.errors import BaifsError
from .server.compat import Compat

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hypercorn.error"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default: %(default)s)",
    )
    parser.add_argument("--log-file", type=Path, help="log to this file instead of standard error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baifs",
        description="Mount a Backend.AI compute session's /home/work and run batch jobs in it.",
        epilog="Credentials come from BACKEND_ENDPOINT, BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY, "
        "or from a profile in ~/.config/baifs/config.toml (mode 0600). "
        "See 'baifs COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"baifs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run a local server that speaks the Backend.AI session API",
        description="Run a local Backend.AI-compatible session server. Each session's /home/work is "
        "a directory under the data directory; batch commands run on this host (inside bubblewrap "
        "when it is installed). Keys come from BACKEND_ACCESS_KEY/BACKEND_SECRET_KEY, from "
        "--keypair-file, or are generated once and printed.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port", type=int, default=8090, help="port to bind, 0 for any (default: %(default)s)"
    )
    serve.add_argument(
        "--data-dir", type=Path, help="where sessions live (default: ~/.local/share/baifs/serve)"
    )
    serve.add_argument(
        "--keypair-file", type=Path, help="TOML file with access_key and secret_key (mode 0600)"
    )
    serve.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added to every request, to emulate a remote cluster",
    )
    serve.add_argument(
        "--compat",
        action="append",
        default=[],
        choices=Compat.names(),
        metavar="SWITCH",
        help="reproduce one release's behaviour (repeatable): " + ", ".join(Compat.names()),
    )
    add_logging_options(serve)
    serve.set_defaults(handler=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from .server.main import ServeOptions, serve

    options = ServeOptions(
        host=args.host,
        port=args.port,
        keypair_file=args.keypair_file,
        latency_ms=args.latency_ms,
        compat=Compat.from_names(args.compat),
    )
    if args.data_dir is not None:
        options.data_dir = args.data_dir
    trio.run(serve, options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    try:
        return int(args.handler(args))
    except BaifsError as error:
        print(f"baifs: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
