"""The session API client: the only code in baifs that speaks HTTP to a manager.

`Connection` owns the transport: the httpx client, version negotiation
(unauthenticated ``GET /``), signing, per-request timeouts, retries and the
mapping of error responses to exceptions. `SessionClient` owns the request
shapes of one session's endpoints, written in the form that every manager
version accepts (reference §9):

- list: the path in the query string *and* in a JSON body;
- download: POST with the paths in the query *and* the body, GET on 405;
- execute: the run id under both ``runId`` and ``run_id``;
- upload: multipart, names relative to ``/home/work``; switched to absolute
  names for the agents that demand them, and verified with a listing where a
  204 is not proof of a write.

Invariants:
- a request the server is known to reject (over 20 files, a file of 1 MiB or
  more, over 5 downloads) raises `LimitExceeded` and is never sent;
- only requests that are safe to repeat are retried (list, download, info,
  upload); an execute is retried only when it provably never left this host;
- every request has a deadline for its whole exchange, answer included
  (`deadline_for`: sized to what it carries), not only between two bytes, so a
  stalled or dripping server costs a caller seconds and a retry on a fresh
  connection, never a worker for good;
- an answer is read as it streams and refused (`AnswerTooLarge`) once it is
  larger than the protocol allows for its endpoint (`ANSWER_LIMITS`), so a
  hostile server cannot make the client hold more than that in memory;
- requests running side by side fail as one exception of the project's own
  classes, never as an ``ExceptionGroup`` (`concurrency.gather`);
- a session that answers "no such session" twice (the request, then an info
  request that confirms it) is terminated for good: every later call raises
  `SessionTerminated` without a request;
- the secret key never leaves `Connection._sign`.

`RemoteHealth` records what the connection learnt about the remote: a counter
that moves whenever the remote makes progress (an answer, upload bytes
sent), and since when it has been away. The file system uses the first to
bound how long a system call waits for a remote that stopped answering, and
the second to serve what it knows instead of waiting for a remote that is
away.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import re
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import trio

from ..concurrency import gather_each
from ..config import Credentials
from . import signing
from .archive import decode_multipart
from .errors import (
    AnswerTooLarge,
    APIError,
    AuthenticationFailed,
    BaifsError,
    EndpointUnreachable,
    InvalidRequest,
    LimitExceeded,
    MethodNotAllowed,
    PermissionDenied,
    ProtocolError,
    RateLimited,
    RemotePathError,
    ServerError,
    SessionNotFound,
    SessionTerminated,
    UploadNotApplied,
)
from .listing import RemoteEntry, parse_listing

log = logging.getLogger(__name__)

MAX_UPLOAD_FILES = 20
MAX_UPLOAD_BYTES = 1_048_575
MAX_DOWNLOAD_PATHS = 5
#: The largest archive the agent sends for one path (reference §4.4).
MAX_ARCHIVE_BYTES = 1024 * 1024
#: Room for multipart framing and headers around archives.
FRAMING_BYTES = 64 * 1024
#: The largest answer each endpoint may give; anything larger is refused as it streams.
ANSWER_LIMITS: dict[str, int] = {
    "download": MAX_DOWNLOAD_PATHS * (MAX_ARCHIVE_BYTES + FRAMING_BYTES),
    "download_single": MAX_ARCHIVE_BYTES + FRAMING_BYTES,
    "list": 256 * 1024 * 1024,  # one directory level: ~150 bytes an entry, a million entries and more
    "execute": 64 * 1024 * 1024,  # one response's console output
}
DEFAULT_ANSWER_LIMIT = 4 * 1024 * 1024
#: A request's deadline: this much for the server to act and answer, plus its payload at
#: `SLOWEST_TRANSFER` bytes a second (`Connection.deadline_for`).
BASE_DEADLINE = 10.0
SLOWEST_TRANSFER = 256 * 1024
#: Content read into memory at once by `SessionClient.upload_all`.
UPLOAD_MEMORY_BYTES = 24 * 1024 * 1024
#: Managers from this release on answer 204 to uploads that failed (reference §2.3).
SWALLOWING_MANAGER = (25, 16)
WORK_DIR = "/home/work"

_ERROR_CLASSES: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: SessionNotFound,
    405: MethodNotAllowed,
    429: RateLimited,
}


class AnswerDeadline(Exception):
    """An exchange that did not end within its deadline (a transport failure, like a timeout)."""


#: Headers that describe the encoding of an answer that `Connection._exchange` has already decoded.
_DECODED_HEADERS = (b"content-encoding", b"content-length", b"transfer-encoding")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with full jitter; ``Retry-After`` wins when given."""
        if retry_after is not None:
            return min(retry_after, self.max_delay * 4)
        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class ClientStats:
    """What the client did, for ``baifs status``: requests, retries, recent errors."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=10))

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "retries": self.retries,
            "last_errors": list(self.errors),
        }


@dataclass
class RemoteHealth:
    """What the connection knows of the remote's liveness."""

    #: moves on every answer below 500 and on every chunk of upload content sent.
    progress: int = 0
    #: monotonic time of the first failure (transport error, 5xx) since the last answer.
    away_since: float | None = None
    last_failure: str = ""

    def answered(self) -> None:
        self.progress += 1
        self.away_since = None

    def failed(self, reason: str) -> None:
        if self.away_since is None:
            self.away_since = trio.current_time()
        self.last_failure = reason

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def as_dict(self) -> dict[str, Any]:
        away_for = None if self.away_since is None else round(trio.current_time() - self.away_since, 1)
        return {"reachable": not self.away, "away_for_seconds": away_for, "last_failure": self.last_failure}


@dataclass
class RateState:
    """The keypair's rate limit as the manager shows it, and the pause a 429 imposes.

    Every request the manager sees counts in its window, refused ones
    included, and a 429 says neither when nor how much: after one the
    connection sends nothing for a while (a quarter of the window when the
    answers so far named it, else 30 s), doubling on each 429 in a row up to
    the whole window, instead of retrying into the limit.
    """

    limit: int | None = None
    remaining: int | None = None
    window: float | None = None
    #: monotonic time before which nothing is sent; 0 when not limited.
    paused_until: float = 0.0
    refusals: int = 0

    def seen(self, headers: httpx.Headers) -> None:
        try:
            self.limit = int(headers["x-ratelimit-limit"])
            self.remaining = int(headers["x-ratelimit-remaining"])
            self.window = float(headers["x-ratelimit-window"])
        except (KeyError, ValueError):
            pass
        self.refusals = 0

    def refused(self) -> float:
        """A 429: how long the connection now holds back."""
        first = self.window / 4 if self.window else FIRST_RATE_PAUSE
        longest = self.window or MAX_RATE_PAUSE
        pause = min(first * 2**self.refusals, longest)
        self.refusals += 1
        self.paused_until = trio.current_time() + pause
        return pause

    @property
    def paused_for(self) -> float:
        return max(0.0, self.paused_until - trio.current_time())

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "remaining": self.remaining,
            "window_seconds": self.window,
            "paused_for_seconds": round(self.paused_for, 1) or None,
        }


#: The first pause after a 429 when the manager never named its window, and the longest.
FIRST_RATE_PAUSE = 30.0
MAX_RATE_PAUSE = 900.0
#: A request that meets a pause this short waits it out; a longer one fails at once (RateLimited).
RATE_PAUSE_WAITED = 10.0


class ProgressBuffer(io.BytesIO):
    """Upload content that reports as progress each chunk httpx reads after an attempt's first.

    httpx reads the next chunk once the previous one went out; the first of
    each attempt proves nothing (a request to a frozen server, retried on a
    short deadline, would otherwise look like a remote that moves).
    """

    def __init__(self, data: bytes, health: RemoteHealth) -> None:
        super().__init__(data)
        self._health = health
        self._chunks = 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._chunks = 0  # httpx rewinds the content for each attempt of a request
        return super().seek(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if chunk:
            self._chunks += 1
            if self._chunks > 1:
                self._health.progress += 1
        return chunk


class UploadBody:
    """The multipart body of one upload, written by hand so that every name arrives whole.

    Each part's name travels twice: as RFC 5987 ``filename*=UTF-8''…``, which
    the managers' aiohttp prefers and decodes as it is (a leading ``/`` and
    any ``;`` included, where a quoted ``filename`` loses the slash and, with
    two ``;``, the whole name), and as a quoted ``filename`` with everything
    but letters, digits, ``/`` and ``-._~`` percent-encoded, for servers that
    read only that and decode it (RFC 7578 §4.2). httpx cannot write the
    first. A fresh iteration serves each attempt of the request.
    """

    CHUNK = 64 * 1024

    def __init__(self, parts: Sequence[tuple[str, ProgressBuffer]]) -> None:
        self.boundary = os.urandom(16).hex()
        self._parts = [(self._head(name), buffer) for name, buffer in parts]
        self._tail = f"--{self.boundary}--\r\n".encode()

    def _head(self, name: str) -> bytes:
        encoded = quote(name.encode("utf-8"), safe="/")
        return (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="src"; filename="{encoded}"; '
            f"filename*=UTF-8''{quote(name.encode('utf-8'), safe='')}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode("ascii")

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def length(self) -> int:
        return sum(len(head) + len(buffer.getbuffer()) + 2 for head, buffer in self._parts) + len(self._tail)

    async def chunks(self) -> AsyncIterator[bytes]:
        for head, buffer in self._parts:
            yield head
            buffer.seek(0)
            while chunk := buffer.read(self.CHUNK):
                yield chunk
            yield b"\r\n"
        yield self._tail


@dataclass(frozen=True)
class UploadFile:
    """One file of an upload: ``name`` relative to /home/work (surrogate escapes allowed).

    The content is read by ``read`` (in a worker thread) only when its request
    is built, so a large upload never sits in memory as a whole.
    """

    name: str
    size: int
    read: Callable[[], bytes] = field(repr=False)

    @classmethod
    def of(cls, name: str, data: bytes) -> UploadFile:
        return cls(name, len(data), lambda: data)


class ByteBudget:
    """Bounds the bytes held by requests in flight (a request bigger than the budget takes all of it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._changed = trio.Condition()

    @asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        amount = min(amount, self.limit)
        async with self._changed:
            while self._used + amount > self.limit:
                await self._changed.wait()
            self._used += amount
        try:
            yield
        finally:
            async with self._changed:
                self._used -= amount
                self._changed.notify_all()


def quote_component(value: str) -> str:
    """Percent-encode a path or query value, raw bytes included."""
    return quote(os.fsencode(value), safe="")


def query_string(pairs: Iterable[tuple[str, str]]) -> str:
    return "&".join(f"{key}={quote_component(value)}" for key, value in pairs)


def json_body(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document).encode()


def parse_retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


#: Agent exceptions that a repeated request would only meet again.
DETERMINISTIC_AGENT_ERRORS = (
    "PermissionError",
    "FileNotFoundError",
    "NotADirectoryError",
    "IsADirectoryError",
    "FileExistsError",
    "ValueError",
    "RuntimeError('Could not download",
)


def is_deterministic_failure(response: httpx.Response) -> bool:
    """A 500 whose agent details name a cause that repeating cannot change."""
    try:
        details = response.json().get("agent-details") or {}
    except (ValueError, AttributeError):
        return False
    return str(details.get("exception", "")).startswith(DETERMINISTIC_AGENT_ERRORS)


def names_no_cause(response: httpx.Response) -> bool:
    """A 500 without agent details: managers >= 26.1 answer every agent failure so."""
    try:
        document = response.json()
    except ValueError:
        return True
    return not isinstance(document, dict) or not document.get("agent-details")


def manager_release(text: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


class Connection:
    """A signed, retrying HTTP connection to one manager endpoint."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 8,
    ) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.retry = retry
        self.stats = ClientStats()
        self.health = RemoteHealth()
        self.rate = RateState()
        self.api_version = signing.LATEST_VERSION
        self.manager_version = ""
        base = credentials.endpoint.rstrip("/")
        self._base = httpx.URL(base)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def host(self) -> str:
        """What the server sees in ``Host``: the host, with the port when one is given."""
        return self._base.netloc.decode("ascii")

    def url(self, path: str, query: str = "") -> str:
        prefix = self._base.raw_path.decode("ascii").rstrip("/")
        return f"{self._base.scheme}://{self.host}{prefix}{path}" + (f"?{query}" if query else "")

    async def negotiate(self) -> str:
        """Probe ``GET /`` (unsigned) and use min(server, client) as the API version."""
        response = await self._send_with_retries(
            lambda: self._http.build_request("GET", self.url("/")),
            "version",
            idempotent=True,
            deadline=self.deadline_for(0),
        )
        not_a_manager = (
            f"{self.credentials.endpoint} does not answer like a Backend.AI manager"
            " (check BACKEND_ENDPOINT: the manager's address, with no path after the host)"
        )
        if 400 <= response.status_code < 500 and response.status_code != 429:
            raise ProtocolError(f"{not_a_manager}; GET / answered {response.status_code}")
        if response.status_code != 200:
            self._raise_for_status(response, "version")
        try:
            document = response.json()
            server_version = str(document["version"])
            signing.version_key(server_version)
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(not_a_manager) from exc
        self.manager_version = str(document.get("manager", ""))
        self.api_version = min(server_version, signing.LATEST_VERSION, key=signing.version_key)
        log.info(
            "endpoint %s: manager %s, API %s",
            self.credentials.endpoint,
            self.manager_version or "unknown",
            self.api_version,
        )
        return self.api_version

    @property
    def swallows_upload_errors(self) -> bool:
        """True unless the manager is known to predate the silent-upload-failure releases."""
        release = manager_release(self.manager_version)
        return release is None or release >= SWALLOWING_MANAGER

    def _sign(self, request: httpx.Request) -> None:
        date_header = signing.format_date(datetime.now(UTC))
        request.headers["Date"] = date_header
        request.headers["X-BackendAI-Version"] = self.api_version
        request.headers["X-BackendAI-Domain"] = "default"
        signature_hex = signing.signature(
            method=request.method,
            path_with_query=request.url.raw_path.decode("ascii"),
            date_header=date_header,
            host=self.host,
            media_type=signing.media_type_of(request.headers.get("content-type")),
            version=self.api_version,
            secret_key=self.credentials.secret_key,
        )
        request.headers["Authorization"] = signing.authorization_header(
            self.credentials.access_key, signature_hex
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        query: str = "",
        content: bytes | None = None,
        upload: UploadBody | None = None,
        idempotent: bool,
        timeout: float | None = None,
        payload: int = 0,
        classify: Callable[[], Awaitable[bool]] | None = None,
    ) -> httpx.Response:
        """Send one signed API request; raise the typed error for any non-2xx answer.

        ``timeout`` bounds the whole exchange; by default it is sized to the
        request (`deadline_for`), ``payload`` being the bytes it carries or
        is expected to bring back. ``classify`` decides a 500 that names no
        cause (managers >= 26.1) before it is repeated: True when repeating
        could not change it.
        """
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if upload is not None:
            headers = {"Content-Type": upload.content_type, "Content-Length": str(upload.length)}
        deadline = timeout or self.deadline_for(payload + len(content or b""))
        extensions = {"timeout": httpx.Timeout(min(deadline, self.timeout)).as_dict()}

        def build() -> httpx.Request:
            request = self._http.build_request(
                method,
                self.url(path, query),
                content=content if upload is None else upload.chunks(),
                headers=headers,
                extensions=extensions,
            )
            self._sign(request)
            return request

        response = await self._send_with_retries(
            build, endpoint, idempotent=idempotent, deadline=deadline, classify=classify
        )
        if response.status_code >= 300:
            self._raise_for_status(response, endpoint)
        return response

    def deadline_for(self, payload: int) -> float:
        """How long one exchange carrying ``payload`` bytes may take, answer included."""
        return BASE_DEADLINE + payload / SLOWEST_TRANSFER

    async def _exchange(self, request: httpx.Request, endpoint: str, deadline: float) -> httpx.Response:
        """Send ``request`` and read its whole answer within ``deadline`` seconds and its size limit.

        The answer is read as it streams (decoded), so a dripping server is
        cut off at the deadline and an oversized one at its limit; either way
        the connection is closed, and the next attempt takes a fresh one.
        """
        limit = ANSWER_LIMITS.get(endpoint, DEFAULT_ANSWER_LIMIT)
        with trio.move_on_after(deadline):
            response = await self._http.send(request, stream=True)
            try:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise AnswerTooLarge(endpoint, limit, int(declared))
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise AnswerTooLarge(endpoint, limit, len(body))
            finally:
                await response.aclose()
            headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _DECODED_HEADERS]
            return httpx.Response(response.status_code, headers=headers, content=bytes(body), request=request)
        raise AnswerDeadline(f"no whole answer within {deadline:.0f} s")

    async def _send_with_retries(
        self,
        build: Any,
        endpoint: str,
        *,
        idempotent: bool,
        deadline: float,
        classify: Callable[[], Awaitable[bool]] | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            paused = self.rate.paused_for
            if paused > RATE_PAUSE_WAITED:
                raise RateLimited(
                    429,
                    title="Too many requests.",
                    msg=f"the manager's rate limit for this keypair is used up; nothing is sent for "
                    f"{paused:.0f} s more (every request counts, refused ones too)",
                    endpoint=endpoint,
                )
            await trio.sleep(paused)
            self.stats.requests[endpoint] += 1
            try:
                response = await self._exchange(build(), endpoint, deadline)
            except (httpx.TransportError, AnswerDeadline) as exc:
                never_sent = isinstance(exc, httpx.ConnectError)
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.health.failed(f"{endpoint}: {reason}")
                if attempt + 1 >= self.retry.attempts or not (idempotent or never_sent):
                    message = f"{endpoint}: cannot reach {self.credentials.endpoint} ({reason})"
                    self.stats.errors.append(message)
                    raise EndpointUnreachable(message, delivered=not never_sent) from exc
                delay = self.retry.delay(attempt)
                log.warning("%s: %s; retrying in %.1f s", endpoint, reason, delay)
            else:
                status = response.status_code
                if status < 500:
                    self.health.answered()
                else:
                    self.health.failed(f"{endpoint}: HTTP {status}")
                if status == 429:
                    pause = self.rate.refused()
                    log.warning(
                        "%s: the manager's rate limit is used up; sending nothing for %.0f s", endpoint, pause
                    )
                    return response  # repeating it now would count against the limit again
                self.rate.seen(response.headers)
                retryable = status >= 500 and not is_deterministic_failure(response)
                if not retryable or not idempotent or attempt + 1 >= self.retry.attempts:
                    return response
                if classify is not None and names_no_cause(response) and await classify():
                    return response  # a listing showed what a repeat would meet again
                delay = self.retry.delay(attempt, parse_retry_after(response.headers.get("retry-after")))
                log.warning("%s: HTTP %d; retrying in %.1f s", endpoint, status, delay)
            attempt += 1
            self.stats.retries += 1
            await trio.sleep(delay)

    def _raise_for_status(self, response: httpx.Response, endpoint: str) -> None:
        status = response.status_code
        type_uri = title = msg = ""
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if isinstance(problem, dict):
            type_uri = str(problem.get("type", ""))
            title = str(problem.get("title", ""))
            detail = problem.get("msg") or (problem.get("agent-details") or {}).get("exception")
            msg = str(detail or "")
        else:
            title = response.reason_phrase
        error_class = _ERROR_CLASSES.get(status, ServerError if status >= 500 else APIError)
        kwargs = {"type_uri": type_uri, "title": title, "msg": msg, "endpoint": endpoint}
        error: APIError
        if error_class is RateLimited:
            error = RateLimited(
                status, retry_after=parse_retry_after(response.headers.get("retry-after")), **kwargs
            )
        else:
            error = error_class(status, **kwargs)
        self.stats.errors.append(str(error))
        raise error

    async def create_session(self, name: str, image: str) -> dict[str, Any]:
        """Get-or-create a session by name; the answer holds ``sessionId``, ``created`` and ``status``.

        Enqueued only: without it the manager holds the request until the session
        runs, without limit (an image pull can take many minutes); the caller
        follows the start with ``GET /session/{id}`` instead.
        """
        body = {
            "name": name,
            "image": image,
            "type": "interactive",
            "reuseIfExists": True,
            "enqueueOnly": True,
        }
        # Get-or-create by name: repeating it finds what the first attempt made.
        response = await self.request(
            "POST", "/session", endpoint="create", content=json_body(body), idempotent=True
        )
        return response.json()

    def session(self, id_or_name: str) -> SessionClient:
        return SessionClient(self, id_or_name)


class SessionClient:
    """The endpoints of one compute session, in request shapes every manager accepts."""

    def __init__(self, connection: Connection, id_or_name: str) -> None:
        self.connection = connection
        self.id_or_name = id_or_name
        self._prefix = f"/session/{quote_component(id_or_name)}"
        self._download_method = "POST"
        #: 1 once the manager showed it reads one path of a download (23.09.11's GET).
        self._paths_per_download = MAX_DOWNLOAD_PATHS
        self._absolute_upload_names = False
        #: why the session is known to be gone for good (see `_request`), or None.
        self.terminated: str | None = None

    async def _request(self, method: str, path: str, *, endpoint: str, **kwargs: Any) -> httpx.Response:
        """A request to this session; "no such session", once confirmed, ends the session for good."""
        if self.terminated is not None:
            raise SessionTerminated(self.terminated, endpoint=endpoint)
        try:
            return await self.connection.request(method, path, endpoint=endpoint, **kwargs)
        except SessionNotFound as error:
            if endpoint != "info":
                try:
                    await self.connection.request("GET", self._prefix, endpoint="info", idempotent=True)
                except SessionNotFound:
                    pass
                else:
                    raise  # the session is there: this 404 was about something else
            self.terminated = f"session {self.id_or_name} is terminated (the manager answered: {error})"
            log.error("%s", self.terminated)
            raise SessionTerminated(self.terminated, endpoint=endpoint) from error

    async def info(self) -> dict[str, Any]:
        response = await self._request("GET", self._prefix, endpoint="info", idempotent=True)
        return response.json()

    async def destroy(self) -> None:
        await self._request("DELETE", self._prefix, endpoint="destroy", idempotent=True)

    async def interrupt(self) -> None:
        await self._request("POST", f"{self._prefix}/interrupt", endpoint="interrupt", idempotent=True)

    async def list_dir(self, path: str) -> list[RemoteEntry]:
        """One directory level; ``path`` is relative to /home/work ("" is the root)."""
        remote_path = path or "."
        response = await self._request(
            "GET",
            f"{self._prefix}/files",
            endpoint="list",
            query=query_string([("path", remote_path)]),
            content=json_body({"path": remote_path}),
            idempotent=True,
        )
        return parse_listing(response.json(), remote_path)

    async def upload(
        self, files: Sequence[UploadFile], *, verify: bool = True
    ) -> dict[str, list[RemoteEntry]]:
        """Upload up to 20 files; returns the verifying listings, by parent directory.

        Raises `LimitExceeded` without sending anything when the batch breaks a
        limit, and `ServerError` when a verifying listing shows a file missing.
        """
        check_upload_batch(files)
        sent = await self._upload_batch(files)
        if not verify or not self._unproven_204s:
            return {}
        return await self._verify_upload(sent)

    async def upload_all(
        self,
        files: Sequence[UploadFile],
        *,
        parallel: int = 4,
        memory: int = UPLOAD_MEMORY_BYTES,
        on_batch: Callable[[Sequence[UploadFile]], None] | None = None,
        verify: bool = False,
    ) -> dict[str, list[RemoteEntry]]:
        """Upload any number of files in batches of 20, ``parallel`` requests at a time.

        At most ``memory`` bytes of content are read into memory at once.
        ``on_batch`` is called after each batch is sent. Where a 204 does not
        prove a write, or ``verify`` asks for it, every directory written to
        is listed once at the end (`UploadNotApplied` names what did not
        arrive); returns those listings. The first batch that fails
        stops the others and is raised as it is.
        """
        for item in files:
            check_upload_batch([item])
        ordered = sorted(files, key=lambda item: item.name.rpartition("/")[0])
        batches = [ordered[i : i + MAX_UPLOAD_FILES] for i in range(0, len(ordered), MAX_UPLOAD_FILES)]
        budget = ByteBudget(memory)
        sent: dict[str, int] = {}

        async def send(batch: Sequence[UploadFile]) -> None:
            async with budget.hold(sum(item.size for item in batch)):
                sent.update(await self._upload_batch(batch))
            if on_batch is not None:
                on_batch(batch)

        await gather_each(send, batches, limit=parallel)
        if not files or not (verify or self._unproven_204s):
            return {}
        return await self._verify_upload(sent)

    @property
    def _unproven_204s(self) -> bool:
        """Whether a 204 may hide an upload that did not land where it was meant to: on managers
        that swallow errors, and after any switch of the name mode."""
        return self.connection.swallows_upload_errors or self._absolute_upload_names

    async def _upload_batch(self, files: Sequence[UploadFile]) -> dict[str, int]:
        """One upload request (switching to absolute names if the agent wants them); name → size sent.

        The switch is a guess from an error text that an escape through a
        symlink also gives, so it is kept only once a listing shows the batch
        sent again with absolute names where it belongs; otherwise the names
        stay relative and the first error is raised.
        """
        try:
            return await self._post_upload(files)
        except ServerError as error:
            if self._absolute_upload_names or "outside /home/work" not in error.msg:
                raise
            self._absolute_upload_names = True
            try:
                sent = await self._post_upload(files)
                await self._verify_upload(sent)
            except BaifsError:
                self._absolute_upload_names = False
                raise error from None
            log.warning("this agent wants absolute upload names (a listing confirms it); switched")
            return sent

    async def _post_upload(self, files: Sequence[UploadFile]) -> dict[str, int]:
        # The content travels in buffers closed right after the request: httpx keeps
        # the request alive in reference cycles, and a batch is up to 20 MiB.
        # A file that changed while it was read is sent as read; the caller knows
        # its content moved on and does not take the upload as that content's.
        buffers: list[ProgressBuffer] = []
        sent: dict[str, int] = {}
        try:
            for item in files:
                data = await trio.to_thread.run_sync(item.read)
                sent[item.name] = len(data)
                buffers.append(ProgressBuffer(data, self.connection.health))
            body = UploadBody(
                [(self._upload_name(item.name), buffer) for item, buffer in zip(files, buffers, strict=True)]
            )
            await self._request(
                "POST",
                f"{self._prefix}/upload",
                endpoint="upload",
                upload=body,
                idempotent=True,
                payload=sum(sent.values()),
            )
        finally:
            for buffer in buffers:
                buffer.close()
        return sent

    @property
    def absolute_upload_names(self) -> bool:
        """Whether this agent wants upload names absolute under /home/work (learnt from its refusal)."""
        return self._absolute_upload_names

    def _upload_name(self, name: str) -> str:
        return f"{WORK_DIR}/{name}" if self._absolute_upload_names else name

    async def _verify_upload(self, sent: Mapping[str, int]) -> dict[str, list[RemoteEntry]]:
        by_parent: dict[str, dict[str, int]] = {}
        for name, size in sent.items():
            parent, _, base = name.rpartition("/")
            by_parent.setdefault(parent, {})[base] = size
        listings: dict[str, list[RemoteEntry]] = {}

        async def verify(parent: str) -> None:
            listings[parent] = await self.list_dir(parent)

        await gather_each(verify, by_parent, limit=4)
        missing = [
            f"{parent}/{name}".lstrip("/")
            for parent, expected in by_parent.items()
            for name, size in sorted(expected.items())
            if {e.name: e.size for e in listings[parent] if e.is_regular}.get(name) != size
        ]
        if missing:
            raise UploadNotApplied(missing)
        return listings

    async def download(self, paths: Sequence[str]) -> list[memoryview]:
        """Tar archives of up to 5 paths, in the order asked."""
        if not paths:
            return []
        if len(paths) > MAX_DOWNLOAD_PATHS:
            raise LimitExceeded(f"a download carries at most {MAX_DOWNLOAD_PATHS} paths, not {len(paths)}")
        if len(paths) > self._paths_per_download:
            return [body for path in paths for body in await self.download([path])]
        query = query_string(("files", path) for path in paths)
        body = json_body({"files": list(paths)})
        absent: list[str] = []

        async def classify() -> bool:  # a 500 naming no cause: is a path simply not there?
            try:
                absent[:] = await self._absent(paths)
            except ServerError as error:  # typed answers (429, a session gone, ...) stay what they are
                raise ServerError(
                    500,
                    title="Download failed",
                    msg="the session named no cause, and the listing that would show whether "
                    f"{', '.join(map(repr, paths))} exist failed too: {error}",
                    endpoint="download",
                ) from error
            return bool(absent)

        async def send(method: str) -> httpx.Response:
            return await self._request(
                method,
                f"{self._prefix}/download",
                endpoint="download",
                query=query,
                content=body,
                idempotent=True,
                payload=len(paths) * MAX_ARCHIVE_BYTES,
                classify=classify,
            )

        try:
            response = await self._in_download_method(send)
        except ServerError:
            if absent and len(paths) == 1:
                raise RemotePathError(errno.ENOENT, paths[0], "not in the session's listing") from None
            raise
        parts = decode_multipart(response.headers.get("content-type", ""), response.content)
        if len(parts) == 1 < len(paths) and self._download_method == "GET":
            # Manager 23.09.11 reads only the first ``files`` value of a GET: one path a request.
            log.info("this manager downloads one path a request; asking for each")
            self._paths_per_download = 1
            return [parts[0].body, *[body for path in paths[1:] for body in await self.download([path])]]
        if len(parts) != len(paths):
            raise ProtocolError(f"asked for {len(paths)} archives, received {len(parts)}")
        return [part.body for part in parts]

    async def _in_download_method(self, send: Callable[[str], Awaitable[httpx.Response]]) -> httpx.Response:
        """``send(method)`` with the method this manager downloads with: POST until a 405 says
        it takes GET only (managers up to 24.03.6), then GET for good."""
        try:
            return await send(self._download_method)
        except MethodNotAllowed:
            if self._download_method == "GET":
                raise
            log.info("this manager downloads with GET; switching")
            self._download_method = "GET"
            return await send("GET")

    async def _absent(self, paths: Sequence[str]) -> list[str]:
        """The paths that their directory's listing does not show (one listing per directory)."""
        by_parent: dict[str, list[str]] = {}
        for path in paths:
            by_parent.setdefault(path.rpartition("/")[0], []).append(path)
        absent = []
        for parent, inside in by_parent.items():
            try:
                names = {entry.name for entry in await self.list_dir(parent or ".")}
            except RemotePathError:
                names = set()
            absent += [path for path in inside if path.rpartition("/")[2] not in names]
        return absent

    async def download_single(self, path: str) -> bytes:
        """The raw bytes of one file (the same 1 MiB archive limit applies)."""

        async def send(method: str) -> httpx.Response:
            return await self._request(
                method,
                f"{self._prefix}/download_single",
                endpoint="download_single",
                query=query_string([("file", path)]),
                content=json_body({"file": path}),
                idempotent=True,
                payload=MAX_ARCHIVE_BYTES,
            )

        return (await self._in_download_method(send)).content

    async def execute(
        self,
        mode: str,
        run_id: str,
        *,
        code: str = "",
        options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One execute request; the ``result`` object of the answer."""
        body: dict[str, Any] = {"mode": mode, "code": code, "runId": run_id, "run_id": run_id}
        if options is not None:
            body["options"] = dict(options)
        response = await self._request(
            "POST",
            self._prefix,
            endpoint="execute",
            content=json_body(body),
            idempotent=False,
            timeout=timeout,
        )
        result = response.json().get("result")
        if not isinstance(result, dict) or "status" not in result:
            raise ProtocolError("execute answer has no 'result.status'")
        return result


def check_upload_batch(files: Sequence[UploadFile]) -> None:
    if len(files) > MAX_UPLOAD_FILES:
        raise LimitExceeded(f"an upload carries at most {MAX_UPLOAD_FILES} files, not {len(files)}")
    for item in files:
        if item.size > MAX_UPLOAD_BYTES:
            raise LimitExceeded(
                f"{item.name!r} has {item.size:,} bytes; an upload carries at most "
                f"{MAX_UPLOAD_BYTES:,} bytes per file"
            )
        parts = item.name.split("/")
        if not item.name or item.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise LimitExceeded(f"upload name {item.name!r} must be a plain relative path")
