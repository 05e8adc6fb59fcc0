"""The HTTP surface of ``baifs serve``: the session API routes of a manager.

Owns the request shapes the server accepts and the answers it gives; what the
answers contain comes from `sessions`, `workdir` and `kernel`. Every route but
``GET /`` goes through `endpoint`, which counts the request, applies the
injected latency, verifies the signature and turns `Problem` into
problem+json. Unknown routes and methods also answer problem+json, because
the official SDK parses every error body as JSON.

Besides the manager's routes there is one of baifs's own, documented in
docs/protocol.md: ``GET /_baifs/counters`` (signed like the rest) returns the
requests served per endpoint and the batch runs started.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import trio
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..api import archive, signing
from . import auth
from .compat import Compat
from .kernel import RunWedged, SessionTerminated
from .problems import AgentJSON, Problem, agent_failure, bad_request, invalid_params, no_such_session
from .ratelimit import RateLimit
from .sessions import ServedSession, SessionRegistry

log = logging.getLogger(__name__)

MAX_UPLOAD_FILES = 20
MAX_UPLOAD_BYTES = 1_048_575
MAX_DOWNLOAD_FILES = 5
#: aiohttp's default limit for a request body the manager reads whole (JSON).
MAX_JSON_BODY = 1_048_576
#: aiohttp's limit for one header line of a multipart part, as the manager reads them.
MAX_PART_HEADER = 8190
#: A whole multipart body: 20 full parts, 8 header lines each, and their framing.
MAX_UPLOAD_BODY = MAX_UPLOAD_FILES * (MAX_UPLOAD_BYTES + 8 * (MAX_PART_HEADER + 2)) + 64 * 1024

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class ServerState:
    keypair: auth.Keypair
    registry: SessionRegistry
    compat: Compat
    latency: float = 0.0
    manager_version: str = "baifs-serve"
    #: the newest API version: announced by ``GET /``, and the newest a request may use.
    api_version: str = signing.LATEST_VERSION
    #: the keypair's rate limit (`--rate-limit`, or the emulated release's default); None: none.
    rate_limit: RateLimit | None = None
    requests: Counter[str] = field(default_factory=Counter)
    batch_runs: int = 0
    #: agent calls made again after a failure (``agent-call-retries``).
    agent_call_retries: int = 0


#: What the agent's file calls (download, download_single) raise for a path they cannot serve.
FILE_FAILURES = (OSError, ValueError, RuntimeError)

#: ``agent-call-retries``: the manager's RetryPolicy(max_retries=3, retry_delay=0.1, exponential).
AGENT_CALL_ATTEMPTS = 3
AGENT_RETRY_DELAY = 0.1


async def agent_call(
    state: ServerState,
    call: Callable[[], Awaitable[Any]],
    failing: type[BaseException] | tuple[type[BaseException], ...],
) -> Any:
    """One call to the session's agent. With ``agent-call-retries`` (managers 25.16 - 25.19) a
    call that fails is made again, up to three calls in all, 0.1 then 0.2 s apart, before its
    last error goes to the caller (and, as the manager does, to the client)."""
    attempts = AGENT_CALL_ATTEMPTS if state.compat.agent_call_retries else 1
    for attempt in range(1, attempts):
        try:
            return await call()
        except failing:
            state.agent_call_retries += 1
            await trio.sleep(AGENT_RETRY_DELAY * 2 ** (attempt - 1))
    return await call()


def raw_target(request: Request) -> str:
    scope = request.scope
    path = scope.get("raw_path") or quote(scope["path"]).encode()
    query = scope.get("query_string", b"")
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def query_values(request: Request, key: str) -> list[str]:
    """Values of a query key, with raw bytes kept as surrogate escapes (with ``utf8-names-only``,
    bytes that are not UTF-8 become U+FFFD, as yarl decodes them for the manager)."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    errors = "replace" if state_of(request).compat.utf8_names_only else "surrogateescape"
    pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors=errors)
    return [value for name, value in pairs if name == key]


def packable(request: Request, path: str) -> str:
    """A path from a JSON body, as the agent RPC can carry it: with ``utf8-names-only``, msgpack
    refuses a lone surrogate (how JSON carries bytes that are not UTF-8), a 500."""
    if state_of(request).compat.utf8_names_only:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError as error:
            raise agent_failure(error) from None
    return path


def too_large(limit: int) -> Problem:
    return bad_request(f"Request body too large: at most {limit:,} bytes are accepted")


def declared_length(request: Request, limit: int) -> None:
    """Refuse a body whose declared length is over ``limit`` before reading any of it."""
    try:
        length = int(request.headers.get("content-length", "0"))
    except ValueError:
        raise bad_request("Malformed Content-Length") from None
    if length > limit:
        raise too_large(limit)


async def bounded_body(request: Request, limit: int) -> bytes:
    """The whole body, read as it comes and refused as soon as it passes ``limit``."""
    declared_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


async def json_object(request: Request, *, required: bool) -> dict[str, Any]:
    body = await bounded_body(request, MAX_JSON_BODY)
    if not body.strip():
        if required:
            raise bad_request("Malformed body: a JSON object is required")
        return {}
    try:
        document = json.loads(body)
    except ValueError:
        raise bad_request("Malformed body: not JSON") from None
    if not isinstance(document, dict):
        raise bad_request("Malformed body: not a JSON object")
    return document


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def session_of(request: Request, *, terminating_ok: bool = False) -> ServedSession:
    """The session a request names. While it is TERMINATING (``terminating-window``) the agent no
    longer knows its kernel: every request but its info answers the agents' 500."""
    session = state_of(request).registry.get(request.path_params["session"])
    if session.terminating and not terminating_ok:
        if (
            request.method == "POST"
            and request.url.path.rstrip("/") == f"/session/{request.path_params['session']}"
        ):
            raise agent_failure(
                RuntimeError(
                    f"The container for kernel {session.id} is not found! (might be terminated--try it again)"
                )
            )
        raise agent_failure(KeyError(session.id))  # kernel_registry[kernel_id]
    return session


def endpoint(name: str) -> Callable[[Handler], Handler]:
    """Count, delay, authenticate, then run the handler; problems become problem+json."""

    def decorate(handler: Handler) -> Handler:
        async def route(request: Request) -> Response:
            state = state_of(request)
            state.requests[name] += 1
            if state.latency:
                await trio.sleep(state.latency)
            try:
                access_key = auth.verify(
                    auth.SignedRequest(request.method, raw_target(request), request.headers),
                    state.keypair,
                    newest=state.api_version,
                )
                limits = (
                    {}
                    if state.rate_limit is None or name == "counters"  # our instrument, not the API
                    else state.rate_limit.admit(access_key, trio.current_time())
                )
                response = await handler(request)
                if response.status_code < 400:
                    response.headers.update(limits)
                return response
            except Problem as problem:
                log.info("%s %s -> %d %s", request.method, request.url.path, problem.status, problem.kind)
                if problem.agent_exception is not None and state.compat.bare_agent_errors:
                    log.info("agent failure answered bare: %s", problem.agent_exception)
                    return Problem(500, "internal-server-error", "Internal server error.").response()
                return problem.response()
            except SessionTerminated:
                return no_such_session().response()

        route.__name__ = handler.__name__
        return route

    return decorate


async def hello(request: Request) -> Response:
    state_of(request).requests["version"] += 1
    state = state_of(request)
    return AgentJSON({"version": state.api_version, "manager": state.manager_version})


@endpoint("announcement")
async def announcement(request: Request) -> Response:
    return AgentJSON({"enabled": False, "message": ""})


@endpoint("counters")
async def counters(request: Request) -> Response:
    state = state_of(request)
    return AgentJSON(
        {
            "requests": dict(state.requests),
            "batch_runs": state.batch_runs,
            "agent_call_retries": state.agent_call_retries,
        }
    )


@endpoint("create")
async def create_session(request: Request) -> Response:
    body = await json_object(request, required=True)
    name = body.get("name") or body.get("session_name") or body.get("clientSessionToken")
    image = body.get("image") or body.get("lang")
    if not name or not image:
        raise invalid_params("name and image are required")
    session, created = await state_of(request).registry.get_or_create(str(name), str(image))
    # As AgentRegistry.create_session: unless enqueueOnly, wait for the start, without limit
    # when maxWaitSeconds is 0; a wait that ends first answers TIMEOUT. A reuse answers at once.
    status = session.status
    if created and not body.get("enqueueOnly"):
        try:
            patience = float(body.get("maxWaitSeconds") or 0)
        except (TypeError, ValueError):
            raise invalid_params("maxWaitSeconds must be a number") from None
        status = "RUNNING" if await session.started(patience) else "TIMEOUT"
    answer = {
        "sessionId": session.id,
        "sessionName": session.name,
        "status": status,
        "servicePorts": [],
        "created": created,
    }
    return AgentJSON(answer, status_code=201)


@endpoint("info")
async def session_info(request: Request) -> Response:
    return AgentJSON(session_of(request, terminating_ok=True).info())


@endpoint("destroy")
async def destroy_session(request: Request) -> Response:
    state_of(request).registry.destroy(request.path_params["session"])
    return AgentJSON({"stats": {"status": "terminated"}})


@endpoint("interrupt")
async def interrupt(request: Request) -> Response:
    session_of(request).kernel.interrupt()
    return Response(status_code=204)


@endpoint("execute")
async def execute(request: Request) -> Response:
    state = state_of(request)
    session = session_of(request)
    body = await json_object(request, required=True)
    mode = body.get("mode")
    if mode not in ("batch", "continue", "input", "query"):
        raise Problem(500, "invalid-session-data", "Invalid session data.", f"unsupported mode {mode!r}")
    if state.compat.run_id_camel_only:
        # api/session.py execute up to 25.5: the key must be there, its value may be None.
        if "runId" not in body:
            raise invalid_params("runId is missing!")
        run_id = body["runId"]
        if run_id is None and mode in ("continue", "input"):
            raise invalid_params("continuation requires explicit run ID")  # an assert there: 400
    elif state.compat.run_id_snake_only:
        run_id = body.get("run_id")
    else:
        run_id = body.get("run_id") or body.get("runId")
    if not run_id:
        if mode in ("continue", "input"):
            raise Problem(
                500, "invalid-session-data", "Invalid session data.", "continuation requires explicit run ID"
            )
        run_id = secrets.token_hex(16)
    if mode == "query":
        console = [["stderr", "this local session has no Jupyter kernel; use batch mode\n"]]
        result = {
            "status": "finished",
            "runId": run_id,
            "exitCode": 127,
            "options": None,
            "files": [],
            "console": console,
        }
        return AgentJSON({"result": result})
    if mode == "batch":
        state.batch_runs += 1
    options = body.get("options") if isinstance(body.get("options"), dict) else None
    try:
        result = await agent_call(
            state, functools.partial(session.kernel.execute, mode, str(run_id), options), RunWedged
        )
    except RunWedged as error:
        raise agent_failure(error) from None
    return AgentJSON({"result": result})


@endpoint("list")
async def list_files(request: Request) -> Response:
    session = session_of(request)
    from_query = query_values(request, "path")
    if from_query:
        path = from_query[0]
    elif state_of(request).compat.list_path_query_only:
        path = "."
    else:
        path = packable(request, str((await json_object(request, required=False)).get("path") or "."))
    listing = functools.partial(trio.to_thread.run_sync, session.work.listing, path)
    try:
        return AgentJSON(await agent_call(state_of(request), listing, PermissionError))
    except PermissionError as error:
        raise agent_failure(error) from None


async def requested_paths(request: Request, key: str) -> list[str]:
    """The paths a download names: the query's values, else the JSON body's. With
    ``download-query-first-only`` a GET's body is ignored and only the first query value is read
    (check_api_params validates ``dict(request.query)``), as manager 23.09.11 does."""
    from_query = query_values(request, key)
    if request.method == "GET" and state_of(request).compat.download_query_first_only:
        if not from_query:
            raise invalid_params(f"{key} is missing")
        return from_query[:1]
    if from_query:
        return from_query
    body = await json_object(request, required=False)
    value = body.get(key, [])
    return [packable(request, str(v)) for v in (value if isinstance(value, list) else [value])]


def refuse_download_method(request: Request) -> None:
    """Managers up to 24.03.6 route both downloads for GET only (``download-get-only``)."""
    if request.method == "POST" and state_of(request).compat.download_get_only:
        raise Problem(405, "method-not-allowed", "Method not allowed.")


@endpoint("download")
async def download(request: Request) -> Response:
    session = session_of(request)
    refuse_download_method(request)
    paths = await requested_paths(request, "files")
    if len(paths) > MAX_DOWNLOAD_FILES:
        raise Problem(
            400,
            "vfolder-operation-failed",
            "Virtual folder operation has failed.",
            f"Too many files (maximum {MAX_DOWNLOAD_FILES} files allowed)",
        )
    payloads = []
    for path in paths:
        pack = functools.partial(trio.to_thread.run_sync, session.work.archive, path)
        try:
            payloads.append(await agent_call(state_of(request), pack, FILE_FAILURES))
        except FILE_FAILURES as error:
            raise agent_failure(error) from None
    content_type, body = archive.encode_mixed(payloads)
    return Response(body, media_type=content_type)


@endpoint("download_single")
async def download_single(request: Request) -> Response:
    session = session_of(request)
    refuse_download_method(request)
    paths = await requested_paths(request, "file")
    if len(paths) != 1:
        raise invalid_params("exactly one file is required")
    read = functools.partial(trio.to_thread.run_sync, session.work.single, paths[0])
    try:
        data = await agent_call(state_of(request), read, FILE_FAILURES)
    except FILE_FAILURES as error:
        raise agent_failure(error) from None
    return Response(data, media_type="application/octet-stream")


@endpoint("upload")
async def upload(request: Request) -> Response:
    state = state_of(request)
    session = session_of(request)
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data" or b"boundary" not in options:
        raise bad_request("Malformed body: multipart/form-data is required")
    declared_length(request, MAX_UPLOAD_BODY)
    reader = UploadReader(options[b"boundary"], aiohttp_names=state.compat.aiohttp_filenames)
    failures: list[Exception] = []

    async def store(completed: list[tuple[str | None, bytes]]) -> None:
        for filename, data in completed:
            if filename is None:  # aiohttp found no name (two ';' in it, say)
                if not state.compat.upload_errors_swallowed:
                    # <= 25.15 hands None to the agent, whose path join fails.
                    failures.append(TypeError("expected str, bytes or os.PathLike object, not NoneType"))
                    continue
                filename = f"upload-{secrets.token_hex(12)}"  # >= 25.16 names it itself
            write = functools.partial(
                session.work.write_upload, filename, data, absolute_names=state.compat.absolute_upload_names
            )
            try:
                await agent_call(state, functools.partial(trio.to_thread.run_sync, write), OSError)
            except OSError as error:
                failures.append(error)

    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > MAX_UPLOAD_BODY:
            raise too_large(MAX_UPLOAD_BODY)
        if reader.problem is None:  # after a problem, drain the rest before answering
            reader.feed(chunk)
            await store(reader.take_completed())
    if reader.problem is None:
        reader.finish()
        await store(reader.take_completed())
    if reader.problem is not None:
        raise reader.problem
    if failures:
        log.warning("upload failed on the agent side: %r", failures[0])
        if not state.compat.upload_errors_swallowed:
            raise agent_failure(failures[0])
    return Response(status_code=204)


class UploadReader:
    """Streams a multipart upload, enforcing the manager's limits as parts arrive.

    A part's file name is read as python-multipart reads it and then
    percent-decoded (the union of what clients send), or, with
    ``aiohttp_names``, by aiohttp's own `BodyPartReader.filename` code, as
    every real manager reads it: a leading ``/`` stripped, no decoding,
    ``filename*`` preferred, None for a quoted name with two ``;``.
    """

    def __init__(self, boundary: bytes, *, aiohttp_names: bool = False) -> None:
        self.problem: Problem | None = None
        self._parts = 0
        self._aiohttp_names = aiohttp_names
        self._completed: list[tuple[str | None, bytes]] = []
        self._data = bytearray()
        self._disposition = b""
        self._field = bytearray()
        self._value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._end,
            },
            max_header_size=MAX_PART_HEADER,
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except Problem as problem:
            self.problem = problem
        except MultipartParseError as error:
            self.problem = bad_request(f"Malformed multipart body: {error}")
        except Exception:
            self.problem = bad_request("Malformed multipart body")

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except Exception:
            self.problem = bad_request("Malformed multipart body")

    def take_completed(self) -> list[tuple[str | None, bytes]]:
        completed, self._completed = self._completed, []
        return completed

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_UPLOAD_FILES:
            raise invalid_params("Too many files")
        self._data = bytearray()
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if len(self._data) + (end - start) > MAX_UPLOAD_BYTES:
            raise invalid_params("Too large file")
        self._data.extend(data[start:end])

    def _end(self) -> None:
        if self._aiohttp_names:
            self._completed.append((aiohttp_filename(self._disposition), bytes(self._data)))
            return
        _, params = parse_options_header(self._disposition)
        raw_name = params.get(b"filename")
        # RFC 7578 §4.2: aiohttp-based clients (the official SDK) percent-encode file names.
        name = os.fsdecode(unquote_to_bytes(raw_name)) if raw_name else f"upload-{secrets.token_hex(12)}"
        self._completed.append((name, bytes(self._data)))


def aiohttp_filename(disposition: bytes) -> str | None:
    """A part's file name as the manager's aiohttp gives it (its headers decode as UTF-8,
    surrogate escapes for the rest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aiohttp warns of the headers it gives up on
        _, params = parse_content_disposition(disposition.decode("utf-8", "surrogateescape"))
        name: str | None = content_disposition_filename(params, "filename")
    return name


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    kinds = {404: ("not-found", "Unknown URL path."), 405: ("method-not-allowed", "Method not allowed.")}
    kind, title = kinds.get(status, ("generic-bad-request", "Bad request."))
    return Problem(status, kind, title).response()


def build_app(state: ServerState) -> Starlette:
    session = "/session/{session}"
    routes = [
        Route("/", hello, methods=["GET"]),
        Route("/manager/announcement", announcement, methods=["GET"]),
        Route("/_baifs/counters", counters, methods=["GET"]),
        Route("/session", create_session, methods=["POST"]),
        Route("/session/_/create", create_session, methods=["POST"]),
        Route(session, session_info, methods=["GET"]),
        Route(session, destroy_session, methods=["DELETE"]),
        Route(session, execute, methods=["POST"]),
        Route(f"{session}/interrupt", interrupt, methods=["POST"]),
        Route(f"{session}/upload", upload, methods=["POST"]),
        Route(f"{session}/files", list_files, methods=["GET"]),
        Route(f"{session}/download", download, methods=["GET", "POST"]),
        Route(f"{session}/download_single", download_single, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.server = state
    return app
