"""Session paths the API cannot name, reached through a temporary ASCII alias.

A manager hands a request's path to the agent through msgpack (from a JSON
body) or decodes it with yarl (from a query): msgpack refuses the surrogate
escapes that carry bytes which are not UTF-8, and yarl turns those bytes into
U+FFFD, another name. So a path that is not UTF-8 is listed and downloaded
through an alias under ``.baifs-tmp`` that one script makes, with the bytes
written by ``printf`` escapes (`shell.ShellScript`): a relative symlink for a
listing (the agent's scan follows the final link), a hard link for a
download (an archive holds a symlink as itself; a copy where the file is on
another file system, such as a virtual folder).

Invariants: a UTF-8 path goes to the API as it is, with no extra request; an
alias becomes litter (removed by the next script that runs in the session)
only once the request that used it is answered.
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable

from ..api.client import SessionClient
from ..api.errors import RemotePathError
from ..api.listing import RemoteEntry
from .flush import REMOTE_TMP, remote_name
from .model import join
from .shell import ShellScript, is_utf8
from .supervisor import Supervisor

#: How long an alias's script may wait for the execution slot.
ALIAS_QUEUE_TIMEOUT = 20.0


#: Whether the API can carry a path as it is: UTF-8 (what the shell scripts also ask).
nameable = is_utf8


class Aliases:
    def __init__(
        self, session: SessionClient, supervisor: Supervisor, litter: Callable[[bytes], None]
    ) -> None:
        self.session = session
        self.supervisor = supervisor
        self._litter = litter

    async def list_dir(self, path: bytes) -> list[RemoteEntry]:
        """The listing of a directory, whatever bytes its path holds."""
        if nameable(path):
            return await self.session.list_dir(remote_name(path))
        depth = REMOTE_TMP.count(b"/") + 1
        alias = await self._make(path, "ln -s -- {target} {alias}", relative=b"../" * depth + path)
        try:
            return await self.session.list_dir(remote_name(alias))
        finally:
            self._litter(alias)

    async def download(self, paths: list[bytes]) -> list[memoryview]:
        """Archives of files, in order, whatever bytes their paths hold (a script for each alias)."""
        if all(nameable(path) for path in paths):
            return await self.session.download([remote_name(path) for path in paths])
        names: list[bytes] = []
        aliases: list[bytes] = []
        try:
            for path in paths:
                if nameable(path):
                    names.append(path)
                    continue
                alias = await self._make(
                    path, "ln -f -- {target} {alias} 2>/dev/null || cp -p -- {target} {alias}"
                )
                aliases.append(alias)
                names.append(alias)
            return await self.session.download([remote_name(name) for name in names])
        finally:
            for alias in aliases:
                self._litter(alias)

    async def _make(self, path: bytes, command: str, relative: bytes | None = None) -> bytes:
        """An alias of ``path`` made by ``command`` (its target ``relative`` when given) in one script."""
        alias = join(REMOTE_TMP, b"alias-" + secrets.token_hex(6).encode())
        shell = ShellScript()
        shell.raw(f"mkdir -p -- {shell.word(REMOTE_TMP)} || exit 1")
        shell.raw(f"[ -e {shell.word(path)} ] || [ -L {shell.word(path)} ] || exit 2")
        shell.raw(command.format(target=shell.word(relative or path), alias=shell.word(alias)) + " || exit 1")

        async def ignore(stream: str, text: str) -> None:
            pass

        outcome = await self.supervisor.run(shell.render(), ignore, queue_timeout=ALIAS_QUEUE_TIMEOUT)
        if outcome.exit_code == 2:
            raise RemotePathError(errno.ENOENT, remote_name(path), "not in the session")
        if outcome.exit_code != 0:
            raise RemotePathError(
                errno.EIO, remote_name(path), f"no alias could be made (exit {outcome.exit_code})"
            )
        return alias
