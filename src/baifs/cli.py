"""The ``baifs`` command: argument parsing, logging set-up and dispatch.

Owns what a user types and what they see when something goes wrong: every
`BaifsError` ends as one ``baifs: error: ...`` line and exit status 1, never
a traceback. The work itself lives in the modules each subcommand calls.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import BaifsError
from .logs import mount_log_path, setup_logging
from .server.compat import Compat


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default: %(default)s)",
    )
    parser.add_argument("--log-file", type=Path, help="log to this file instead of standard error")


def add_mount_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        name,
        type=Path,
        nargs="?",
        default=Path("."),
        help="the mount (default: the one containing the current directory)",
    )


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
        "a directory under the data directory. Batch commands run confined like a container, in "
        "bubblewrap: they see their work directory at /home/work, the system read-only, a private "
        "/tmp, their own processes only, and nothing of the server's data, other sessions or its "
        "keys; without bubblewrap the server refuses to run them (see --unsafe-no-sandbox). Every "
        "file request stays beneath the session's work directory, whatever symlinks a run makes. "
        "Keys come from BACKEND_ACCESS_KEY/BACKEND_SECRET_KEY, from --keypair-file, or are "
        "generated once and printed.",
        epilog="reproducing real sessions (docs/protocol.md, section 'baifs serve', says more):\n"
        "  --container-uid 9001         runs execute as uid 9001 (the entrypoint's default without\n"
        "                               uid-match) while uploads are written as the server's uid:\n"
        "                               runs cannot change uploaded files, nor add files to the\n"
        "                               directories uploads made\n"
        "  --vfolder data=/srv/data     /srv/data is mounted at /home/work/data for runs; listings\n"
        "                               and downloads see it, uploads there land underneath the\n"
        "                               mount point and are never seen (as on real agents)\n"
        "  --vfolder .cache=/srv/c:.c   an automount folder at /home/work/.c\n"
        "\ncompatibility switches (--compat SWITCH, repeatable), each one release's sharp edge:\n"
        + "".join(f"  {name:<24} {line}\n" for name, line in Compat.explained().items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port", type=port, default=8090, help="port to bind, 0 for any (default: %(default)s)"
    )
    serve.add_argument(
        "--data-dir", type=Path, help="where sessions live (default: ~/.local/share/baifs/serve)"
    )
    serve.add_argument(
        "--keypair-file", type=Path, help="TOML file with access_key and secret_key (mode 0600)"
    )
    serve.add_argument(
        "--latency-ms",
        type=milliseconds,
        default=0.0,
        help="delay added to every request, to emulate a remote cluster",
    )
    serve.add_argument(
        "--start-delay",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="a new session is RUNNING only after this long (PULLING, then PREPARING), and a create "
        "without enqueueOnly blocks until then, as when a real cluster pulls the image (default: 0)",
    )
    serve.add_argument(
        "--rate-limit",
        metavar="N/SECONDS",
        help="answer 429 once a keypair sent more than N requests in the last SECONDS, counting the "
        "refused ones, with no Retry-After, as the manager's limiter does (an emulated release: "
        "10000/900, the default of a keypair an administrator makes; else none)",
    )
    serve.add_argument(
        "--emulate",
        metavar="RELEASE",
        help="behave as this Backend.AI release (manager and agent) in every respect baifs serve "
        "reproduces: its request shapes, its sharp edges, its API version and manager string in GET /; "
        "'--emulate list' prints the releases and what each reproduces (default: the union of all)",
    )
    serve.add_argument(
        "--compat",
        action="append",
        default=[],
        choices=Compat.names(),
        metavar="SWITCH",
        help="reproduce one release's behaviour (repeatable): " + ", ".join(Compat.names()),
    )
    serve.add_argument(
        "--container-uid",
        metavar="UID[:GID]",
        help="run batch commands as this user, as an agent's kernel-uid or the entrypoint's 9001 "
        "(default: the server's own user); the work directory is given to it, uploads are not",
    )
    serve.add_argument(
        "--vfolder",
        action="append",
        default=[],
        metavar="NAME=HOSTDIR[:MOUNTPATH]",
        help="mount HOSTDIR in every session at /home/work/MOUNTPATH (default: NAME), repeatable; "
        "HOSTDIR must be writable by the container user (a missing one is made theirs)",
    )
    serve.add_argument(
        "--unsafe-no-sandbox",
        action="store_true",
        help="where bubblewrap is missing, run batch commands directly on this host, with the "
        "server's privileges and access to everything it can read (never on a shared machine)",
    )
    serve.add_argument(
        "--stop",
        action="store_true",
        help="stop the server running on the data directory (with --local: the one 'baifs mount --local' "
        "started), instead of starting one; refused while a mount uses it, unless --force",
    )
    serve.add_argument(
        "--force",
        action="store_true",
        help="with --stop: stop it even while mounts use it (they keep their changes pending and "
        "wait for the server to be back)",
    )
    serve.add_argument(
        "--local", action="store_true", help="the data directory of the embedded local session"
    )
    add_logging_options(serve)
    serve.set_defaults(handler=run_serve)

    mount = commands.add_parser(
        "mount",
        usage="baifs mount [options] SESSION MOUNTPOINT\n       baifs mount [options] --local MOUNTPOINT",
        help="mount a session's /home/work on a local directory",
        description="Mount the /home/work of a running compute session on MOUNTPOINT. Checks the "
        "endpoint, keys and session first, then goes to the background once the mount works. "
        "Writes are uploaded a moment after files are closed; 'baifs umount' uploads what is "
        "left before unmounting.",
        epilog="examples:\n"
        "  baifs mount my-session ~/work\n"
        "  baifs mount --create python:3.11 new-session ~/work\n"
        "  baifs mount --local ~/work        (a private local session served by baifs itself)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument(
        "target", nargs="+", metavar="[SESSION] MOUNTPOINT", help="session name or id, and where to mount it"
    )
    mount.add_argument(
        "--local", action="store_true", help="mount the embedded local session (starts baifs serve)"
    )
    mount.add_argument(
        "-o",
        metavar="OPTIONS",
        dest="mount_options",
        help="options as mount(8) and sshfs take them, comma-separated: each NAME=VALUE is --NAME VALUE "
        "(_ for -), allow_other and local are the switches, rw, noauto, user and the like are left out: "
        "-o allow_other,write_back=2",
    )
    mount.add_argument(
        "--create", metavar="IMAGE", help="create the session with this image if it does not exist"
    )
    mount.add_argument(
        "--create-timeout",
        type=seconds,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for a session to start (its image pulled, its container made), showing "
        "where it is meanwhile (default: %(default).0f)",
    )
    mount.add_argument("--profile", help="credentials profile in ~/.config/baifs/config.toml")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (for systemd)")
    mount.add_argument(
        "--attr-timeout",
        type=seconds,
        default=1.0,
        metavar="SECONDS",
        help="how long the kernel caches attributes and names (default: %(default)s)",
    )
    mount.add_argument(
        "--dir-cache-time",
        type=positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long a directory listing is trusted (default: %(default)s)",
    )
    mount.add_argument(
        "--negative-timeout",
        type=seconds,
        default=1.0,
        metavar="SECONDS",
        help="how long a missing name is remembered (default: %(default)s)",
    )
    mount.add_argument(
        "--write-back",
        type=seconds,
        default=1.5,
        metavar="SECONDS",
        help="quiet time before changes are uploaded (default: %(default)s)",
    )
    mount.add_argument(
        "--cache-dir", type=Path, help="where downloaded content is cached (default: ~/.cache/baifs)"
    )
    mount.add_argument(
        "--cache-size",
        type=parse_size,
        default="2G",
        metavar="SIZE",
        help="cache size limit, e.g. 500M or 4G (default: 2G)",
    )
    mount.add_argument("--uid", type=identity, help="owner shown for every file (default: you)")
    mount.add_argument("--gid", type=identity, help="group shown for every file (default: your group)")
    mount.add_argument("--umask", type=umask, metavar="OCTAL", help="permission bits to hide, e.g. 022")
    mount.add_argument(
        "--keep-runs",
        type=count,
        default=100,
        metavar="N",
        help="how many runs .runs/ keeps (default: %(default)s)",
    )
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users use the mount (implies default_permissions)",
    )
    add_logging_options(mount)
    mount.set_defaults(handler=run_mount_command)

    umount = commands.add_parser(
        "umount",
        help="upload everything pending, then unmount",
        description="Upload everything pending (showing files, bytes, rate and time left), unmount, and "
        "wait for the mount daemon to exit. Ctrl-C stops waiting at once; the mount stays and goes on "
        "uploading.",
    )
    umount.add_argument("mountpoint", type=Path)
    umount.add_argument(
        "--lazy",
        action="store_true",
        help="detach even if busy; the daemon finishes when the last user lets go",
    )
    umount.add_argument(
        "--keep-pending",
        action="store_true",
        help="unmount without uploading what is pending (a change the session refuses, say); it stays in "
        "the mount's state directory for the next mount of the session and for 'baifs salvage'",
    )
    umount.add_argument(
        "--force",
        action="store_true",
        help="detach a mount whose daemon died or does not answer, without flushing; pending changes "
        "stay in its state directory and the next mount of the session replays them",
    )
    add_logging_options(umount)
    umount.set_defaults(handler=run_umount)

    status = commands.add_parser(
        "status",
        help="show pending uploads, cache and requests of a mount",
        description="Show what a mount has not put on the session yet (uploads, namespace changes, the "
        "first pending paths), what it learnt of the session (virtual folders, who owns uploads), who "
        "holds the session's execution slot, the cache, requests per endpoint and the last errors. "
        "Without MOUNTPOINT, the mount containing the current directory. --json prints the document "
        "MOUNTPOINT/.baifs-status holds.",
    )
    add_mount_argument(status, "mountpoint")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    add_logging_options(status)
    status.set_defaults(handler=run_status)

    run = commands.add_parser(
        "run",
        usage="baifs run [MOUNT] [--build CMD] [--clean CMD] -- COMMAND...",
        help="run a command in the session (a batch run) and stream its output",
        description="Run COMMAND in the session as a batch run, after everything pending in the mount "
        "is on the session. Standard output and error stream to this terminal as they arrive; the exit "
        "status is the command's (127 when the build step failed, 130 after Ctrl-C, which interrupts "
        "the command in the session, 255 when the run could not be carried out). One word is run as a "
        "shell command as it stands ('make test && ./app'); several are quoted and joined. The steps "
        "start in the session directory that matches the current one when it is inside the mount "
        "(cd ~/work/proj && baifs run -- make runs make in /home/work/proj), else in /home/work. "
        "The run's record stays in MOUNT/.runs/N/. A batch run has no standard input: data piped to "
        "baifs run is not passed (it says so); put it in the mount and redirect in the command.",
        epilog="examples:\n"
        "  baifs run ~/work -- make test\n"
        "  baifs run --build 'make' -- './app --fast'      (in the mount containing the current directory)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_mount_argument(run, "mount")
    run.add_argument("--build", default="", metavar="CMD", help="build step; a failure skips the command")
    run.add_argument(
        "--clean", default="", metavar="CMD", help="clean step, run first; its failure is ignored"
    )
    add_logging_options(run)
    run.set_defaults(handler=run_run, command=[])

    sync = commands.add_parser(
        "sync",
        help="upload everything pending and wait until it is on the session",
        description="Flush a mount: upload everything pending (files still open for writing included) "
        "and carry out pending namespace changes, showing progress, and return once all of it is on the "
        "session. Exits 1, saying why, when that is not possible (the session is away or terminated, "
        "a run started elsewhere holds the execution slot); the changes stay pending. Plain 'sync' does "
        "not reach FUSE file systems; 'sync MOUNTPOINT' or this command does.",
    )
    add_mount_argument(sync, "mountpoint")
    add_logging_options(sync)
    sync.set_defaults(handler=run_sync)

    salvage = commands.add_parser(
        "salvage",
        help="recover changes a session never received (it ended, or was deleted)",
        description="A mount keeps the changes it could not push in its state directory on this machine. "
        "When the session is gone they would stay there: 'salvage' lists them, exports them to a local "
        "directory (same tree, modes and mtimes, with a report of what only the session had), replays "
        "them onto another session, or forgets them.",
        epilog="examples:\n"
        "  baifs salvage list\n"
        "  baifs salvage export 3f2a9c ~/rescued        (KEY: from the list, or the old session's name)\n"
        "  baifs salvage replay 3f2a9c new-session\n"
        "  baifs salvage forget 3f2a9c --yes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = salvage.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every state directory that holds changes, with whose they are")
    listing.add_argument("--paths", action="store_true", help="also list the pending paths")
    exporting = actions.add_parser("export", help="write the pending changes into an empty local directory")
    exporting.add_argument("key", metavar="KEY")
    exporting.add_argument("directory", type=Path)
    replaying = actions.add_parser(
        "replay", help="push the pending changes to another (running) session, as its mount would"
    )
    replaying.add_argument("key", metavar="KEY")
    replaying.add_argument("session", help="the session to push them to (name or id)")
    replaying.add_argument("--profile", help="credentials profile in ~/.config/baifs/config.toml")
    replaying.add_argument("--create", metavar="IMAGE", help="create the session with this image first")
    forgetting = actions.add_parser("forget", help="delete a state directory and the changes it holds")
    forgetting.add_argument("key", metavar="KEY")
    forgetting.add_argument("--yes", action="store_true", help="really delete them")
    for each in (salvage, listing, exporting, replaying, forgetting):
        add_logging_options(each)
    salvage.set_defaults(handler=run_salvage)

    completion = commands.add_parser(
        "completion",
        help="print the shell completion script for bash or zsh",
        description="Print a completion script generated from baifs's own arguments (shtab). "
        "scripts/setup.sh installs both; by hand: baifs completion bash > "
        "/etc/bash_completion.d/baifs, or baifs completion zsh > ~/.zfunc/_baifs.",
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(handler=run_completion)
    manpage = commands.add_parser(
        "manpage",
        help="print the man page (troff), generated from the arguments",
        description="Print baifs(1) in troff, generated from baifs's own arguments (argparse-manpage). "
        "scripts/setup.sh installs it; by hand: baifs manpage > /usr/local/share/man/man1/baifs.1.",
    )
    manpage.set_defaults(handler=run_manpage)
    return parser


#: Arguments that name a file (the other paths, and a mount's target, name directories).
FILE_ARGUMENTS = {"log_file", "keypair_file"}


def run_completion(args: argparse.Namespace) -> int:
    import shtab

    parser = build_parser()
    pending = [parser]
    while pending:  # every parser, subcommands' included: paths complete as files or directories
        each = pending.pop()
        for action in each._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
            elif action.type is Path or action.dest == "target":
                action.complete = shtab.FILE if action.dest in FILE_ARGUMENTS else shtab.DIRECTORY  # type: ignore[attr-defined]
    print(shtab.complete(parser, shell=args.shell))
    return 0


def run_manpage(args: argparse.Namespace) -> int:
    from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

    page = {
        "description": "mount a Backend.AI compute session's home directory and run batch jobs in it",
        "project_name": "baifs",
        "version": __version__,
        "manual_title": "baifs Manual",
    }
    print(Manpage(build_parser(), _data=page))
    return 0


def _number(kind: type[float] | type[int], text: str, what: str, low: float, high: float = math.inf) -> float:
    """``text`` as a number with ``low <= value <= high``, or an argparse error naming what is expected."""
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
    return value


def seconds(text: str) -> float:
    return float(_number(float, text, "a number of seconds, 0 or more", 0))


def positive_seconds(text: str) -> float:
    return float(_number(float, text, "a number of seconds above 0", math.ulp(0.0)))


def milliseconds(text: str) -> float:
    return float(_number(float, text, "a number of milliseconds, 0 or more", 0))


def count(text: str) -> int:
    return int(_number(int, text, "a whole number, 1 or more", 1))


def identity(text: str) -> int:
    return int(_number(int, text, "a numeric id, 0 or more", 0))


def port(text: str) -> int:
    return int(_number(int, text, "a port number from 0 to 65535", 0, 65535))


def umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal mask from 000 to 777, such as 022, not {text!r}")
    return value


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    number, unit = text.rstrip("BbIi"), ""
    if number and number[-1].upper() in units:
        number, unit = number[:-1], number[-1].upper()
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def run_serve(args: argparse.Namespace) -> int:
    from .local import local_data_dir, recorded_endpoint, stop_server
    from .mountctl import mounts_served_by
    from .server.main import ServeOptions, serve
    from .server.sandbox import ContainerUser
    from .server.workdir import VFolder

    if args.local:
        args.data_dir = local_data_dir()
    if args.stop:
        data_dir = args.data_dir or ServeOptions().data_dir
        endpoint = recorded_endpoint(data_dir)
        users = mounts_served_by(endpoint) if endpoint and not args.force else []
        if users:
            names = ", ".join(str(path) for path in users)
            raise BaifsError(
                f"baifs serve on {data_dir} is in use by the mount(s) at {names}: unmount them first "
                f"(baifs umount {users[0]}), or stop it anyway with --stop --force"
            )
        pid = stop_server(data_dir)
        print(
            f"baifs serve: stopped pid {pid} ({data_dir})"
            if pid
            else f"baifs serve: none runs on {data_dir}",
            file=sys.stderr,
        )
        return 0

    from .server import releases
    from .server.ratelimit import RateLimit

    if args.emulate == "list":
        print(releases.describe())
        return 0
    try:
        user = ContainerUser.parse(args.container_uid) if args.container_uid else None
        vfolders = tuple(VFolder.parse(text) for text in args.vfolder)
        release = releases.profile(args.emulate) if args.emulate else None
        rate_limit = RateLimit.parse(args.rate_limit) if args.rate_limit else None
    except ValueError as error:
        raise BaifsError(str(error)) from None
    switches = [*args.compat, *(release.compat.enabled() if release else [])]
    options = ServeOptions(
        host=args.host,
        port=args.port,
        keypair_file=args.keypair_file,
        latency_ms=args.latency_ms,
        compat=Compat.from_names(switches),
        container_user=user,
        vfolders=vfolders,
        unsafe_no_sandbox=args.unsafe_no_sandbox,
        release=release,
        start_delay=args.start_delay,
        rate_limit=rate_limit,
    )
    if args.data_dir is not None:
        options.data_dir = args.data_dir
    import trio

    trio.run(serve, options)
    return 0


def run_mount_command(args: argparse.Namespace) -> int:
    from . import config
    from .fs.core import MountOptions
    from .fs.mount import MountRequest, check_mountpoint

    if args.local:
        if len(args.target) != 1:
            raise BaifsError("with --local, give only the mountpoint")
        from .local import LOCAL_IMAGE, LOCAL_SESSION, ensure_local_server

        credentials = ensure_local_server()
        session, mountpoint, create = LOCAL_SESSION, args.target[0], LOCAL_IMAGE
    else:
        if len(args.target) != 2:
            raise BaifsError("give a session and a mountpoint: baifs mount SESSION MOUNTPOINT")
        credentials = config.load_credentials(args.profile)
        (session, mountpoint), create = args.target, args.create
    mountpoint_path = Path(mountpoint).expanduser().resolve()
    if mounted_session(mountpoint_path) == session:
        print(f"baifs: session {session} is already mounted at {mountpoint_path}", file=sys.stderr)
        return 0
    check_mountpoint(mountpoint_path)
    options = MountOptions(
        attr_timeout=args.attr_timeout,
        dir_ttl=args.dir_cache_time,
        negative_timeout=args.negative_timeout,
        write_back=args.write_back,
        cache_limit=args.cache_size,
        umask=args.umask,
    )
    if args.uid is not None:
        options.uid = args.uid
    if args.gid is not None:
        options.gid = args.gid
    for name, value in (("--attr-timeout", options.attr_timeout), ("--dir-cache-time", options.dir_ttl)):
        if value <= 0:
            raise BaifsError(f"{name} must be above 0 (a zero TTL makes every stat a round trip)")
    request = MountRequest(
        session=session,
        mountpoint=mountpoint_path,
        credentials=credentials,
        options=options,
        create_image=create,
        create_timeout=args.create_timeout,
        allow_other=args.allow_other,
        cache_dir=args.cache_dir,
        keep_runs=args.keep_runs,
    )
    from .daemon import run_detached, run_foreground

    if args.foreground:
        request.log_file = args.log_file
        return run_foreground(request)
    request.log_file = args.log_file or mount_log_path(config.state_dir(), mountpoint_path)
    return run_detached(request, request.log_file)


def mounted_session(path: Path) -> str | None:
    """The session a baifs mount at ``path`` serves, if there is one."""
    from .mountctl import NotAMount, read_status

    if not os.path.ismount(path):
        return None
    try:
        return str(read_status(path).get("session"))
    except NotAMount:
        return None


def run_umount(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .mountctl import flush, force_unmount, read_status, unmount

    mountpoint = args.mountpoint.expanduser().absolute()
    console = Console(stderr=True)
    if args.force:
        force_unmount(mountpoint)
        console.print(
            f"detached {mountpoint}; what was pending stays in its state directory, and the next mount "
            "of the session replays it (or see 'baifs salvage list')",
            soft_wrap=True,
        )
        return 0
    if not args.keep_pending:
        flush(mountpoint, console)
        unmount(mountpoint, lazy=args.lazy)
        console.print(f"unmounted {mountpoint}", soft_wrap=True)
        return 0
    status = read_status(mountpoint)
    unmount(mountpoint, lazy=args.lazy, keep_pending=True)
    pending = status["pending"]
    console.print(
        f"unmounted {mountpoint}; {pending['uploads']} upload(s) and "
        f"{pending['namespace_changes']} namespace change(s) stay pending in {status['state_dir']}: "
        "the next mount of the session replays them (or see 'baifs salvage list')",
        soft_wrap=True,
    )
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .mountctl import find_mount, flush

    flush(find_mount(args.mountpoint), Console(stderr=True))
    return 0


def run_status(args: argparse.Namespace) -> int:
    import json

    from .mountctl import find_mount, format_status, read_status

    document = read_status(find_mount(args.mountpoint))
    print(json.dumps(document, indent=2) if args.json else format_status(document))
    return 0


def run_run(args: argparse.Namespace) -> int:
    from .mountctl import find_mount
    from .runctl import RUN_FAILED_EXIT, run

    if not args.command:
        raise BaifsError("put the command after --: baifs run [MOUNT] [--build CMD] -- COMMAND...")
    try:
        return run(find_mount(args.mount), args.command, build=args.build, clean=args.clean)
    except BaifsError as error:  # no mount, a mount gone: the run could not be carried out
        print(f"baifs: error: {error}", file=sys.stderr)
        return RUN_FAILED_EXIT


def run_salvage(args: argparse.Namespace) -> int:
    from .fs import salvage

    if args.action == "list":
        found = salvage.list_pending()
        if not found:
            print("no state on this machine holds changes a session has not received")
        for pending in found:
            print(pending.describe())
            identity = pending.identity
            if identity is not None and identity.mountpoint:
                print(f"    last mounted at {identity.mountpoint}; state in {pending.directory}")
            if args.paths:
                tree = salvage.PendingTree.read(pending.directory)
                for path in sorted(tree.entries):
                    print(f"    {os.fsdecode(path)}")
                for path in sorted(tree.removed):
                    print(f"    (remove) {os.fsdecode(path)}")
        return 0
    pending = salvage.find_state(args.key)
    if args.action == "export":
        report = salvage.export(pending.directory, args.directory.expanduser())
        for line in salvage.iter_report(report):
            print(line)
        return 0
    if args.action == "forget":
        if not args.yes:
            raise BaifsError(f"this deletes {pending.describe()}; add --yes to do it")
        import shutil

        shutil.rmtree(pending.directory)
        print(f"forgot {pending.key}")
        return 0
    return replay_salvage(args, pending.directory)


def replay_salvage(args: argparse.Namespace, state: Path) -> int:
    import trio

    from . import config
    from .fs.remote import open_session
    from .fs.salvage import replay

    credentials = config.load_credentials(args.profile)

    async def push() -> int:
        connection, session, _ = await open_session(credentials, args.session, create_image=args.create)
        async with connection:
            return await replay(state, session)

    recovered = trio.run(push)
    print(f"replayed {recovered} change(s) onto session {args.session}; they are on it now")
    return 0


def _parse(parser: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """The arguments, with ``baifs mount -o`` made flags and a hint where a user's habit misleads."""
    args, unknown = parser.parse_known_args(words)
    if unknown and args.handler is run_run:
        _command_parser(parser, "run").error(
            f"unrecognized arguments: {' '.join(unknown)}; the command goes after '--' "
            f"(baifs run [MOUNT] -- {' '.join([str(args.mount), *unknown])})"
        )
    if unknown:
        parser.parse_args(words)  # argparse's own error, naming them
    if args.handler is run_mount_command and args.mount_options:
        from .mounthelper import HelperError, option_flags

        try:
            flags = option_flags([part for part in args.mount_options.split(",") if part])
        except HelperError as error:
            _command_parser(parser, "mount").error(str(error))
        without = [word for index, word in enumerate(words) if not _is_option_list(words, index)]
        args = parser.parse_args([without[0], *flags, *without[1:]])
    return args


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (its usage is what an error about it shows)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise KeyError(name)


def _is_option_list(words: list[str], index: int) -> bool:
    """Whether ``words[index]`` is ``-o`` or the list after it (``-oLIST`` included)."""
    word = words[index]
    return (
        word == "-o" or (word.startswith("-o") and word != "-o") or (index > 0 and words[index - 1] == "-o")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if words[:1] == ["run"] and "--" in words:
        split = words.index("--")
        words, command = words[:split], words[split + 1 :]
    args = _parse(parser, words)
    if args.handler is run_run:
        args.command = command
    setup_logging(getattr(args, "log_level", "warning"), getattr(args, "log_file", None))
    try:
        return int(args.handler(args))
    except BaifsError as error:
        kind = "" if error.exit_status == 130 else "error: "  # an interruption is not an error
        print(f"baifs: {kind}{error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        return 130
