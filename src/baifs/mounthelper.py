"""``mount.fuse.baifs``: ``mount -t fuse.baifs SESSION MOUNTPOINT -o OPTIONS`` and fstab lines.

mount(8) runs ``/sbin/mount.fuse.baifs SESSION MOUNTPOINT [-o OPTIONS] [-n] [-s]
[-f] [-v]`` for the file system type ``fuse.baifs`` (as it runs
``mount.fuse.sshfs``), so that an fstab line such as::

    my-session  /home/me/work  fuse.baifs  noauto,user,write_back=2,profile=lab  0 0

works with ``mount /home/me/work``. This module turns that call into ``baifs
mount``: each ``name=value`` option becomes the flag ``--name value``
(``_`` for ``-``: ``write_back=2``, ``dir_cache_time=10``, ``profile=lab``;
``baifs mount`` refuses, naming it, a flag it does not have);
``allow_other`` and ``local`` become their switches; the options mount(8)
and fstab use for themselves (``rw``, ``noauto``, ``user``, ``_netdev``,
``x-systemd.*``, ...) are left out. Any other bare option is an error that
names it: nothing is mounted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import main as baifs_main

#: Options of mount(8) and fstab that mean nothing to baifs.
GENERIC = {
    "rw", "ro", "auto", "noauto", "user", "nouser", "users", "owner", "group", "defaults", "nofail",
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "_netdev",
    "async", "sync",
}  # fmt: skip
#: ``baifs mount`` switches that take no value.
SWITCHES = {"allow_other", "local"}


class HelperError(ValueError):
    """The mount(8) call cannot become a ``baifs mount``."""


def translate(argv: Sequence[str]) -> list[str]:
    """The ``baifs mount`` arguments for a mount(8) helper call."""
    positional: list[str] = []
    options: list[str] = []
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "-o":
            if not words:
                raise HelperError("-o needs a list of options")
            options += [part for part in words.pop(0).split(",") if part]
        elif word in ("-n", "-s", "-v", "-f"):
            continue  # no mtab, sloppy, verbose, fake: nothing for baifs to do
        elif word.startswith("-"):
            raise HelperError(f"unknown argument {word!r}")
        else:
            positional.append(word)
    if len(positional) != 2:
        raise HelperError("usage: mount.fuse.baifs SESSION MOUNTPOINT [-o OPTIONS]")
    session, mountpoint = positional
    arguments = ["mount", *option_flags(options)]
    if "--local" in arguments:
        return [*arguments, mountpoint]
    return [*arguments, session, mountpoint]


def option_flags(options: Sequence[str]) -> list[str]:
    """``baifs mount`` flags for mount-style options (``-o allow_other,write_back=2``, also
    what ``baifs mount -o`` takes, as sshfs does)."""
    flags: list[str] = []
    for option in options:
        name, equals, value = option.partition("=")
        flag = name.replace("_", "-")
        if name in GENERIC or name.startswith("x-") or name == "comment":
            continue
        if name in SWITCHES:
            flags.append(f"--{flag}")
        elif equals:
            flags += [f"--{flag}", value]  # baifs mount names an unknown one
        else:
            raise HelperError(f"unknown option {option!r} for fuse.baifs (see 'baifs mount --help')")
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    try:
        arguments = translate(sys.argv[1:] if argv is None else argv)
    except HelperError as error:
        print(f"mount.fuse.baifs: {error}", file=sys.stderr)
        return 1
    return baifs_main(arguments)


if __name__ == "__main__":
    sys.exit(main())
