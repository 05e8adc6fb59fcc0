"""Error responses of the local server, in the manager's problem+json form.

Owns the mapping from failures to the bodies a real manager sends (reference
§1.8): ``Content-Type: application/problem+json`` and a body with ``type``,
``title`` and, where the manager adds one, ``msg``, ``error_code`` or
``agent-details``. Handlers raise `Problem`; one place turns it into a response.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse


class AgentJSON(JSONResponse):
    """JSON as aiohttp writes it: ASCII with escapes, so names that are not UTF-8 survive."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode("ascii")


PROBLEM_BASE = "https://api.backend.ai/probs/"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        msg: str | None = None,
        *,
        error_code: str | None = None,
        agent_exception: str | None = None,
    ) -> None:
        super().__init__(f"{status} {kind}: {msg or title}")
        self.status = status
        self.kind = kind
        self.title = title
        self.msg = msg
        self.error_code = error_code
        self.agent_exception = agent_exception

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": PROBLEM_BASE + self.kind, "title": self.title}
        if self.msg is not None:
            body["msg"] = self.msg
        if self.error_code is not None:
            body["error_code"] = self.error_code
        if self.agent_exception is not None:
            body["agent-details"] = {
                "type": PROBLEM_BASE + "agent-error",
                "title": "Agent error",
                "exception": self.agent_exception,
            }
        return body

    def response(self) -> JSONResponse:
        return AgentJSON(self.body(), status_code=self.status, media_type="application/problem+json")


def invalid_params(msg: str) -> Problem:
    return Problem(
        400,
        "invalid-api-params",
        "Missing or invalid API parameters.",
        msg,
        error_code="api_generic_invalid-parameters",
    )


def invalid_auth(msg: str) -> Problem:
    return Problem(400, "invalid-auth-params", "Missing or invalid authorization parameters.", msg)


def auth_failed(msg: str) -> Problem:
    return Problem(401, "auth-failed", "Credential/signature mismatch.", msg)


def no_such_session() -> Problem:
    return Problem(404, "object-not-found", "No such session.")


def bad_request(msg: str) -> Problem:
    return Problem(400, "generic-bad-request", "Bad request.", msg)


def agent_failure(exception: BaseException) -> Problem:
    """An agent-side exception, as managers up to 25.19 report it."""
    return Problem(
        500,
        "kernel-execution-failed",
        "Executing user code in the kernel has failed.",
        agent_exception=repr(exception),
    )
