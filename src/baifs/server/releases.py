"""Release profiles: `baifs serve --emulate RELEASE` behaves as that manager and agent release.

One table (`RULES`) says, for every version-dependent behaviour the server
can reproduce, which releases have it; a profile is the set of `Compat`
switches whose rule holds for the release, plus its numbers (the API version
``GET /`` announces and the newest one it accepts, and the ``manager``
string). The releases and their behaviours are read from the Backend.AI
sources, tag by tag (docs/protocol.md, "Release profiles", cites them).

Invariants: a profile names only switches `Compat` has; the profile of a
release is computed from the rules, never listed by hand, so adding a rule
updates every profile at once; without ``--emulate`` nothing here applies
(the server accepts every shape some release accepts).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .compat import Compat
from .ratelimit import DEFAULT_REQUESTS, DEFAULT_WINDOW, RateLimit

Version = tuple[int, int, int]


def version_of(text: str) -> Version:
    """``"24.03.7"`` as ``(24, 3, 7)``; `ValueError` for anything else."""
    match = re.fullmatch(r"(\d{2})\.(\d{1,2})\.(\d{1,2})", text.strip())
    if match is None:
        raise ValueError(f"not a release: {text!r} (write it as 24.03.7)")
    year, month, patch = (int(part) for part in match.groups())
    return year, month, patch


def _between(low: str, high: str) -> Callable[[Version], bool]:
    return lambda v: version_of(low) <= v <= version_of(high)


def _from(low: str) -> Callable[[Version], bool]:
    return lambda v: v >= version_of(low)


def _any(*rules: Callable[[Version], bool]) -> Callable[[Version], bool]:
    return lambda v: any(rule(v) for rule in rules)


@dataclass(frozen=True)
class Rule:
    """One switch, the releases that have its behaviour, and where the sources show it."""

    switch: str
    holds: Callable[[Version], bool]
    source: str


#: Which releases have each behaviour (manager and agent of the same release).
RULES: tuple[Rule, ...] = (
    Rule(
        "download-get-only",
        _any(_between("23.09.0", "23.09.99"), _between("24.03.0", "24.03.6")),
        "manager api/session.py download_files routes: GET only up to 23.09.11 and 24.03.6 (V2)",
    ),
    Rule(
        "download-query-first-only",
        _between("23.09.11", "23.09.99"),
        "manager api/utils.py check_api_params @23.09.11: GET bodies ignored, dict(request.query) (V2)",
    ),
    Rule(
        "absolute-upload-names",
        _any(
            _between("24.03.7", "24.03.99"),
            _between("24.09.0", "24.09.7"),
            _between("24.12.0", "24.12.99"),
            _between("25.1.0", "25.6.5"),
            _between("25.7.0", "25.7.0"),
        ),
        "agent docker/kernel.py DockerKernel.accept_file: names must be absolute (V6)",
    ),
    Rule(
        "run-id-snake-only",
        _from("25.6.0"),
        "manager api/session.py execute @25.6.0: the run id is read from run_id (V5)",
    ),
    Rule(
        "run-id-camel-only",
        lambda v: v < version_of("25.6.0"),
        "manager api/session.py execute @25.5.2: runId, required ('runId is missing!') (V5)",
    ),
    Rule(
        "phase-frame-loss",
        _any(_between("24.09.12", "24.09.99"), _between("25.6.13", "25.6.99"), _from("25.11.1")),
        "agent kernel.py get_next_result: the run detaches at a phase boundary (V9)",
    ),
    Rule(
        "upload-errors-swallowed",
        _from("25.16.0"),
        "manager services/session/service.py upload_files @25.16.0: aiotools.TaskScope (V7)",
    ),
    Rule(
        "list-path-query-only",
        _from("26.3.0"),
        "manager api/rest/session/handler.py list_files @26.3.0: QueryParam (V4)",
    ),
    Rule(
        "agent-call-retries",
        _between("25.16.0", "25.19.99"),
        "manager clients/agent/client.py @25.16.0, @25.19.2: every AgentClient RPC has "
        "agent_client_resilience, a RetryPolicy(max_retries=3, retry_delay=0.1, exponential); AgentError "
        "is a RuntimeError, not in non_retryable_exceptions",
    ),
    Rule(
        "bare-agent-errors",
        _from("26.1.0"),
        "manager clients/agent/client.py @26.1.0: RPCUserError is no longer AgentError; "
        "exception_middleware answers InternalServerError (V8)",
    ),
    Rule(
        "terminating-window",
        lambda v: True,
        "agent.py kernel_registry KeyError / execute RuntimeError while TERMINATING (real-versions §3.2)",
    ),
    Rule(
        "utf8-names-only",
        lambda v: True,
        "msgpack.packb of a lone surrogate (the agent RPC); yarl's query decoding (gap 6)",
    ),
    Rule(
        "queued-run-wedge",
        lambda v: True,
        "agent kernel.py next_output_queue popitem / resume_output_queue move_to_end, 23.09.0-26.8.1 (gap 3)",
    ),
    Rule(
        "aiohttp-filenames",
        lambda v: True,
        "aiohttp multipart.py parse_content_disposition, v3.8.1-v3.13.3 (every manager's pin)",
    ),
    Rule(
        "no-persistent-paths",
        lambda v: v < version_of("26.4.4"),
        "agent agent.py create_kernel: BACKENDAI_PERSISTENT_PATHS from 26.4.4 (V13)",
    ),
)

#: The newest API version each line of releases announces in ``GET /`` (V1).
API_VERSIONS: tuple[tuple[Version, str], ...] = (
    (version_of("25.12.0"), "v9.20250722"),
    (version_of("24.09.0"), "v8.20240915"),
    (version_of("24.03.0"), "v8.20240315"),
    (version_of("23.09.0"), "v7.20230615"),
)

#: The releases `--emulate` knows, and what each is there to reproduce.
RELEASES: dict[str, str] = {
    "23.09.10": "download by GET with a JSON body; API v7",
    "23.09.11": "download by GET reads one path, the first of the query (body ignored); API v7",
    "24.03.6": "download by GET, relative upload names; API v8.20240315",
    "24.03.7": "download by POST; upload names must be absolute (the agent refuses others)",
    "24.09.0": "absolute upload names; API v8.20240915",
    "24.09.8": "relative upload names again; phases resume",
    "25.6.5": "the last of the absolute upload names; run_id only",
    "25.6.6": "relative upload names; run_id only; phases resume",
    "25.15.12": "phases detach (frames sent meanwhile are lost); upload failures still reported",
    "25.16.0": "upload failures answered 204 (swallowed); a failed agent call made three times",
    "26.1.0": "agent failures answered as a bare 500 (no agent-details); list path still in the body",
    "26.4.7": "list path from the query only; BACKENDAI_PERSISTENT_PATHS in runs",
    "26.8.1": "the newest release read",
}


@dataclass(frozen=True)
class Profile:
    """What `baifs serve` does to behave as one release."""

    release: str
    compat: Compat
    #: the newest API version, announced in ``GET /``; newer ones are refused, as that release does.
    api_version: str

    @property
    def rate_limit(self) -> RateLimit:
        """The limit of a keypair an administrator made (every release has the same script)."""
        return RateLimit(DEFAULT_REQUESTS, DEFAULT_WINDOW)

    @property
    def manager_version(self) -> str:
        return self.release


def profile(release: str) -> Profile:
    """The profile of a release `RELEASES` names; `ValueError` (listing them) for another."""
    if release not in RELEASES:
        raise ValueError(f"no profile for release {release!r}; known: {', '.join(RELEASES)} (or: list)")
    version = version_of(release)
    switches = [rule.switch for rule in RULES if rule.holds(version)]
    api = next(api for since, api in API_VERSIONS if version >= since)
    return Profile(release, Compat.from_names(switches), api)


def describe() -> str:
    """``baifs serve --emulate list``: each release, what it reproduces, and its switches."""
    lines = []
    for release, reproduces in RELEASES.items():
        chosen = profile(release)
        switches = ", ".join(chosen.compat.enabled()) or "none"
        limit = chosen.rate_limit
        lines.append(
            f"{release:<9} {reproduces}\n          API {chosen.api_version}; "
            f"{limit.requests} requests per {limit.window:g} s; switches: {switches}"
        )
    return "\n".join(lines)
