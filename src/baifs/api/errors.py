"""Exceptions of the session API client.

Every failure the client reports is one of these classes, so callers branch on
types, never on message text. HTTP errors carry what the server said (the
problem+json ``type``, ``title`` and ``msg``); the message of each exception is
written for a person and never contains credentials.
"""

from __future__ import annotations

import errno as errno_codes
import os

from ..errors import BaifsError


class APIError(BaifsError):
    """The server answered with an HTTP error status."""

    def __init__(
        self,
        status: int,
        *,
        type_uri: str = "",
        title: str = "",
        msg: str = "",
        endpoint: str = "",
    ) -> None:
        self.status = status
        self.type_uri = type_uri
        self.title = title
        self.msg = msg
        self.endpoint = endpoint
        detail = title or "HTTP error"
        if msg:
            detail = f"{detail} ({msg})"
        where = f" from {endpoint}" if endpoint else ""
        super().__init__(f"{status} {detail}{where}")

    @property
    def problem(self) -> str:
        """The last component of the problem ``type`` URI (``auth-failed``, ...)."""
        return self.type_uri.rstrip("/").rsplit("/", 1)[-1]


class InvalidRequest(APIError):
    """400: the server refused the parameters (limits, dates, versions)."""


class AuthenticationFailed(APIError):
    """401: wrong access key or secret key, or a rejected signature."""


class PermissionDenied(APIError):
    """403."""


class SessionNotFound(APIError):
    """404: no live session with that name or id."""


class MethodNotAllowed(APIError):
    """405: this manager does not route the method (used for fallbacks)."""


class RateLimited(APIError):
    """429: the keypair's rate limit is exhausted."""

    def __init__(self, status: int, *, retry_after: float | None = None, **kwargs: str) -> None:
        super().__init__(status, **kwargs)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: the manager or the agent failed."""


class UploadNotApplied(ServerError):
    """The upload was answered with success, but a listing shows some files did not arrive."""

    def __init__(self, paths: list[str], *, endpoint: str = "upload") -> None:
        shown = ", ".join(repr(path) for path in paths[:5])
        super().__init__(
            502,
            title="Upload not applied",
            msg=f"the server accepted the upload but {shown} did not arrive",
            endpoint=endpoint,
        )
        #: the paths (relative to /home/work) that did not arrive.
        self.paths = paths


class SessionTerminated(SessionNotFound):
    """The session is gone for good (confirmed by a second request); nothing more is sent to it."""

    def __init__(self, message: str, *, endpoint: str = "") -> None:
        super().__init__(404, title="Session terminated", msg=message, endpoint=endpoint)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class EndpointUnreachable(BaifsError):
    """The endpoint could not be reached, or did not answer in time, after retries.

    ``delivered`` is False only when the request provably never left this host
    (the connection could not be made); otherwise the server may have acted on it.
    """

    def __init__(self, message: str, *, delivered: bool = True) -> None:
        super().__init__(message)
        self.delivered = delivered


class LimitExceeded(BaifsError, ValueError):
    """A request that the server is known to reject was refused locally, unsent."""


class ProtocolError(BaifsError):
    """The server's answer does not have the shape the API defines."""


class AnswerTooLarge(ProtocolError):
    """An answer larger than the protocol allows for its endpoint, refused while it streamed."""

    def __init__(self, endpoint: str, limit: int, size: int) -> None:
        super().__init__(
            f"{endpoint}: the server's answer ({size:,} bytes and more) is larger than the"
            f" {limit:,} bytes the protocol allows; refused"
        )


class SessionBusy(BaifsError):
    """The session's one execution slot stayed taken longer than the caller would wait."""


class SessionWedged(BaifsError):
    """A batch execution stopped making progress; later runs may be blocked."""


class LocalStateError(BaifsError, OSError):
    """A file of the mount's own state (a run record, the run marker) could not be written."""

    def __init__(self, error: OSError, what: str) -> None:
        OSError.__init__(self, error.errno, f"cannot write {what}: {error.strerror or error}")

    def __str__(self) -> str:
        return str(self.strerror)


class RemotePathError(BaifsError, OSError):
    """A path inside the session does not exist, is not a directory, or is not allowed."""

    def __init__(self, code: int, path: str, detail: str = "") -> None:
        OSError.__init__(self, code, os.strerror(code), path)
        self.detail = detail

    def __str__(self) -> str:
        return f"{os.strerror(self.errno or 0)}: {self.filename!r} in the session"


#: Python exception names in a remote traceback, and the errno each one means.
REMOTE_EXCEPTION_ERRNOS: dict[str, int] = {
    "FileNotFoundError": errno_codes.ENOENT,
    "NotADirectoryError": errno_codes.ENOTDIR,
    "IsADirectoryError": errno_codes.EISDIR,
    "PermissionError": errno_codes.EACCES,
    "FileExistsError": errno_codes.EEXIST,
}


def errno_from_traceback(text: str) -> int:
    """The errno a remote Python traceback stands for (EIO when unrecognised)."""
    found = [(text.rfind(name), code) for name, code in REMOTE_EXCEPTION_ERRNOS.items()]
    position, code = max(found)
    return code if position >= 0 else errno_codes.EIO
