"""Signature verification of the local server, as the manager does it (reference §1.3).

Owns the check of every authenticated request: the ``Authorization`` header
(scheme ``BackendAI``), the date window of ±15 minutes, the API version, the
keypair, and the signature recomputed from the raw path with query, the raw
``Date`` header, ``Host``, the media type without parameters and the
empty-body hash, compared in constant time.

Invariant: a request reaches a handler only after `verify` returned; the
secret key is never logged or echoed in an error.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..api import signing
from .problems import Problem, auth_failed, invalid_auth

DATE_WINDOW = timedelta(minutes=15)
_CREDENTIAL = re.compile(r"^([^:\s]+):([0-9a-fA-F]+)$")


@dataclass(frozen=True)
class Keypair:
    access_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class SignedRequest:
    """What verification needs to know about one HTTP request."""

    method: str
    raw_path_with_query: str
    headers: Mapping[str, str]


def _parse_authorization(value: str) -> dict[str, str]:
    scheme, _, rest = value.strip().partition(" ")
    if scheme not in ("BackendAI", "Sorna"):
        raise invalid_auth("Malformed authorization header")
    params = {}
    for item in rest.split(","):
        key, sep, val = item.strip().partition("=")
        if sep:
            params[key.strip()] = val.strip()
    if "signMethod" not in params or "credential" not in params:
        raise invalid_auth("Malformed authorization header")
    return params


def verify(
    request: SignedRequest,
    keypair: Keypair,
    now: datetime | None = None,
    newest: str = signing.LATEST_VERSION,
) -> str:
    """Return the access key of a correctly signed request; raise `Problem` otherwise.

    ``newest`` is the newest API version the emulated release knows: a newer one is
    refused as that release refuses it.
    """
    headers = request.headers
    authorization = headers.get("authorization")
    if not authorization:
        raise Problem(401, "auth-failed", "Unauthorized access")
    params = _parse_authorization(authorization)
    date_header = headers.get("date") or headers.get("x-backendai-date") or headers.get("x-sorna-date")
    if not date_header:
        raise invalid_auth("Date/time sync error")
    try:
        moment = signing.parse_date(date_header)
    except ValueError:
        raise invalid_auth("Date/time sync error") from None
    now = now or datetime.now(UTC)
    if not now - DATE_WINDOW < moment < now + DATE_WINDOW:
        raise invalid_auth("Date/time sync error")
    method = params["signMethod"]
    hash_name = method.partition("-")[2].lower()
    if not method.upper().startswith("HMAC-") or hash_name not in ("sha256", "sha384", "sha512", "sha1"):
        raise invalid_auth("Unsupported signature method")
    version = headers.get("x-backendai-version") or headers.get("x-sorna-version")
    if not version:
        raise invalid_auth("API version missing in request headers")
    known = version in signing.VALID_VERSIONS
    if not known or signing.version_key(version) > signing.version_key(newest):
        raise Problem(400, "generic-bad-request", "Bad request.", "Unsupported API version.")
    match = _CREDENTIAL.match(params["credential"])
    if match is None:
        raise invalid_auth("Malformed authorization header")
    access_key, given = match.groups()
    if not hmac.compare_digest(access_key.encode(), keypair.access_key.encode()):
        raise auth_failed("Access key not found")
    expected = signing.signature(
        method=request.method,
        path_with_query=request.raw_path_with_query,
        date_header=date_header,
        host=headers.get("host", ""),
        media_type=signing.media_type_of(headers.get("content-type")),
        version=version,
        secret_key=keypair.secret_key,
        hash_name=hash_name,
    )
    if not hmac.compare_digest(expected.lower(), given.lower()):
        raise auth_failed("HMAC signature mismatch")
    return access_key
